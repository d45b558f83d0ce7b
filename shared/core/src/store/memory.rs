//! In-memory event store for unit and property tests: the same contract as DynamoDB (keys,
//! conditional claims, order holds, provided-id reservations), one mutex.

use super::{
    ClaimOutcome, EventStore, OrderHold, PutOutcome, Scrub, StoreError, StuckRef, Transition,
};
use crate::delivery::{Claimability, DeliveryStatus, Destination};
use crate::event::{CanonicalEvent, EventIdOrigin};
use crate::timestamp::Timestamp;
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

#[derive(Default)]
struct Tables {
    /// Events by store key.
    events: HashMap<String, CanonicalEvent>,
    /// Sweep times that differ from the one the pair's state gives, keyed by (event key,
    /// destination): set by `defer_sweep`, and by a claim, which leaves the time where it was
    /// (as the DynamoDB store leaves the index key).
    deferred: HashMap<(String, Destination), Timestamp>,
    /// (order id, destination) -> the key of the won that holds the order there.
    orders: HashMap<(String, Destination), String>,
    /// Caller-provided event_id -> the first source that used it.
    provided_ids: HashMap<String, String>,
    /// (kind, value hash) -> earliest time seen.
    seen: HashMap<(String, String), Timestamp>,
    /// Writes by kind, for cost tests.
    writes: HashMap<&'static str, usize>,
    /// Items larger than this (JSON bytes) are refused as too large (DynamoDB: 400 KB).
    max_item_bytes: Option<usize>,
}

#[derive(Default)]
pub struct MemoryStore {
    tables: Mutex<Tables>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        // A panic while holding the lock cannot leave an event half-written (every mutation
        // is a single assignment), so a poisoned lock is safe to keep using.
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuse items whose JSON form is larger than `bytes`, as DynamoDB refuses items over
    /// 400 KB.
    pub fn limit_item_size(&self, bytes: usize) {
        self.lock().max_item_bytes = Some(bytes);
    }

    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stored event; panics when absent (tests only).
    pub fn get_sync(&self, key: &str) -> CanonicalEvent {
        self.lock()
            .events
            .get(key)
            .cloned()
            .unwrap_or_else(|| panic!("event {key} is not stored"))
    }

    /// Changes a stored event in place, as the delivery path would have (tests only).
    pub fn update_sync(&self, key: &str, f: impl FnOnce(&mut CanonicalEvent)) {
        if let Some(e) = self.lock().events.get_mut(key) {
            f(e);
        }
    }

    pub fn all(&self) -> Vec<CanonicalEvent> {
        let mut v: Vec<_> = self.lock().events.values().cloned().collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// Writes so far, by kind (`put`, `claim`, `complete`, `order`, `reserve`, `defer`).
    pub fn writes(&self) -> HashMap<&'static str, usize> {
        self.lock().writes.clone()
    }

    /// Stores `event` as a previous release did: under its bare event_id, whatever its origin.
    pub fn insert_legacy(&self, event: &CanonicalEvent) {
        let mut e = event.clone();
        e.key = e.event_id.clone();
        self.lock().events.insert(e.key.clone(), e);
    }
}

fn count(t: &mut Tables, kind: &'static str) {
    *t.writes.entry(kind).or_insert(0) += 1;
}

fn too_large(t: &Tables, e: &CanonicalEvent) -> Option<StoreError> {
    let max = t.max_item_bytes?;
    let size = serde_json::to_vec(e).map_or(0, |v| v.len());
    (size > max).then(|| StoreError::TooLarge {
        key: e.key.clone(),
        reason: format!("{size} bytes, over the {max}-byte item limit"),
    })
}

#[async_trait]
impl EventStore for MemoryStore {
    async fn put_new(&self, event: &CanonicalEvent) -> Result<PutOutcome, StoreError> {
        let mut t = self.lock();
        if let Some(e) = too_large(&t, event) {
            return Err(e);
        }
        if t.events.contains_key(&event.key) {
            return Ok(PutOutcome::Duplicate);
        }
        let mut conflict = None;
        if event.event_id_origin == EventIdOrigin::Provided {
            // An event stored by a previous release under its bare id: the same source's is
            // this very event (a replay); another source's is a collision.
            if let Some(old) = t.events.get(&event.event_id)
                && old.event_id_origin == EventIdOrigin::Provided
            {
                if old.source == event.source {
                    return Ok(PutOutcome::Duplicate);
                }
                conflict = Some(old.source.clone());
            }
            count(&mut t, "reserve");
            match t.provided_ids.get(&event.event_id) {
                Some(src) if *src != event.source => conflict = Some(src.clone()),
                Some(_) => {}
                None => {
                    t.provided_ids
                        .insert(event.event_id.clone(), event.source.clone());
                }
            }
        }
        count(&mut t, "put");
        t.events.insert(event.key.clone(), event.clone());
        Ok(match conflict {
            Some(other_source) => PutOutcome::CreatedWithConflict { other_source },
            None => PutOutcome::Created,
        })
    }

    async fn get(&self, key: &str) -> Result<Option<CanonicalEvent>, StoreError> {
        Ok(self.lock().events.get(key).cloned())
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<CanonicalEvent>, StoreError> {
        let t = self.lock();
        Ok(keys
            .iter()
            .filter_map(|k| t.events.get(k).cloned())
            .collect())
    }

    async fn find_by_order(&self, order_id: &str) -> Result<Vec<CanonicalEvent>, StoreError> {
        let mut v: Vec<_> = self
            .lock()
            .events
            .values()
            .filter(|e| e.event_name.is_revenue() && e.order_id.as_deref() == Some(order_id))
            .cloned()
            .collect();
        v.sort_by(|a, b| (a.occurred_at, &a.key).cmp(&(b.occurred_at, &b.key)));
        Ok(v)
    }

    async fn claim(
        &self,
        key: &str,
        destination: Destination,
        now: Timestamp,
        lease_until: Timestamp,
        redrive_of: Option<u32>,
    ) -> Result<ClaimOutcome, StoreError> {
        let mut t = self.lock();
        let Some(event) = t.events.get_mut(key) else {
            return Ok(ClaimOutcome::Missing);
        };
        let Some(state) = event.destinations.get_mut(&destination) else {
            return Ok(ClaimOutcome::Missing);
        };
        match state.claimability(now, redrive_of) {
            Claimability::Claimable => {
                let prior_due = state.sweep_due();
                state.status = DeliveryStatus::Sending;
                state.attempts += 1;
                state.lease_until = Some(lease_until);
                state.updated_at = now;
                let claimed = event.clone();
                let slot = (key.to_string(), destination);
                match prior_due {
                    Some(due) => {
                        t.deferred.entry(slot).or_insert(due);
                    }
                    None => {
                        t.deferred.remove(&slot);
                    }
                }
                count(&mut t, "claim");
                Ok(ClaimOutcome::Claimed(Box::new(claimed)))
            }
            other => Ok(ClaimOutcome::Refused(other, Box::new(event.clone()))),
        }
    }

    async fn complete(
        &self,
        key: &str,
        destination: Destination,
        attempt: u32,
        tr: &Transition,
    ) -> Result<bool, StoreError> {
        let mut t = self.lock();
        let max = t.max_item_bytes;
        let Some(event) = t.events.get_mut(key) else {
            return Ok(false);
        };
        let Some(state) = event.destinations.get(&destination) else {
            return Ok(false);
        };
        if state.status != DeliveryStatus::Sending || state.attempts != attempt {
            return Ok(false);
        }
        let mut next = state.clone();
        next.status = tr.status;
        next.updated_at = tr.now;
        next.next_attempt_at = tr.next_attempt_at;
        next.lease_until = None;
        next.waiting_since = tr.waiting_since;
        if tr.error.is_some() {
            next.last_error = tr.error.clone();
        }
        if tr.release_attempt {
            next.attempts_base = next.attempts_base.saturating_add(1);
        }
        if tr.status == DeliveryStatus::DeadLetter {
            next.attempts_base = next.attempts;
        }
        next.log = tr.log.clone();
        if tr.scrub_browser {
            event.identity.click.client_ip_address = None;
            event.identity.click.client_user_agent = None;
        }
        let mut probe = event.clone();
        probe.destinations.insert(destination, next.clone());
        if let Some(max) = max {
            let size = serde_json::to_vec(&probe).map_or(0, |v| v.len());
            if size > max {
                return Err(StoreError::TooLarge {
                    key: key.to_string(),
                    reason: format!("{size} bytes"),
                });
            }
        }
        event.destinations.insert(destination, next);
        t.deferred.remove(&(key.to_string(), destination));
        count(&mut t, "complete");
        Ok(true)
    }

    async fn hold_order(
        &self,
        order_id: &str,
        destination: Destination,
        key: &str,
    ) -> Result<OrderHold, StoreError> {
        let mut t = self.lock();
        count(&mut t, "order");
        let slot = (order_id.to_string(), destination);
        match t.orders.get(&slot) {
            Some(holder) if holder == key => Ok(OrderHold::Held { first: false }),
            Some(holder) => Ok(OrderHold::HeldBy(holder.clone())),
            None => {
                t.orders.insert(slot, key.to_string());
                Ok(OrderHold::Held { first: true })
            }
        }
    }

    async fn take_over_order(
        &self,
        order_id: &str,
        destination: Destination,
        from: &str,
        to: &str,
    ) -> Result<bool, StoreError> {
        let mut t = self.lock();
        count(&mut t, "order");
        let slot = (order_id.to_string(), destination);
        if t.orders.get(&slot).map(String::as_str) != Some(from) {
            return Ok(false);
        }
        t.orders.insert(slot, to.to_string());
        Ok(true)
    }

    async fn scrub(&self, key: &str, what: Scrub, _now: Timestamp) -> Result<bool, StoreError> {
        let mut t = self.lock();
        let Some(e) = t.events.get_mut(key) else {
            return Ok(false);
        };
        let c = &mut e.identity.click;
        match what {
            Scrub::Browser => {
                c.client_ip_address = None;
                c.client_user_agent = None;
            }
            Scrub::ClickIds => {
                for v in [
                    &mut c.gclid,
                    &mut c.gbraid,
                    &mut c.wbraid,
                    &mut c.fbc,
                    &mut c.fbp,
                    &mut c.lead_id,
                ] {
                    *v = None;
                }
            }
            Scrub::All => e.identity = Default::default(),
        }
        count(&mut t, "scrub");
        Ok(true)
    }

    async fn retention_candidates(
        &self,
        clicks_before: Timestamp,
        limit: usize,
    ) -> Result<Vec<CanonicalEvent>, StoreError> {
        let t = self.lock();
        let mut v: Vec<CanonicalEvent> = t
            .events
            .values()
            .filter(|e| {
                let c = &e.identity.click;
                let browser = c.client_ip_address.is_some() || c.client_user_agent.is_some();
                let clicks = [&c.gclid, &c.gbraid, &c.wbraid, &c.fbc, &c.fbp, &c.lead_id]
                    .iter()
                    .any(|v| v.is_some());
                browser || (clicks && e.occurred_at < clicks_before)
            })
            .cloned()
            .collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v.truncate(limit);
        Ok(v)
    }

    async fn find_for_erasure(
        &self,
        entity: Option<(&str, &str)>,
        hashes: &[String],
    ) -> Result<Vec<CanonicalEvent>, StoreError> {
        let t = self.lock();
        Ok(t.events
            .values()
            .filter(|e| {
                let i = &e.identity;
                entity.is_some_and(|(s, id)| {
                    e.source == s && (e.entity_id == id || i.crm_contact_id.as_deref() == Some(id))
                }) || [&i.meta.em, &i.meta.ph, &i.google.email, &i.google.phone]
                    .into_iter()
                    .flatten()
                    .any(|h| hashes.contains(h))
            })
            .cloned()
            .collect())
    }

    async fn first_seen(
        &self,
        kind: &str,
        value: &str,
        at: Timestamp,
    ) -> Result<Timestamp, StoreError> {
        let mut t = self.lock();
        let slot = t
            .seen
            .entry((kind.to_string(), value.to_string()))
            .or_insert(at);
        if at < *slot {
            *slot = at;
        }
        let earliest = *slot;
        count(&mut t, "seen");
        Ok(earliest)
    }

    async fn events_between(
        &self,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<CanonicalEvent>, StoreError> {
        let mut v: Vec<CanonicalEvent> = self
            .lock()
            .events
            .values()
            .filter(|e| e.occurred_at >= from && e.occurred_at < to)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(v)
    }

    async fn stuck(
        &self,
        destination: Destination,
        before: Timestamp,
        limit: usize,
    ) -> Result<Vec<StuckRef>, StoreError> {
        let t = self.lock();
        let mut v: Vec<StuckRef> = t
            .events
            .values()
            .filter_map(|e| {
                let s = e.destinations.get(&destination)?;
                let due = t
                    .deferred
                    .get(&(e.key.clone(), destination))
                    .copied()
                    .or_else(|| s.sweep_due())?;
                (s.status.is_open() && due < before).then(|| StuckRef {
                    key: e.key.clone(),
                    destination,
                    status: s.status,
                    due,
                })
            })
            .collect();
        v.sort_by(|a, b| (a.due, &a.key).cmp(&(b.due, &b.key)));
        v.truncate(limit);
        Ok(v)
    }

    async fn defer_sweep(
        &self,
        key: &str,
        destination: Destination,
        status: DeliveryStatus,
        due: Timestamp,
    ) -> Result<bool, StoreError> {
        let mut t = self.lock();
        // Any open status: the claim leaves the sweep entry's status as it was.
        let _ = status;
        let open = t
            .events
            .get(key)
            .and_then(|e| e.destinations.get(&destination))
            .is_some_and(|s| s.status.is_open());
        if !open {
            return Ok(false);
        }
        count(&mut t, "defer");
        t.deferred.insert((key.to_string(), destination), due);
        Ok(true)
    }
}
