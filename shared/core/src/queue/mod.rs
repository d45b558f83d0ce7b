//! The delivery queue port: one small message per (event, destination), one queue and one
//! dead-letter queue per destination.

pub mod memory;

use crate::delivery::{Destination, ErrorInfo};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What travels on a destination queue: a reference, never the event itself, so the store
/// stays the single source of truth and a redriven message always sends the current record.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct DeliveryMessage {
    /// The event's store key. Messages from before keys were scoped by source call it
    /// `event_id` (then always equal to the key).
    #[serde(alias = "event_id")]
    pub key: String,
    pub destination: Destination,
    /// Set only on a message the bridge put on the dead-letter queue: the attempt count at
    /// which the pair was dead-lettered. A message carrying it came through the DLQ (an
    /// operator's redrive) and may re-open the pair; any other message may not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redrive_of: Option<u32>,
}

impl DeliveryMessage {
    pub fn new(key: impl Into<String>, destination: Destination) -> Self {
        DeliveryMessage {
            key: key.into(),
            destination,
            redrive_of: None,
        }
    }

    pub fn to_body(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_body(body: &str) -> Result<Self, QueueError> {
        serde_json::from_str(body).map_err(|e| QueueError::BadMessage(e.to_string()))
    }
}

/// A message parked on the DLQ with why, carried as message attributes for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    pub message: DeliveryMessage,
    pub reason: ErrorInfo,
    pub attempts: u32,
}

impl DeadLetter {
    /// The body the DLQ holds: the message with its redrive token, so only this message, once
    /// an operator redrives it, may re-open the pair.
    pub fn dlq_message(&self) -> DeliveryMessage {
        DeliveryMessage {
            redrive_of: Some(self.attempts),
            ..self.message.clone()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("no queue is configured for destination {0}")]
    NotConfigured(Destination),
    #[error("queue unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("message body is not a delivery message: {0}")]
    BadMessage(String),
}

/// SQS allows at most 10 entries per batch call.
pub const SQS_BATCH: usize = 10;

#[async_trait]
pub trait DeliveryQueue: Send + Sync {
    /// Sends each message to its destination's queue in batches of 10. Returns the messages
    /// that could not be sent: their events stay `pending`, and the sweep re-enqueues them.
    async fn enqueue(&self, messages: &[DeliveryMessage]) -> Vec<DeliveryMessage>;

    /// Hides received messages for the given time (the retry delay). Returns the receipt
    /// handles that could not be changed.
    async fn change_visibility(
        &self,
        destination: Destination,
        changes: &[(String, Duration)],
    ) -> Vec<String>;

    /// Sends messages to their destination's DLQ with the reason as attributes. Returns the
    /// ones that could not be sent (the caller then leaves them on the source queue).
    async fn dead_letter(&self, items: &[DeadLetter]) -> Vec<DeliveryMessage>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_from_the_previous_release_still_read() {
        let m = DeliveryMessage::from_body(r#"{"event_id":"abc","destination":"meta"}"#).unwrap();
        assert_eq!(m, DeliveryMessage::new("abc", Destination::Meta));
        let dl = DeadLetter {
            message: m.clone(),
            reason: ErrorInfo::new(crate::delivery::ErrorCode::platform("x"), "y"),
            attempts: 8,
        };
        let body = dl.dlq_message().to_body();
        assert_eq!(body, r#"{"key":"abc","destination":"meta","redrive_of":8}"#);
        assert_eq!(
            DeliveryMessage::from_body(&body).unwrap().redrive_of,
            Some(8)
        );
    }
}
