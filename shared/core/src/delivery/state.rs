//! Destinations and the per-(event, destination) delivery state machine every sender shares,
//! with the claim rule in one place.

use crate::timestamp::Timestamp;
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Destination {
    Meta,
    Google,
}

impl Destination {
    pub const ALL: [Destination; 2] = [Destination::Meta, Destination::Google];

    pub fn as_str(&self) -> &'static str {
        match self {
            Destination::Meta => "meta",
            Destination::Google => "google",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == s)
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long an open pair may sit past its expected progress before the sweep re-enqueues it.
pub const SWEEP_GRACE_SECS: i64 = 300;

/// Where one (event, destination) pair stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Stored, a delivery message enqueued (or to be re-enqueued by the sweep).
    Pending,
    /// Claimed by a sender until its lease expires.
    Sending,
    /// Failed transiently; due again at `next_attempt_at`.
    Retry,
    Delivered,
    /// The platform cannot retract (Data Manager): restated to zero instead.
    RetractionUnsupported,
    BlockedConsent,
    /// Can never be valid for this platform (e.g. too old, no usable identifier).
    Rejected,
    /// A revenue event from a source that is not the system of record.
    RejectedNotSystemOfRecord,
    /// Permanent platform error: the message went to the dead-letter queue.
    DeadLetter,
}

impl DeliveryStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sending => "sending",
            Self::Retry => "retry",
            Self::Delivered => "delivered",
            Self::RetractionUnsupported => "retraction_unsupported",
            Self::BlockedConsent => "blocked_consent",
            Self::Rejected => "rejected",
            Self::RejectedNotSystemOfRecord => "rejected_not_system_of_record",
            Self::DeadLetter => "dead_letter",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        use DeliveryStatus::*;
        [
            Pending,
            Sending,
            Retry,
            Delivered,
            RetractionUnsupported,
            BlockedConsent,
            Rejected,
            RejectedNotSystemOfRecord,
            DeadLetter,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    /// Still owed a delivery attempt: the reconciliation sweep watches these.
    pub fn is_open(&self) -> bool {
        matches!(self, Self::Pending | Self::Sending | Self::Retry)
    }

    /// The platform has the conversion.
    pub fn is_delivered(&self) -> bool {
        matches!(self, Self::Delivered | Self::RetractionUnsupported)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
}

/// One line of the delivery log: one attempt's result for one event and destination.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeliveryLogEntry {
    pub attempt: u32,
    pub result: String,
    pub request_at: Timestamp,
    pub response_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// The platform's reference for the request (fbtrace_id, requestId, jobId).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_ref: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DestinationState {
    pub status: DeliveryStatus,
    /// Attempts started (claims taken), including ones that crashed before recording.
    #[serde(default)]
    pub attempts: u32,
    /// The attempt count when an operator last redrove this pair from the dead-letter queue:
    /// the retry budget counts from there.
    #[serde(default)]
    pub attempts_base: u32,
    pub updated_at: Timestamp,
    /// When a `retry` is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<Timestamp>,
    /// When a `sending` claim lapses and another worker may take over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<ErrorInfo>,
    /// Why the consent gate allowed or blocked this destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<DeliveryLogEntry>,
}

/// What a claim attempt finds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claimability {
    Claimable,
    /// Delivered already: a replay, acknowledge without sending.
    AlreadyDelivered,
    /// Another worker holds a live lease.
    Leased {
        until: Timestamp,
    },
    /// A retry that is not due yet (an early redelivery).
    NotDue {
        at: Timestamp,
    },
    /// Terminal without delivery (blocked, rejected): nothing to send.
    Closed(DeliveryStatus),
}

impl DestinationState {
    pub fn new(status: DeliveryStatus, now: Timestamp) -> Self {
        DestinationState {
            status,
            attempts: 0,
            attempts_base: 0,
            updated_at: now,
            next_attempt_at: None,
            lease_until: None,
            last_error: None,
            consent_reason: None,
            log: Vec::new(),
        }
    }

    /// The claim rule, in one place: the DynamoDB adapter's condition expression encodes
    /// exactly this, and the emulator tests check the two agree.
    pub fn claimability(&self, now: Timestamp) -> Claimability {
        match self.status {
            DeliveryStatus::Pending | DeliveryStatus::DeadLetter => Claimability::Claimable,
            DeliveryStatus::Retry => match self.next_attempt_at {
                Some(at) if at > now => Claimability::NotDue { at },
                _ => Claimability::Claimable,
            },
            DeliveryStatus::Sending => match self.lease_until {
                Some(until) if until > now => Claimability::Leased { until },
                _ => Claimability::Claimable,
            },
            s if s.is_delivered() => Claimability::AlreadyDelivered,
            s => Claimability::Closed(s),
        }
    }

    /// When the reconciliation sweep should look at this pair if nothing moved it on: a
    /// pending event's message should have been processed by then, a lease should have ended,
    /// a retry's message should have come back. `None` once the pair is closed.
    pub fn sweep_due(&self) -> Option<Timestamp> {
        match self.status {
            DeliveryStatus::Pending => Some(self.updated_at.plus_secs(SWEEP_GRACE_SECS)),
            DeliveryStatus::Sending => Some(
                self.lease_until
                    .unwrap_or(self.updated_at)
                    .plus_secs(SWEEP_GRACE_SECS),
            ),
            DeliveryStatus::Retry => Some(
                self.next_attempt_at
                    .unwrap_or(self.updated_at)
                    .plus_secs(SWEEP_GRACE_SECS),
            ),
            _ => None,
        }
    }

    /// Attempts since the last dead-letter redrive: what the retry limit is compared with.
    pub fn attempts_in_budget(&self) -> u32 {
        self.attempts.saturating_sub(self.attempts_base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_rules() {
        let now = Timestamp::from_unix_secs(1_800_000_000);
        let mut s = DestinationState::new(DeliveryStatus::Pending, now);
        assert_eq!(s.claimability(now), Claimability::Claimable);
        s.status = DeliveryStatus::Sending;
        s.lease_until = Some(now.plus_secs(30));
        assert_eq!(
            s.claimability(now),
            Claimability::Leased {
                until: now.plus_secs(30)
            }
        );
        assert_eq!(
            s.claimability(now.plus_secs(31)),
            Claimability::Claimable,
            "expired lease"
        );
        s.status = DeliveryStatus::Retry;
        s.next_attempt_at = Some(now.plus_secs(60));
        assert_eq!(
            s.claimability(now),
            Claimability::NotDue {
                at: now.plus_secs(60)
            }
        );
        assert_eq!(s.claimability(now.plus_secs(60)), Claimability::Claimable);
        s.status = DeliveryStatus::Delivered;
        assert_eq!(s.claimability(now), Claimability::AlreadyDelivered);
        s.status = DeliveryStatus::DeadLetter;
        assert_eq!(
            s.claimability(now),
            Claimability::Claimable,
            "a console redrive may resend"
        );
        s.status = DeliveryStatus::BlockedConsent;
        assert_eq!(
            s.claimability(now),
            Claimability::Closed(DeliveryStatus::BlockedConsent)
        );
    }

    #[test]
    fn status_names_round_trip() {
        for s in [
            "pending",
            "sending",
            "retry",
            "delivered",
            "retraction_unsupported",
            "blocked_consent",
            "rejected",
            "rejected_not_system_of_record",
            "dead_letter",
        ] {
            assert_eq!(DeliveryStatus::parse(s).unwrap().as_str(), s);
        }
        assert_eq!(Destination::parse("meta"), Some(Destination::Meta));
        assert_eq!(Destination::parse("tiktok"), None);
    }
}
