//! What the bridge keeps about a person, and for how long: the retention rules for the raw
//! identifiers a platform needs unhashed, and erasure on request.
//!
//! - The IP address and user agent are needed only to send: they go in the write that closes
//!   an event's last pair (delivered, rejected, blocked); a dead-lettered pair keeps them until
//!   the dead-letter queue's retention passes, so an operator's redrive still has them.
//! - Click ids (gclid, gbraid, wbraid, fbc, fbp, lead id) stay while a correction can still use
//!   them: the longest click-through window, 90 days after the event.
//! - An erasure (HubSpot's privacy deletion, or an operator's "erase by email or phone")
//!   removes every identifier of the matching events and reports what it removed.

use crate::delivery::{DeliveryStatus, Destination, DestinationState};
use crate::event::CanonicalEvent;
use crate::identity::{self, IdentityContext, IdentityInput, Region};
use crate::store::{EventStore, Scrub, StoreError};
use crate::timestamp::Timestamp;
use serde::Serialize;

/// How long click ids stay: Google's longest click-through conversion window.
pub const CLICK_ID_RETENTION_SECS: i64 = 90 * 86_400;
/// How long a dead-lettered message stays on its DLQ (the template's MessageRetentionPeriod).
pub const DLQ_RETENTION_SECS: i64 = 14 * 86_400;
/// Events looked at per retention run.
pub const RETENTION_BATCH: usize = 1000;

fn has_browser_data(e: &CanonicalEvent) -> bool {
    e.identity.click.client_ip_address.is_some() || e.identity.click.client_user_agent.is_some()
}

fn has_click_ids(e: &CanonicalEvent) -> bool {
    let c = &e.identity.click;
    [&c.gclid, &c.gbraid, &c.wbraid, &c.fbc, &c.fbp, &c.lead_id]
        .iter()
        .any(|v| v.is_some())
}

/// A pair that will never send again (nothing for which the browser data is needed).
fn settled(s: &DestinationState, now: Timestamp) -> bool {
    match s.status {
        DeliveryStatus::DeadLetter => now.secs_since(&s.updated_at) > DLQ_RETENTION_SECS,
        st => !st.is_open(),
    }
}

/// Whether the write that moves `closing` to `status` closes the event's last pair, so the
/// browser data can go with it (the pipeline asks this for every transition).
pub fn closes_last_pair(e: &CanonicalEvent, closing: Destination, status: DeliveryStatus) -> bool {
    has_browser_data(e)
        && !status.is_open()
        && status != DeliveryStatus::DeadLetter
        && e.destinations
            .iter()
            .filter(|(d, _)| **d != closing)
            .all(|(_, s)| !s.status.is_open() && s.status != DeliveryStatus::DeadLetter)
}

/// What one retention run removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RetentionReport {
    pub browser_data_removed: usize,
    pub click_ids_removed: usize,
}

/// Removes what the retention rules no longer allow, from at most [`RETENTION_BATCH`] events
/// (the next run takes the rest).
pub async fn apply_retention(
    store: &dyn EventStore,
    now: Timestamp,
) -> Result<RetentionReport, StoreError> {
    let clicks_before = now.minus_secs(CLICK_ID_RETENTION_SECS);
    let mut report = RetentionReport::default();
    for e in store
        .retention_candidates(clicks_before, RETENTION_BATCH)
        .await?
    {
        if has_click_ids(&e) && e.occurred_at < clicks_before {
            // Older than any click window: the ids and the browser data together.
            if store.scrub(&e.key, Scrub::ClickIds, now).await? {
                report.click_ids_removed += 1;
            }
        }
        if has_browser_data(&e)
            && e.destinations.values().all(|s| settled(s, now))
            && store.scrub(&e.key, Scrub::Browser, now).await?
        {
            report.browser_data_removed += 1;
        }
    }
    Ok(report)
}

/// Who is to be erased: a CRM contact (its events, and every event carrying the same email or
/// phone), and/or an email address or phone number.
#[derive(Clone, Default)]
pub struct ErasureRequest {
    /// (source, entity id), e.g. HubSpot's privacy deletion of a contact.
    pub entity: Option<(String, String)>,
    pub email: Option<String>,
    pub phone: Option<String>,
    /// For a phone number written without its country code.
    pub default_region: Option<Region>,
}

/// One event an erasure emptied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Erased {
    pub event_id: String,
    pub source: String,
    pub entity_id: String,
    pub event_name: String,
    /// The identity fields it held (names only, never values).
    pub fields: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ErasureReport {
    pub erased: Vec<Erased>,
}

/// The identity fields an event holds, by name.
fn field_names(e: &CanonicalEvent) -> Vec<String> {
    let v = serde_json::to_value(&e.identity).unwrap_or_default();
    let mut out = Vec::new();
    for (group, fields) in v.as_object().into_iter().flatten() {
        for (name, value) in fields.as_object().into_iter().flatten() {
            if !value.is_null() {
                out.push(format!("{group}.{name}"));
            }
        }
    }
    out.sort();
    out
}

/// The email and phone hashes (both platforms' forms) of an event's identity.
fn hashes_of(e: &CanonicalEvent) -> Vec<String> {
    let i = &e.identity;
    [&i.meta.em, &i.meta.ph, &i.google.email, &i.google.phone]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
}

/// Erases every identifier of the events `req` names, and reports them. The events stay (the
/// audit of what was sent), without anything that identifies the person.
pub async fn erase(
    store: &dyn EventStore,
    req: &ErasureRequest,
    now: Timestamp,
) -> Result<ErasureReport, StoreError> {
    let mut hashes = Vec::new();
    if req.email.is_some() || req.phone.is_some() {
        let input = IdentityInput {
            email: req.email.clone(),
            phone: req.phone.clone(),
            ..Default::default()
        };
        let ctx = IdentityContext {
            default_region: req.default_region.unwrap_or(Region::US),
            occurred_at_ms: now.unix_ms(),
        };
        let (h, _) = identity::normalize(&input, &ctx);
        hashes.extend(
            [h.meta.em, h.meta.ph, h.google.email, h.google.phone]
                .into_iter()
                .flatten(),
        );
    }
    let entity = req.entity.as_ref().map(|(s, e)| (s.as_str(), e.as_str()));
    let mut found = store.find_for_erasure(entity, &hashes).await?;
    if entity.is_some() {
        // The contact's own events name its email and phone: every other event that carries
        // them (its deals) is the same person's.
        let more: Vec<String> = found.iter().flat_map(hashes_of).collect();
        if !more.is_empty() {
            for e in store.find_for_erasure(None, &more).await? {
                if !found.iter().any(|f| f.key == e.key) {
                    found.push(e);
                }
            }
        }
    }
    found.sort_by(|a, b| a.key.cmp(&b.key));
    let mut report = ErasureReport::default();
    for e in found {
        let fields = field_names(&e);
        if fields.is_empty() {
            continue;
        }
        if store.scrub(&e.key, Scrub::All, now).await? {
            tracing::info!(event_id = %e.event_id, source = %e.source, result = "erased", "identity erased");
            report.erased.push(Erased {
                event_id: e.event_id,
                source: e.source,
                entity_id: e.entity_id,
                event_name: e.event_name.as_str().to_string(),
                fields,
            });
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ValidationContext, parse_event_json, validate};
    use crate::store::memory::MemoryStore;
    use serde_json::json;

    fn now() -> Timestamp {
        Timestamp::parse_rfc3339("2026-11-28T12:00:00Z").unwrap()
    }

    fn event(entity: &str, name: &str, at: &str, identity: serde_json::Value) -> CanonicalEvent {
        let mut v = json!({"source": "hubspot", "event_name": name, "occurred_at": at,
            "entity_type": "contact", "entity_id": entity, "identity": identity});
        if name == "won" {
            v["entity_type"] = json!("opportunity");
            v["order_id"] = json!(format!("O-{entity}"));
            v["value"] = json!(10);
            v["currency"] = json!("USD");
        }
        let mut e = validate(
            &parse_event_json(&v.to_string()).unwrap(),
            &ValidationContext::for_tests(now()),
        )
        .unwrap();
        e.destinations.insert(
            Destination::Meta,
            DestinationState::new(DeliveryStatus::Delivered, now()),
        );
        e
    }

    #[tokio::test]
    async fn browser_data_goes_when_nothing_is_left_to_send_click_ids_after_90_days() {
        let store = MemoryStore::new();
        let fresh = event(
            "C-1",
            "lead",
            "2026-11-27T10:00:00Z",
            json!({"email": "a@example.com", "gclid": "G1", "client_ip_address": "203.0.113.1", "client_user_agent": "UA"}),
        );
        let old = event(
            "C-2",
            "lead",
            "2026-07-01T10:00:00Z",
            json!({"email": "b@example.com", "gclid": "G2"}),
        );
        let mut open = event(
            "C-3",
            "lead",
            "2026-11-27T10:00:00Z",
            json!({"email": "c@example.com", "client_ip_address": "203.0.113.3"}),
        );
        open.destinations.insert(
            Destination::Google,
            DestinationState::new(DeliveryStatus::Retry, now()),
        );
        for e in [&fresh, &old, &open] {
            store.put_new(e).await.unwrap();
        }
        let r = apply_retention(&store, now()).await.unwrap();
        assert_eq!(
            r,
            RetentionReport {
                browser_data_removed: 1,
                click_ids_removed: 1
            }
        );
        let f = store.get_sync(&fresh.key).identity;
        assert_eq!(
            (
                f.click.client_ip_address,
                f.click.client_user_agent,
                f.click.gclid.as_deref()
            ),
            (None, None, Some("G1")),
            "IP and UA gone, the click id kept for corrections"
        );
        assert!(store.get_sync(&old.key).identity.click.gclid.is_none());
        assert!(
            store
                .get_sync(&open.key)
                .identity
                .click
                .client_ip_address
                .is_some(),
            "still owed a send"
        );
    }

    #[tokio::test]
    async fn erasure_of_a_contact_reaches_its_deals_through_their_shared_email() {
        let store = MemoryStore::new();
        let lead = event(
            "101",
            "lead",
            "2026-11-20T10:00:00Z",
            json!({"email": "ada@example.com", "phone": "+1 650 555 1234"}),
        );
        let deal = event(
            "9001",
            "won",
            "2026-11-25T10:00:00Z",
            json!({"email": "Ada@Example.com", "gclid": "G"}),
        );
        let other = event(
            "102",
            "lead",
            "2026-11-20T10:00:00Z",
            json!({"email": "bob@example.com"}),
        );
        for e in [&lead, &deal, &other] {
            store.put_new(e).await.unwrap();
        }
        let report = erase(
            &store,
            &ErasureRequest {
                entity: Some(("hubspot".into(), "101".into())),
                ..Default::default()
            },
            now(),
        )
        .await
        .unwrap();
        let names: Vec<&str> = report.erased.iter().map(|e| e.entity_id.as_str()).collect();
        assert_eq!(names.len(), 2);
        assert!(
            names.contains(&"101") && names.contains(&"9001"),
            "{names:?}"
        );
        assert!(
            report
                .erased
                .iter()
                .all(|e| e.fields.iter().any(|f| f == "meta.em"))
        );
        assert!(store.get_sync(&deal.key).identity.is_empty());
        assert!(
            !store.get_sync(&other.key).identity.is_empty(),
            "someone else's"
        );
        // By email, as an operator would: nothing left to erase.
        let again = erase(
            &store,
            &ErasureRequest {
                email: Some("ada@example.com".into()),
                ..Default::default()
            },
            now(),
        )
        .await
        .unwrap();
        assert!(again.erased.is_empty());
    }
}
