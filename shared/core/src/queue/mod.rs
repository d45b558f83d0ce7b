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
    pub event_id: String,
    pub destination: Destination,
}

impl DeliveryMessage {
    pub fn new(event_id: impl Into<String>, destination: Destination) -> Self {
        DeliveryMessage {
            event_id: event_id.into(),
            destination,
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
