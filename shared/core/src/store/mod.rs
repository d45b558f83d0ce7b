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
    /// The item would exceed the store's item size limit: retrying cannot help.
    #[error("item {key} is too large to store: {reason}")]
    TooLarge { key: String, reason: String },
}

#[derive(Debug, Clone, PartialEq)]
pub enum PutOutcome {
    Created,
    /// Created; but another source already used this caller-provided event_id. Both events are
    /// kept, each under its own source's key; the collision is reported.
    CreatedWithConflict {
        other_source: String,
    },
    /// An event with this key already exists; nothing was changed.
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
    /// The pair's whole delivery log after this attempt (bounded; see `LOG_KEEP`).
    pub log: Vec<DeliveryLogEntry>,
    /// The attempt did not count against the retry budget (it only waited, or never started).
    pub release_attempt: bool,
    /// Since when the pair waits for something else; `None` ends a wait.
    pub waiting_since: Option<Timestamp>,
    /// This closes the event's last open pair: its IP address and user agent are removed in
    /// the same write (nothing will be sent again that needs them).
    pub scrub_browser: bool,
}

/// What to remove from a stored event's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scrub {
    /// The IP address and user agent.
    Browser,
    /// The click and browser ids (gclid, gbraid, wbraid, fbc, fbp, lead id).
    ClickIds,
    /// Every identifier, hashed or not (an erasure).
    All,
}

impl Transition {
    /// The entry this attempt added to the log.
    pub fn entry(&self) -> Option<&DeliveryLogEntry> {
        self.log.last()
    }
}

/// Who holds an order for one destination: the one won counted for it there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderHold {
    /// The caller's event holds it; `first` when this call created the hold (no event held the
    /// order for this destination before).
    Held { first: bool },
    /// Another event (its store key) holds it.
    HeldBy(String),
}

/// An (event, destination) that the sweep should look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckRef {
    /// The event's store key (see `CanonicalEvent::key`).
    pub key: String,
    pub destination: Destination,
    pub status: DeliveryStatus,
    pub due: Timestamp,
}

/// Events are addressed by their store key: the event_id when derived here (the source is
/// in its hash), else `<source>:<event_id>`, so a caller-provided id can never claim another
/// source's event.
#[async_trait]
pub trait EventStore: Send + Sync {
    /// Writes the event only if no event with its key exists (the idempotency gate).
    async fn put_new(&self, event: &CanonicalEvent) -> Result<PutOutcome, StoreError>;

    async fn get(&self, key: &str) -> Result<Option<CanonicalEvent>, StoreError>;

    /// Several events in as few round trips as the store allows; missing keys are left out.
    async fn get_many(&self, keys: &[String]) -> Result<Vec<CanonicalEvent>, StoreError>;

    /// Every revenue event (won and refunds) with this order id, oldest first, read
    /// consistently.
    async fn find_by_order(&self, order_id: &str) -> Result<Vec<CanonicalEvent>, StoreError>;

    /// Moves (event, destination) to `sending` with a lease until `lease_until`, only if it is
    /// claimable (see [`crate::delivery::DestinationState::claimability`]; `redrive_of` is the
    /// dead-letter token of a message that went through the DLQ). Two workers can never both
    /// win.
    async fn claim(
        &self,
        key: &str,
        destination: Destination,
        now: Timestamp,
        lease_until: Timestamp,
        redrive_of: Option<u32>,
    ) -> Result<ClaimOutcome, StoreError>;

    /// Ends the attempt numbered `attempt` with `transition` (state and log), only if that
    /// claim is still the current one. `Ok(false)`: the lease was lost to another worker,
    /// whose result stands.
    async fn complete(
        &self,
        key: &str,
        destination: Destination,
        attempt: u32,
        transition: &Transition,
    ) -> Result<bool, StoreError>;

    /// Makes `key` the won that counts for `order_id` at `destination`, unless another event
    /// holds it: one atomic conditional write on an order-level item, so two wons of one order
    /// can never both be sent.
    async fn hold_order(
        &self,
        order_id: &str,
        destination: Destination,
        key: &str,
    ) -> Result<OrderHold, StoreError>;

    /// Moves the hold of `order_id` at `destination` from `from` to `to`, only if `from` still
    /// holds it. `Ok(false)`: someone else moved it first.
    async fn take_over_order(
        &self,
        order_id: &str,
        destination: Destination,
        from: &str,
        to: &str,
    ) -> Result<bool, StoreError>;

    /// The earliest time a value of this `kind` (a hash, never a raw value) was seen, recording
    /// `at` when it is earlier: an atomic minimum. Used for when a click id was first carried
    /// by an event, the creation time Meta wants in `fbc`.
    async fn first_seen(
        &self,
        kind: &str,
        value: &str,
        at: Timestamp,
    ) -> Result<Timestamp, StoreError>;

    /// Removes `what` from the event's identity; `Ok(false)` when there is no such event.
    async fn scrub(&self, key: &str, what: Scrub, now: Timestamp) -> Result<bool, StoreError>;

    /// Events still holding identifiers the retention rules may remove: an IP address or user
    /// agent on any event, click ids on events whose business time is before `clicks_before`.
    /// At most `limit` of them.
    async fn retention_candidates(
        &self,
        clicks_before: Timestamp,
        limit: usize,
    ) -> Result<Vec<CanonicalEvent>, StoreError>;

    /// Events an erasure request names: those of `entity` (source, entity id), and those
    /// carrying any of `hashes` (a Meta or Google email or phone hash). A scan: an operator's
    /// command, rare by nature.
    async fn find_for_erasure(
        &self,
        entity: Option<(&str, &str)>,
        hashes: &[String],
    ) -> Result<Vec<CanonicalEvent>, StoreError>;

    /// Open (pending, sending, retry) pairs for `destination` that the sweep should have seen
    /// progress on by `before`, oldest first. A pair's time is set when it opens (ingest, a
    /// result that leaves it open, a redrive) and by `defer_sweep`; a claim leaves it (and the
    /// status it was set with) as it was, since moving an index key is billed twice.
    async fn stuck(
        &self,
        destination: Destination,
        before: Timestamp,
        limit: usize,
    ) -> Result<Vec<StuckRef>, StoreError>;

    /// Moves the sweep's next look at an open pair to `due` (recorded with `status`), if the
    /// pair is still open, so one stuck event is re-enqueued once per grace period rather
    /// than on every sweep.
    async fn defer_sweep(
        &self,
        key: &str,
        destination: Destination,
        status: DeliveryStatus,
        due: Timestamp,
    ) -> Result<bool, StoreError>;

    /// Every stored event whose business time (`occurred_at`) is in `[from, to)`, for the
    /// reconciliation report, which reads no identifier: a store may leave `identity` out.
    /// The DynamoDB adapter scans with a filter: its cost grows with the table, which suits a
    /// daily report over a CRM's volume; a by-day index is the next step if it ever does not.
    async fn events_between(
        &self,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<CanonicalEvent>, StoreError>;
}
