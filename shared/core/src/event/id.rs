//! Event identity: the deterministic event_id (pinned forever: platforms deduplicate on it) and
//! the store key that scopes a caller-provided id by its source.

use super::{EntityType, EventIdOrigin, EventName};
use crate::hashing::sha256_hex_joined;
use crate::timestamp::Timestamp;

/// The store key of an event: the event_id when derived here (the source is already part of
/// its hash), else `<source>:<event_id>`, so a caller-provided id is scoped by the source that
/// sent it and one source can never pre-claim another's event. (Sources are `[a-z0-9_-]`, so
/// the first `:` ends the source.)
pub fn store_key(source: &str, event_id: &str, origin: EventIdOrigin) -> String {
    match origin {
        EventIdOrigin::Derived => event_id.to_string(),
        EventIdOrigin::Provided => format!("{source}:{event_id}"),
    }
}

/// SHA-256 hex of `source|event_name|entity_type|entity_id|occurred_at`, plus `|order_id` for
/// revenue events, over the canonical UTC millisecond form of `occurred_at`.
///
/// Pinned by golden tests: changing this function re-keys every event ever stored and breaks
/// deduplication at the platforms, so it must never change.
pub fn derive_event_id(
    source: &str,
    event_name: EventName,
    entity_type: EntityType,
    entity_id: &str,
    occurred_at: Timestamp,
    order_id: Option<&str>,
) -> String {
    let at = occurred_at.canonical();
    let mut parts = vec![
        source,
        event_name.as_str(),
        entity_type.as_str(),
        entity_id,
        at.as_str(),
    ];
    if event_name.is_revenue() {
        parts.push(order_id.unwrap_or_default());
    }
    sha256_hex_joined(&parts)
}
