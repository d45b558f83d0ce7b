//! Destinations and the per-(event, destination) delivery state machine every sender shares,
//! with the claim rule in one place, and the one vocabulary for what happened to a pair.

use super::code::ErrorCode;
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

/// Delivery log entries kept per (event, destination): the newest ones. Every state write
/// rewrites the whole item (and DynamoDB bills it by size), so the log is bounded; `attempts`
/// keeps the full count.
pub const LOG_KEEP: usize = 10;

/// Longest error message kept in the store and logs: a platform's message is for a person,
/// and an unbounded one could grow an item past DynamoDB's 400 KB limit.
pub const MAX_ERROR_MESSAGE: usize = 500;

/// Where one (event, destination) pair stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Stored, a delivery message enqueued (or to be re-enqueued by the sweep).
    Pending,
    /// Claimed by a sender until its lease expires.
    Sending,
    /// Not sent yet: failed transiently, or waiting (a refund for its won); due again at
    /// `next_attempt_at`.
    Retry,
    Delivered,
    /// The platform cannot retract (Data Manager): restated to zero instead.
    RetractionUnsupported,
    BlockedConsent,
    /// Can never be valid for this platform (e.g. too old, no usable identifier).
    Rejected,
    /// A revenue event from a source that is not the system of record.
    RejectedNotSystemOfRecord,
    /// A won whose order already has a delivered or in-flight won for this destination: the
    /// order is counted once, so this one is never sent.
    DuplicateOrder,
    /// A refund whose won could not be confirmed processed by the platform before its
    /// deadline (Data Manager): never sent, since an unmatched restatement would create a
    /// conversion of its own.
    Unconfirmed,
    /// Permanent platform error, or out of attempts: the message went to the dead-letter queue.
    DeadLetter,
}

impl DeliveryStatus {
    pub const ALL: [DeliveryStatus; 11] = [
        Self::Pending,
        Self::Sending,
        Self::Retry,
        Self::Delivered,
        Self::RetractionUnsupported,
        Self::BlockedConsent,
        Self::Rejected,
        Self::RejectedNotSystemOfRecord,
        Self::DuplicateOrder,
        Self::Unconfirmed,
        Self::DeadLetter,
    ];

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
            Self::DuplicateOrder => "duplicate_order",
            Self::Unconfirmed => "unconfirmed",
            Self::DeadLetter => "dead_letter",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
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

impl fmt::Display for DeliveryStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to one delivery message or attempt: the words of the delivery log, the
/// sender's batch report, its logs and its metrics, so one thing is called one name.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum PairResult {
    /// Sent, and the platform accepted it.
    Delivered,
    /// Sent, and the platform said it already had it (a replay it deduplicated).
    DeliveredReplay,
    /// Not sent: the store says it was delivered already (SQS redelivery, a stray message).
    AlreadyDelivered,
    /// Failed transiently; retried later.
    Retry,
    /// Not sent: waiting for something else first (a refund for its won, a platform's
    /// confirmation); does not spend the attempt budget.
    Waiting,
    /// Not sent: the invocation ran out of time before its turn; does not spend the budget.
    OutOfTime,
    Rejected,
    DeadLetter,
    DuplicateOrder,
    Unconfirmed,
    /// Nothing to send: the pair was closed before (blocked, rejected, dead-lettered...).
    Closed,
    /// Another worker holds the pair, or its retry is not due: the message waits.
    Deferred,
    /// This worker's lease lapsed and another took over; its result stands.
    LeaseLost,
    StoreUnavailable,
    /// The message names an event the store does not hold (expired, or never written).
    Missing,
    /// The message is not a delivery message.
    Unreadable,
    /// The message belongs to another destination's queue.
    WrongDestination,
}

impl PairResult {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::DeliveredReplay => "delivered_replay",
            Self::AlreadyDelivered => "already_delivered",
            Self::Retry => "retry",
            Self::Waiting => "waiting",
            Self::OutOfTime => "out_of_time",
            Self::Rejected => "rejected",
            Self::DeadLetter => "dead_letter",
            Self::DuplicateOrder => "duplicate_order",
            Self::Unconfirmed => "unconfirmed",
            Self::Closed => "closed",
            Self::Deferred => "deferred",
            Self::LeaseLost => "lease_lost",
            Self::StoreUnavailable => "store_unavailable",
            Self::Missing => "missing",
            Self::Unreadable => "unreadable",
            Self::WrongDestination => "wrong_destination",
        }
    }

    /// A send the platform took (new or a replay).
    pub fn is_delivered(&self) -> bool {
        matches!(self, Self::Delivered | Self::DeliveredReplay)
    }
}

impl fmt::Display for PairResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an attempt did not deliver: a code to act on and the words to read.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ErrorInfo {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorInfo {
    /// An error with its message bounded to [`MAX_ERROR_MESSAGE`] characters.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let message: String = message.into();
        let message = if message.chars().count() > MAX_ERROR_MESSAGE {
            let mut m: String = message.chars().take(MAX_ERROR_MESSAGE).collect();
            m.push('…');
            m
        } else {
            message
        };
        ErrorInfo { code, message }
    }
}

/// One line of the delivery log: one attempt's result for one event and destination.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeliveryLogEntry {
    pub attempt: u32,
    pub result: PairResult,
    pub request_at: Timestamp,
    pub response_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// The platform's reference for the request (fbtrace_id, requestId, jobId).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_ref: Option<String>,
    /// What the event was sent as: the Google conversion action's resource name, or the Meta
    /// event name. A later adjustment must target what was really sent, whatever the mapping
    /// says now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_as: Option<String>,
}

impl DeliveryLogEntry {
    /// Attempt `attempt` ended in `result` at `at`, with no request of its own to time (a wait,
    /// a refusal before sending) and nothing else to note; the other fields are set on top.
    pub fn new(attempt: u32, result: PairResult, at: Timestamp) -> Self {
        DeliveryLogEntry {
            attempt,
            result,
            request_at: at,
            response_at: at,
            error: None,
            platform_ref: None,
            sent_as: None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DestinationState {
    pub status: DeliveryStatus,
    /// Attempts started (claims taken), including ones that crashed before recording.
    #[serde(default)]
    pub attempts: u32,
    /// Attempts that do not count against the retry budget: those before the last operator
    /// redrive from the dead-letter queue, and claims that ended waiting without a send.
    #[serde(default)]
    pub attempts_base: u32,
    pub updated_at: Timestamp,
    /// When a `retry` is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<Timestamp>,
    /// When a `sending` claim lapses and another worker may take over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<Timestamp>,
    /// Since when the pair has been waiting for something else (a refund for its won); the
    /// wait has a deadline of its own, outside the attempt budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_since: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<ErrorInfo>,
    /// Why the consent gate allowed or blocked this destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_reason: Option<String>,
    /// The newest [`LOG_KEEP`] attempts.
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
    /// Terminal without delivery (blocked, rejected, dead-lettered without an operator's
    /// redrive): nothing to send.
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
            waiting_since: None,
            last_error: None,
            consent_reason: None,
            log: Vec::new(),
        }
    }

    /// The claim rule, in one place: the DynamoDB adapter's condition expression encodes
    /// exactly this, and the emulator tests check the two agree.
    ///
    /// `redrive_of` is the dead-letter token a message carries when it went through the DLQ
    /// (the attempt count at which the pair was dead-lettered): only such a message, an
    /// operator's redrive, may re-open a dead-lettered pair. Any other message for it (a stray
    /// duplicate, a sweep) is acknowledged without a send.
    pub fn claimability(&self, now: Timestamp, redrive_of: Option<u32>) -> Claimability {
        match self.status {
            DeliveryStatus::Pending => Claimability::Claimable,
            DeliveryStatus::DeadLetter if redrive_of == Some(self.attempts) => {
                Claimability::Claimable
            }
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

    /// Attempts that count against the retry limit: since the last dead-letter redrive, and
    /// not counting claims that only waited.
    pub fn attempts_in_budget(&self) -> u32 {
        self.attempts.saturating_sub(self.attempts_base)
    }

    /// The log with `entry` appended, keeping the newest [`LOG_KEEP`] entries.
    pub fn log_with(&self, entry: DeliveryLogEntry) -> Vec<DeliveryLogEntry> {
        let skip = (self.log.len() + 1).saturating_sub(LOG_KEEP);
        self.log
            .iter()
            .skip(skip)
            .cloned()
            .chain(std::iter::once(entry))
            .collect()
    }

    /// What the pair was last delivered as (the newest delivered log entry's `sent_as`).
    pub fn delivered_as(&self) -> Option<&str> {
        self.log
            .iter()
            .rev()
            .find(|l| l.result.is_delivered())
            .and_then(|l| l.sent_as.as_deref())
    }

    /// The platform reference of the newest delivered attempt.
    pub fn delivered_ref(&self) -> Option<&str> {
        self.log
            .iter()
            .rev()
            .find(|l| l.result.is_delivered())
            .and_then(|l| l.platform_ref.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_rules() {
        let now = Timestamp::from_unix_secs(1_800_000_000);
        let mut s = DestinationState::new(DeliveryStatus::Pending, now);
        assert_eq!(s.claimability(now, None), Claimability::Claimable);
        s.status = DeliveryStatus::Sending;
        s.lease_until = Some(now.plus_secs(30));
        assert_eq!(
            s.claimability(now, None),
            Claimability::Leased {
                until: now.plus_secs(30)
            }
        );
        assert_eq!(
            s.claimability(now.plus_secs(31), None),
            Claimability::Claimable,
            "expired lease"
        );
        s.status = DeliveryStatus::Retry;
        s.next_attempt_at = Some(now.plus_secs(60));
        assert_eq!(
            s.claimability(now, None),
            Claimability::NotDue {
                at: now.plus_secs(60)
            }
        );
        assert_eq!(
            s.claimability(now.plus_secs(60), None),
            Claimability::Claimable
        );
        s.status = DeliveryStatus::Delivered;
        assert_eq!(s.claimability(now, None), Claimability::AlreadyDelivered);
        s.status = DeliveryStatus::BlockedConsent;
        assert_eq!(
            s.claimability(now, None),
            Claimability::Closed(DeliveryStatus::BlockedConsent)
        );
    }

    #[test]
    fn only_an_operator_redrive_reopens_a_dead_lettered_pair() {
        let now = Timestamp::from_unix_secs(1_800_000_000);
        let mut s = DestinationState::new(DeliveryStatus::DeadLetter, now);
        s.attempts = 8;
        s.attempts_base = 8;
        let closed = Claimability::Closed(DeliveryStatus::DeadLetter);
        assert_eq!(s.claimability(now, None), closed, "a stray message");
        assert_eq!(s.claimability(now, Some(7)), closed, "an older redrive");
        assert_eq!(
            s.claimability(now, Some(8)),
            Claimability::Claimable,
            "the message the DLQ holds for this dead-lettering"
        );
    }

    #[test]
    fn status_names_round_trip() {
        for s in DeliveryStatus::ALL {
            assert_eq!(DeliveryStatus::parse(s.as_str()), Some(s));
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
        assert_eq!(Destination::parse("meta"), Some(Destination::Meta));
        assert_eq!(Destination::parse("tiktok"), None);
        let r: PairResult = serde_json::from_str("\"delivered_replay\"").unwrap();
        assert_eq!(r.as_str(), "delivered_replay");
    }

    #[test]
    fn the_log_keeps_the_newest_entries() {
        let now = Timestamp::from_unix_secs(1_800_000_000);
        let mut s = DestinationState::new(DeliveryStatus::Pending, now);
        for attempt in 1..=25 {
            s.log = s.log_with(DeliveryLogEntry::new(attempt, PairResult::Retry, now));
        }
        assert_eq!(s.log.len(), LOG_KEEP);
        assert_eq!(s.log[0].attempt, 16);
        assert_eq!(s.log[LOG_KEEP - 1].attempt, 25);
    }

    #[test]
    fn error_messages_are_bounded() {
        let e = ErrorInfo::new(ErrorCode::platform("X"), "y".repeat(10_000));
        assert_eq!(e.message.chars().count(), MAX_ERROR_MESSAGE + 1);
    }
}
