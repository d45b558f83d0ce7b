//! The ingest pipeline: validated inputs become stored canonical events, and each destination
//! the mapping enables and consent allows gets a delivery message. Stored before enqueued.

use crate::consent::ConsentStatus;
use crate::delivery::{DeliveryStatus, Destination, DestinationState};
use crate::event::{CanonicalEvent, FieldError, ValidationContext, validate};
use crate::identity::{HashedIdentity, IdentityWarning, Region};
use crate::mapping::Mapping;
use crate::queue::{DeliveryMessage, DeliveryQueue};
use crate::store::{EventStore, PutOutcome, StoreError};
use crate::timestamp::Timestamp;
use crate::webhook::Incoming;
use futures::future::join_all;
use serde::Serialize;
use std::collections::BTreeMap;

/// Puts in flight at once: enough to hide DynamoDB latency for a 500-item batch, few enough
/// to stay inside a 128 MB function and the table's burst capacity.
const CONCURRENT_PUTS: usize = 32;

#[derive(Clone, Debug)]
pub struct IngestConfig {
    pub default_region: Region,
    pub max_future_skew_secs: i64,
}

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    /// Stored now; delivery messages enqueued for the pending destinations.
    Accepted,
    /// Already stored earlier under this event_id: nothing changed.
    Duplicate,
    Invalid,
    /// A CRM stage the mapping does not map: recorded, nothing stored or sent.
    Unmapped,
    /// Dropped on purpose (a foreign CRM account, a change the CRM's record does not show),
    /// with the reason: nothing stored, no retry wanted.
    Ignored,
    /// A privacy deletion carried out: `erased` events lost every identifier.
    Erased,
    /// The store could not be written: the caller must retry.
    Unavailable,
}

/// The answer for one item of a webhook delivery, in request order.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct ItemResult {
    pub index: usize,
    pub status: ItemStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// The event's key in the store when it is not the event_id (a caller-provided id is kept
    /// under `source:event_id`): what the backfill and replay commands take.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub destinations: BTreeMap<Destination, DeliveryStatus>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<IdentityWarning>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// The caller-provided event_id was already used by another source: both events are kept
    /// (each under its own source), and sent with the id as given, so a platform that
    /// deduplicates on it may count only one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conflict: Option<FieldError>,
    /// For a privacy deletion: how many stored events were erased.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub erased: Option<usize>,
}

impl ItemResult {
    fn new(index: usize, status: ItemStatus) -> Self {
        ItemResult {
            index,
            status,
            event_id: None,
            key: None,
            duplicate: false,
            errors: Vec::new(),
            destinations: BTreeMap::new(),
            warnings: Vec::new(),
            stage: None,
            conflict: None,
            erased: None,
        }
    }
}

#[derive(Debug, Default)]
pub struct IngestReport {
    pub results: Vec<ItemResult>,
    /// Set when a CRM read was throttled: the caller should retry after this many seconds
    /// (HTTP 429 with Retry-After).
    pub retry_after_secs: Option<u64>,
    /// Delivery messages that could not be enqueued; their events stay `pending` and the
    /// reconciliation sweep re-enqueues them.
    pub enqueue_failures: usize,
}

impl IngestReport {
    pub fn any(&self, s: ItemStatus) -> bool {
        self.results.iter().any(|r| r.status == s)
    }
}

/// Decides each destination's initial state: `rejected_not_system_of_record` for revenue from
/// a source that is not the system of record, else the consent gate's answer. When nothing
/// will be sent, the identifiers are dropped: the store keeps only what the audit needs.
pub fn plan_destinations(event: &mut CanonicalEvent, mapping: &Mapping) {
    let not_sor = event.event_name.is_revenue() && !mapping.is_system_of_record(&event.source);
    for d in mapping.destinations_for(event.event_name) {
        let mut state;
        if not_sor {
            state =
                DestinationState::new(DeliveryStatus::RejectedNotSystemOfRecord, event.received_at);
        } else {
            let decision = event.consent.decide(d);
            let status = if decision.allowed {
                DeliveryStatus::Pending
            } else {
                DeliveryStatus::BlockedConsent
            };
            state = DestinationState::new(status, event.received_at);
            state.consent_reason = Some(decision.reason);
        }
        event.destinations.insert(d, state);
    }
    if !event
        .destinations
        .values()
        .any(|s| s.status == DeliveryStatus::Pending)
    {
        event.identity = HashedIdentity::default();
    }
}

/// Fills in, for each event carrying an fbclid without saying when it was first seen, the
/// business time of the first event that carried it (Meta's fbc creation time), so every stage
/// of one lead sends the same fbc. Only the click id's hash reaches the store. A store failure
/// leaves the event's own time.
async fn first_seen_click_ids(items: &mut [Incoming], store: &dyn EventStore) {
    let wanted: Vec<(usize, String, Timestamp)> = items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| {
            let Incoming::Event(input) = item else {
                return None;
            };
            let id = &input.identity;
            let fbclid = id
                .fbclid
                .as_deref()
                .map(str::trim)
                .filter(|v| !v.is_empty())?;
            if id.fbc.is_some() || id.fbclid_at.is_some() {
                return None;
            }
            let at = Timestamp::parse_rfc3339(input.occurred_at.as_deref()?).ok()?;
            Some((i, crate::hashing::sha256_hex(fbclid), at))
        })
        .collect();
    for chunk in wanted.chunks(CONCURRENT_PUTS) {
        let seen = join_all(
            chunk
                .iter()
                .map(|(_, hash, at)| store.first_seen("fbclid", hash, *at)),
        )
        .await;
        for ((i, _, _), t) in chunk.iter().zip(seen) {
            if let (Ok(t), Incoming::Event(input)) = (t, &mut items[*i]) {
                input.identity.fbclid_at = Some(t.canonical());
            }
        }
    }
}

/// What an ingest reads and writes through: the mapping contract and the ingest settings it
/// follows, the event store it writes first and the delivery queues it fills. One value for
/// every way in (webhooks, backfill, a CRM check's repair).
#[derive(Clone, Copy)]
pub struct Intake<'a> {
    pub mapping: &'a Mapping,
    pub cfg: &'a IngestConfig,
    pub store: &'a dyn EventStore,
    pub queue: &'a dyn DeliveryQueue,
}

impl<'a> Intake<'a> {
    pub fn new(
        mapping: &'a Mapping,
        cfg: &'a IngestConfig,
        store: &'a dyn EventStore,
        queue: &'a dyn DeliveryQueue,
    ) -> Self {
        Intake {
            mapping,
            cfg,
            store,
            queue,
        }
    }
}

/// Runs one webhook delivery from `source` through validation, the conditional write and the
/// enqueue. Every item gets a result; one bad item never stops the others.
pub async fn ingest(
    items: Vec<Incoming>,
    source: &str,
    to: Intake<'_>,
    now: Timestamp,
) -> IngestReport {
    let Intake {
        mapping,
        cfg,
        store,
        queue,
    } = to;
    let default_consent = mapping
        .source(source)
        .map_or(ConsentStatus::Unknown, |s| s.consent_default);
    let ctx = ValidationContext {
        now,
        max_future_skew_secs: cfg.max_future_skew_secs,
        default_region: cfg.default_region,
        mapping_version: mapping.version.clone(),
        default_consent,
    };

    let mut items = items;
    first_seen_click_ids(&mut items, store).await;

    // Validate everything first (CPU only), then write the valid events concurrently.
    let mut results: Vec<ItemResult> = Vec::with_capacity(items.len());
    let mut throttled: Option<u64> = None;
    let mut to_store: Vec<(usize, CanonicalEvent)> = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        match item {
            Incoming::Invalid(errors) => {
                let mut r = ItemResult::new(index, ItemStatus::Invalid);
                r.errors = errors;
                results.push(r);
            }
            Incoming::Unmapped { stage } => {
                tracing::info!(source, stage = %stage, result = "unmapped", "stage not in the mapping contract");
                let mut r = ItemResult::new(index, ItemStatus::Unmapped);
                r.stage = Some(stage);
                results.push(r);
            }
            Incoming::Ignored(reason) => {
                tracing::info!(source, result = "ignored", field = %reason.field, reason = %reason.reason, "item dropped");
                let mut r = ItemResult::new(index, ItemStatus::Ignored);
                r.errors = vec![reason];
                results.push(r);
            }
            Incoming::Erase {
                source: src,
                entity_id,
            } => {
                let req = crate::privacy::ErasureRequest {
                    entity: Some((src, entity_id)),
                    ..Default::default()
                };
                match crate::privacy::erase(store, &req, now).await {
                    Ok(report) => {
                        let mut r = ItemResult::new(index, ItemStatus::Erased);
                        r.erased = Some(report.erased.len());
                        results.push(r);
                    }
                    Err(e) => {
                        tracing::error!(source, result = "unavailable", error = %e, "erasure failed");
                        let mut r = ItemResult::new(index, ItemStatus::Unavailable);
                        r.errors = vec![FieldError::new(
                            "$",
                            "the erasure could not be completed; retry the request",
                        )];
                        results.push(r);
                    }
                }
            }
            Incoming::Stored { event_id } => {
                let mut r = ItemResult::new(index, ItemStatus::Duplicate);
                r.duplicate = true;
                r.event_id = Some(event_id);
                results.push(r);
            }
            Incoming::Throttled { retry_after_secs } => {
                tracing::warn!(source, result = "throttled", "CRM read throttled");
                throttled = Some(throttled.unwrap_or(0).max(retry_after_secs.unwrap_or(1)));
                let mut r = ItemResult::new(index, ItemStatus::Unavailable);
                r.errors = vec![FieldError::new(
                    "$",
                    "the CRM's API throttled reading the record; retry later",
                )];
                results.push(r);
            }
            Incoming::Unavailable(reason) => {
                tracing::warn!(source, result = "unavailable", reason = %reason, "item could not be completed");
                let mut r = ItemResult::new(index, ItemStatus::Unavailable);
                r.errors = vec![FieldError::new(
                    "$",
                    "a CRM record could not be read; retry the request",
                )];
                results.push(r);
            }
            Incoming::Event(mut input) => {
                match input.source.as_deref() {
                    None | Some("") => input.source = Some(source.to_string()),
                    Some(s) if s == source => {}
                    Some(_) => {
                        let mut r = ItemResult::new(index, ItemStatus::Invalid);
                        r.errors = vec![FieldError::new(
                            "source",
                            format!("must be `{source}` (the webhook path's source) or absent"),
                        )];
                        results.push(r);
                        continue;
                    }
                }
                match validate(&input, &ctx) {
                    Ok(mut event) => {
                        plan_destinations(&mut event, mapping);
                        results.push(ItemResult::new(index, ItemStatus::Accepted));
                        to_store.push((index, event));
                    }
                    Err(errors) => {
                        let mut r = ItemResult::new(index, ItemStatus::Invalid);
                        r.errors = errors;
                        results.push(r);
                    }
                }
            }
        }
    }

    let mut messages = Vec::new();
    for chunk in to_store.chunks(CONCURRENT_PUTS) {
        let outcomes = join_all(chunk.iter().map(|(_, e)| store.put_new(e))).await;
        for ((index, event), outcome) in chunk.iter().zip(outcomes) {
            let r = &mut results[*index];
            r.event_id = Some(event.event_id.clone());
            if event.key != event.event_id {
                r.key = Some(event.key.clone());
            }
            match outcome {
                Ok(created @ (PutOutcome::Created | PutOutcome::CreatedWithConflict { .. })) => {
                    if let PutOutcome::CreatedWithConflict { other_source } = created {
                        tracing::warn!(event_id = %event.event_id, source, other_source = %other_source, result = "id_conflict", "another source already used this event_id");
                        r.conflict = Some(FieldError::new(
                            "event_id",
                            format!(
                                "source `{other_source}` already sent an event with this event_id; both are kept, each under its own source, but a platform that deduplicates on the id may count only one"
                            ),
                        ));
                    }
                    r.destinations = event
                        .destinations
                        .iter()
                        .map(|(d, s)| (*d, s.status))
                        .collect();
                    r.warnings = event.warnings.clone();
                    for (d, s) in &event.destinations {
                        if s.status == DeliveryStatus::Pending {
                            messages.push(DeliveryMessage::new(event.key.clone(), *d));
                        }
                    }
                    tracing::info!(event_id = %event.event_id, source, event_name = %event.event_name, result = "accepted", "event stored");
                }
                Ok(PutOutcome::Duplicate) => {
                    r.status = ItemStatus::Duplicate;
                    r.duplicate = true;
                    tracing::info!(event_id = %event.event_id, source, event_name = %event.event_name, result = "duplicate", "event already stored");
                }
                Err(StoreError::TooLarge { reason, .. }) => {
                    r.status = ItemStatus::Invalid;
                    r.errors = vec![FieldError::new(
                        "$",
                        format!(
                            "the event is too large to store ({reason}); shorten its longest fields"
                        ),
                    )];
                    tracing::warn!(event_id = %event.event_id, source, result = "invalid", reason = %reason, "event too large to store");
                }
                Err(e) => {
                    r.status = ItemStatus::Unavailable;
                    r.errors = vec![FieldError::new(
                        "$",
                        "the event store is unavailable; retry the request",
                    )];
                    tracing::error!(event_id = %event.event_id, source, event_name = %event.event_name, result = "unavailable", error = %e, "store write failed");
                }
            }
        }
    }

    let failed = if messages.is_empty() {
        Vec::new()
    } else {
        queue.enqueue(&messages).await
    };
    for m in &failed {
        tracing::warn!(key = %m.key, destination = %m.destination, result = "enqueue_failed", "left pending for the reconciliation sweep");
    }
    IngestReport {
        results,
        retry_after_secs: throttled,
        enqueue_failures: failed.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_event_json;
    use crate::queue::memory::MemoryQueue;
    use crate::store::memory::MemoryStore;
    use serde_json::json;
    use std::time::Duration;

    fn cfg() -> IngestConfig {
        IngestConfig {
            default_region: Region::US,
            max_future_skew_secs: 300,
        }
    }

    fn now() -> Timestamp {
        Timestamp::parse_rfc3339("2026-11-28T12:00:00Z").unwrap()
    }

    fn item(v: serde_json::Value) -> Incoming {
        match parse_event_json(&v.to_string()) {
            Ok(i) => Incoming::Event(Box::new(i)),
            Err(e) => Incoming::Invalid(e),
        }
    }

    fn won(consent: &str) -> serde_json::Value {
        json!({"event_name": "won", "occurred_at": "2026-11-27T10:00:00Z", "entity_type": "opportunity",
               "entity_id": "D-1", "order_id": "O-1", "value": 100, "currency": "USD",
               "identity": {"email": "a@example.com", "gclid": "abc"}, "consent": {"status": consent}})
    }

    async fn run(
        items: Vec<Incoming>,
        source: &str,
        store: &MemoryStore,
        queue: &MemoryQueue,
    ) -> IngestReport {
        let mapping = Mapping::bundled().unwrap();
        ingest(
            items,
            source,
            Intake::new(&mapping, &cfg(), store, queue),
            now(),
        )
        .await
    }

    #[tokio::test]
    async fn accepted_event_is_stored_then_enqueued_per_destination() {
        let (store, queue) = (
            MemoryStore::new(),
            MemoryQueue::new(5, Duration::from_secs(30)),
        );
        let r = run(vec![item(won("granted"))], "hubspot", &store, &queue).await;
        assert_eq!(r.results[0].status, ItemStatus::Accepted);
        let id = r.results[0].event_id.clone().unwrap();
        let stored = store.get_sync(&id);
        assert_eq!(
            stored.destinations[&Destination::Meta].status,
            DeliveryStatus::Pending
        );
        assert_eq!(
            stored.destinations[&Destination::Meta]
                .consent_reason
                .as_deref(),
            Some("consent granted (payload)")
        );
        assert_eq!(queue.depth(Destination::Meta), 1);
        assert_eq!(queue.depth(Destination::Google), 1);
        assert!(stored.identity.meta.em.is_some());
    }

    #[tokio::test]
    async fn the_same_webhook_ten_times_is_one_event_and_one_enqueue_per_destination() {
        let (store, queue) = (
            MemoryStore::new(),
            MemoryQueue::new(5, Duration::from_secs(30)),
        );
        for n in 0..10 {
            let r = run(vec![item(won("granted"))], "hubspot", &store, &queue).await;
            let want = if n == 0 {
                ItemStatus::Accepted
            } else {
                ItemStatus::Duplicate
            };
            assert_eq!(r.results[0].status, want);
            assert_eq!(r.results[0].duplicate, n > 0);
        }
        assert_eq!(store.len(), 1);
        assert_eq!(
            (
                queue.depth(Destination::Meta),
                queue.depth(Destination::Google)
            ),
            (1, 1)
        );
    }

    #[tokio::test]
    async fn consent_denied_or_unknown_is_stored_blocked_sends_nothing_and_keeps_no_identifiers() {
        for consent in ["denied", "unknown"] {
            let (store, queue) = (
                MemoryStore::new(),
                MemoryQueue::new(5, Duration::from_secs(30)),
            );
            let r = run(vec![item(won(consent))], "hubspot", &store, &queue).await;
            assert_eq!(r.results[0].status, ItemStatus::Accepted);
            let stored = store.get_sync(r.results[0].event_id.as_deref().unwrap());
            for d in Destination::ALL {
                assert_eq!(
                    stored.destinations[&d].status,
                    DeliveryStatus::BlockedConsent
                );
                assert_eq!(
                    stored.destinations[&d].consent_reason.as_deref(),
                    Some(format!("consent {consent} (payload)").as_str())
                );
            }
            assert!(
                stored.identity.is_empty(),
                "no identifiers kept for a blocked event"
            );
            assert_eq!(
                queue.depth(Destination::Meta) + queue.depth(Destination::Google),
                0
            );
        }
    }

    #[tokio::test]
    async fn missing_consent_uses_the_source_default() {
        let (store, queue) = (
            MemoryStore::new(),
            MemoryQueue::new(5, Duration::from_secs(30)),
        );
        let mut v = won("granted");
        v.as_object_mut().unwrap().remove("consent");
        let r = run(vec![item(v)], "hubspot", &store, &queue).await;
        let stored = store.get_sync(r.results[0].event_id.as_deref().unwrap());
        assert_eq!(
            stored.destinations[&Destination::Meta]
                .consent_reason
                .as_deref(),
            Some("consent unknown (source default)")
        );
    }

    #[tokio::test]
    async fn revenue_from_a_source_that_is_not_the_system_of_record_is_never_sent() {
        let (store, queue) = (
            MemoryStore::new(),
            MemoryQueue::new(5, Duration::from_secs(30)),
        );
        let r = run(vec![item(won("granted"))], "salesforce", &store, &queue).await;
        let stored = store.get_sync(r.results[0].event_id.as_deref().unwrap());
        for d in Destination::ALL {
            assert_eq!(
                stored.destinations[&d].status,
                DeliveryStatus::RejectedNotSystemOfRecord
            );
        }
        assert_eq!(
            queue.depth(Destination::Meta) + queue.depth(Destination::Google),
            0
        );
    }

    #[tokio::test]
    async fn mixed_batch_keeps_valid_items_and_names_every_bad_field() {
        let (store, queue) = (
            MemoryStore::new(),
            MemoryQueue::new(5, Duration::from_secs(30)),
        );
        let bad = json!({"event_name": "won", "occurred_at": "soon", "entity_type": "opportunity", "entity_id": "D-2"});
        let wrong_source = json!({"source": "salesforce", "event_name": "lead", "occurred_at": "2026-11-27T10:00:00Z",
                                  "entity_type": "lead", "entity_id": "L-1"});
        let items = vec![
            item(won("granted")),
            item(bad),
            Incoming::Unmapped { stage: "x".into() },
            item(wrong_source),
        ];
        let r = run(items, "hubspot", &store, &queue).await;
        let statuses: Vec<_> = r.results.iter().map(|x| x.status).collect();
        assert_eq!(
            statuses,
            [
                ItemStatus::Accepted,
                ItemStatus::Invalid,
                ItemStatus::Unmapped,
                ItemStatus::Invalid
            ]
        );
        let fields: Vec<_> = r.results[1]
            .errors
            .iter()
            .map(|e| e.field.as_str())
            .collect();
        assert_eq!(fields, ["occurred_at", "order_id", "value", "currency"]);
        assert_eq!(r.results[3].errors[0].field, "source");
        assert_eq!(
            r.results.iter().map(|x| x.index).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        assert_eq!(store.len(), 1);
    }

    #[tokio::test]
    async fn enqueue_failure_leaves_the_event_pending_and_the_caller_succeeds() {
        let (store, queue) = (
            MemoryStore::new(),
            MemoryQueue::new(5, Duration::from_secs(30)),
        );
        queue.break_destination(Destination::Google, true);
        let r = run(vec![item(won("granted"))], "hubspot", &store, &queue).await;
        assert_eq!(r.results[0].status, ItemStatus::Accepted);
        assert_eq!(r.enqueue_failures, 1);
        let stored = store.get_sync(r.results[0].event_id.as_deref().unwrap());
        assert_eq!(
            stored.destinations[&Destination::Google].status,
            DeliveryStatus::Pending
        );
        assert_eq!(queue.depth(Destination::Meta), 1);
    }

    #[tokio::test]
    async fn a_batch_of_many_is_enqueued_in_batches_of_ten() {
        let (store, queue) = (
            MemoryStore::new(),
            MemoryQueue::new(5, Duration::from_secs(30)),
        );
        let items = (0..45)
            .map(|i| {
                let mut v = won("granted");
                v["entity_id"] = json!(format!("D-{i}"));
                v["order_id"] = json!(format!("O-{i}"));
                item(v)
            })
            .collect();
        let r = run(items, "hubspot", &store, &queue).await;
        assert!(r.results.iter().all(|x| x.status == ItemStatus::Accepted));
        assert_eq!(queue.depth(Destination::Meta), 45);
        assert_eq!(
            queue.send_calls(),
            10,
            "5 SendMessageBatch calls per destination for 45 messages"
        );
    }

    fn lead_with_id(id: &str) -> serde_json::Value {
        json!({"event_id": id, "event_name": "lead", "occurred_at": "2026-11-27T10:00:00Z", "entity_type": "lead",
               "entity_id": "L-1", "identity": {"email": "a@example.com"}, "consent": {"status": "granted"}})
    }

    #[tokio::test]
    async fn one_source_cannot_pre_claim_another_sources_event_id() {
        let (store, queue) = (
            MemoryStore::new(),
            MemoryQueue::new(5, Duration::from_secs(30)),
        );
        // `generic` squats the id `salesforce` will use for its real lead.
        let squat = run(vec![item(lead_with_id("px-1"))], "generic", &store, &queue).await;
        assert_eq!(squat.results[0].status, ItemStatus::Accepted);
        let real = run(
            vec![item(lead_with_id("px-1"))],
            "salesforce",
            &store,
            &queue,
        )
        .await;
        let r = &real.results[0];
        assert_eq!(r.status, ItemStatus::Accepted, "not answered duplicate");
        assert_eq!(
            r.event_id.as_deref(),
            Some("px-1"),
            "the id stays the caller's"
        );
        let conflict = r.conflict.as_ref().expect("the collision is reported");
        assert_eq!(conflict.field, "event_id");
        assert!(conflict.reason.contains("`generic`"), "{conflict:?}");
        assert_eq!(store.len(), 2, "each source's event under its own key");
        let keys: Vec<String> = store.all().into_iter().map(|e| e.key).collect();
        assert_eq!(keys, ["generic:px-1", "salesforce:px-1"]);
        assert_eq!(queue.depth(Destination::Meta), 2);
        // A replay from either source is a duplicate of its own event only.
        let again = run(
            vec![item(lead_with_id("px-1"))],
            "salesforce",
            &store,
            &queue,
        )
        .await;
        assert_eq!(again.results[0].status, ItemStatus::Duplicate);
    }

    #[tokio::test]
    async fn an_event_stored_under_its_bare_id_by_the_previous_release_is_still_a_duplicate() {
        let (store, queue) = (
            MemoryStore::new(),
            MemoryQueue::new(5, Duration::from_secs(30)),
        );
        let first = run(vec![item(lead_with_id("px-2"))], "generic", &store, &queue).await;
        let key = first.results[0].event_id.clone().unwrap();
        let stored = store.get_sync(&format!("generic:{key}"));
        let legacy = MemoryStore::new();
        legacy.insert_legacy(&stored);
        let replay = run(vec![item(lead_with_id("px-2"))], "generic", &legacy, &queue).await;
        assert_eq!(replay.results[0].status, ItemStatus::Duplicate);
        assert_eq!(legacy.len(), 1);
    }

    #[tokio::test]
    async fn an_event_too_large_to_store_is_invalid_not_a_retry() {
        let (store, queue) = (
            MemoryStore::new(),
            MemoryQueue::new(5, Duration::from_secs(30)),
        );
        store.limit_item_size(1500);
        let mut big = won("granted");
        big["identity"]["client_user_agent"] = json!("M".repeat(1000));
        big["entity_id"] = json!("D-big");
        let r = run(
            vec![item(won("granted")), item(big)],
            "hubspot",
            &store,
            &queue,
        )
        .await;
        assert_eq!(r.results[0].status, ItemStatus::Accepted);
        assert_eq!(
            r.results[1].status,
            ItemStatus::Invalid,
            "{:?}",
            r.results[1]
        );
        assert_eq!(r.results[1].errors[0].field, "$");
        assert!(r.results[1].errors[0].reason.contains("too large"));
        assert!(
            !r.any(ItemStatus::Unavailable),
            "never a 503 the CRM retries forever"
        );
    }

    #[tokio::test]
    async fn an_oversized_crm_stage_is_named() {
        let (store, queue) = (
            MemoryStore::new(),
            MemoryQueue::new(5, Duration::from_secs(30)),
        );
        let mut v = won("granted");
        v["crm_stage"] = json!("s".repeat(5000));
        let r = run(vec![item(v)], "hubspot", &store, &queue).await;
        assert_eq!(r.results[0].status, ItemStatus::Invalid);
        assert_eq!(r.results[0].errors[0].field, "crm_stage");
    }

    #[tokio::test]
    async fn every_stage_of_a_lead_sends_the_fbc_of_the_first_event_that_carried_the_click() {
        let (store, queue) = (
            MemoryStore::new(),
            MemoryQueue::new(5, Duration::from_secs(30)),
        );
        let stage = |name: &str, at: &str| {
            item(
                json!({"event_name": name, "occurred_at": at, "entity_type": "contact", "entity_id": "C-9",
                "identity": {"email": "a@example.com", "fbclid": "IwAR-9"}, "consent": {"status": "granted"}}),
            )
        };
        // The MQL's webhook arrives before the lead's.
        let mql = run(
            vec![stage("mql", "2026-11-27T11:00:00Z")],
            "hubspot",
            &store,
            &queue,
        )
        .await;
        let lead = run(
            vec![stage("lead", "2026-11-27T10:00:00Z")],
            "hubspot",
            &store,
            &queue,
        )
        .await;
        let sql = run(
            vec![stage("sql", "2026-11-27T12:00:00Z")],
            "hubspot",
            &store,
            &queue,
        )
        .await;
        let fbc = |r: &IngestReport| {
            store
                .get_sync(r.results[0].event_id.as_deref().unwrap())
                .identity
                .click
                .fbc
                .unwrap()
        };
        let first = Timestamp::parse_rfc3339("2026-11-27T10:00:00Z")
            .unwrap()
            .unix_ms();
        assert_eq!(fbc(&lead), format!("fb.1.{first}.IwAR-9"));
        assert_eq!(
            fbc(&sql),
            fbc(&lead),
            "later stages keep the first sighting"
        );
        assert!(
            fbc(&mql).starts_with("fb.1."),
            "the one that came first used its own time"
        );
    }
}
