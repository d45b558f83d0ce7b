//! The event store port: the audit log and replay source, with conditional writes for
//! idempotency and for claiming deliveries.

pub mod memory;

use crate::delivery::{Claimability, DeliveryLogEntry, DeliveryStatus, Destination, ErrorInfo};
use crate::event::CanonicalEvent;
use crate::timestamp::Timestamp;
use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or refused the call (throttling, network, permissions).
    #[error("event store unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// An item that cannot be read back into an event.
    #[error("stored item {key} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
}

#[derive(Debug, Clone, PartialEq)]
pub enum PutOutcome {
    Created,
    /// An event with this event_id already exists; nothing was changed.
    Duplicate,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClaimOutcome {
    /// This worker now holds the lease; the event as stored after the claim.
    Claimed(Box<CanonicalEvent>),
    /// Someone else holds it, it is done, or not due: the reason and the event as stored.
    Refused(Claimability, Box<CanonicalEvent>),
    /// No such event, or the event has no state for this destination.
    Missing,
}

/// The state a claimed delivery moves to when its attempt ends.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub status: DeliveryStatus,
    pub now: Timestamp,
    pub next_attempt_at: Option<Timestamp>,
    pub error: Option<ErrorInfo>,
    pub log: DeliveryLogEntry,
}

/// An (event, destination) that the sweep should look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckRef {
    pub event_id: String,
    pub destination: Destination,
    pub status: DeliveryStatus,
    pub due: Timestamp,
}

#[async_trait]
pub trait EventStore: Send + Sync {
    /// Writes the event only if no event with its id exists (the idempotency gate).
    async fn put_new(&self, event: &CanonicalEvent) -> Result<PutOutcome, StoreError>;

    async fn get(&self, event_id: &str) -> Result<Option<CanonicalEvent>, StoreError>;

    /// Several events in as few round trips as the store allows; missing ids are left out.
    async fn get_many(&self, event_ids: &[String]) -> Result<Vec<CanonicalEvent>, StoreError>;

    /// Every revenue event (won and refunds) with this order id, oldest first.
    async fn find_by_order(&self, order_id: &str) -> Result<Vec<CanonicalEvent>, StoreError>;

    /// Moves (event, destination) to `sending` with a lease until `lease_until`, only if it is
    /// claimable (see [`crate::delivery::DestinationState::claimability`]). Two workers can
    /// never both win.
    async fn claim(
        &self,
        event_id: &str,
        destination: Destination,
        now: Timestamp,
        lease_until: Timestamp,
    ) -> Result<ClaimOutcome, StoreError>;

    /// Ends the attempt numbered `attempt` with `transition` and appends its log entry, only if
    /// that claim is still the current one. `Ok(false)`: the lease was lost to another worker,
    /// whose result stands.
    async fn complete(
        &self,
        event_id: &str,
        destination: Destination,
        attempt: u32,
        transition: &Transition,
    ) -> Result<bool, StoreError>;

    /// Open (pending, sending, retry) pairs for `destination` that the sweep should have seen
    /// progress on by `before`, oldest first.
    async fn stuck(
        &self,
        destination: Destination,
        before: Timestamp,
        limit: usize,
    ) -> Result<Vec<StuckRef>, StoreError>;

    /// Moves the sweep's next look at an open pair to `due`, if it is still in `status`, so
    /// one stuck event is re-enqueued once per grace period rather than on every sweep.
    async fn defer_sweep(
        &self,
        event_id: &str,
        destination: Destination,
        status: DeliveryStatus,
        due: Timestamp,
    ) -> Result<bool, StoreError>;

    /// Every stored event whose business time (`occurred_at`) is in `[from, to)`, for the
    /// reconciliation report. The DynamoDB adapter scans with a filter: its cost grows with
    /// the table, which suits a daily report over a CRM's volume; a by-day index is the next
    /// step if it ever does not.
    async fn events_between(
        &self,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<CanonicalEvent>, StoreError>;
}
