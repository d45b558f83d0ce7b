//! In-memory event store for unit tests: the same contract as DynamoDB, one mutex.

use super::{ClaimOutcome, EventStore, PutOutcome, StoreError, StuckRef, Transition};
use crate::delivery::{Claimability, DeliveryStatus, Destination};
use crate::event::CanonicalEvent;
use crate::timestamp::Timestamp;
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct MemoryStore {
    events: Mutex<HashMap<String, CanonicalEvent>>,
    /// Sweep overrides set by `defer_sweep`, keyed by (event, destination).
    deferred: Mutex<HashMap<(String, Destination), Timestamp>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CanonicalEvent>> {
        // A panic while holding the lock cannot leave an event half-written (every mutation
        // is a single assignment), so a poisoned lock is safe to keep using.
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stored event; panics when absent (tests only).
    pub fn get_sync(&self, id: &str) -> CanonicalEvent {
        self.lock()
            .get(id)
            .cloned()
            .unwrap_or_else(|| panic!("event {id} is not stored"))
    }

    pub fn all(&self) -> Vec<CanonicalEvent> {
        let mut v: Vec<_> = self.lock().values().cloned().collect();
        v.sort_by(|a, b| a.event_id.cmp(&b.event_id));
        v
    }
}

#[async_trait]
impl EventStore for MemoryStore {
    async fn put_new(&self, event: &CanonicalEvent) -> Result<PutOutcome, StoreError> {
        let mut events = self.lock();
        if events.contains_key(&event.event_id) {
            return Ok(PutOutcome::Duplicate);
        }
        events.insert(event.event_id.clone(), event.clone());
        Ok(PutOutcome::Created)
    }

    async fn get(&self, event_id: &str) -> Result<Option<CanonicalEvent>, StoreError> {
        Ok(self.lock().get(event_id).cloned())
    }

    async fn get_many(&self, event_ids: &[String]) -> Result<Vec<CanonicalEvent>, StoreError> {
        let events = self.lock();
        Ok(event_ids
            .iter()
            .filter_map(|id| events.get(id).cloned())
            .collect())
    }

    async fn find_by_order(&self, order_id: &str) -> Result<Vec<CanonicalEvent>, StoreError> {
        let mut v: Vec<_> = self
            .lock()
            .values()
            .filter(|e| e.event_name.is_revenue() && e.order_id.as_deref() == Some(order_id))
            .cloned()
            .collect();
        v.sort_by(|a, b| (a.occurred_at, &a.event_id).cmp(&(b.occurred_at, &b.event_id)));
        Ok(v)
    }

    async fn claim(
        &self,
        event_id: &str,
        destination: Destination,
        now: Timestamp,
        lease_until: Timestamp,
    ) -> Result<ClaimOutcome, StoreError> {
        let mut events = self.lock();
        let Some(event) = events.get_mut(event_id) else {
            return Ok(ClaimOutcome::Missing);
        };
        let Some(state) = event.destinations.get_mut(&destination) else {
            return Ok(ClaimOutcome::Missing);
        };
        match state.claimability(now) {
            Claimability::Claimable => {
                state.status = DeliveryStatus::Sending;
                state.attempts += 1;
                state.lease_until = Some(lease_until);
                state.updated_at = now;
                self.deferred
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(event_id.to_string(), destination));
                Ok(ClaimOutcome::Claimed(Box::new(event.clone())))
            }
            other => Ok(ClaimOutcome::Refused(other, Box::new(event.clone()))),
        }
    }

    async fn complete(
        &self,
        event_id: &str,
        destination: Destination,
        attempt: u32,
        t: &Transition,
    ) -> Result<bool, StoreError> {
        let mut events = self.lock();
        let Some(state) = events
            .get_mut(event_id)
            .and_then(|e| e.destinations.get_mut(&destination))
        else {
            return Ok(false);
        };
        if state.status != DeliveryStatus::Sending || state.attempts != attempt {
            return Ok(false);
        }
        state.status = t.status;
        state.updated_at = t.now;
        state.next_attempt_at = t.next_attempt_at;
        state.lease_until = None;
        if t.error.is_some() {
            state.last_error = t.error.clone();
        }
        if t.status == DeliveryStatus::DeadLetter {
            state.attempts_base = state.attempts;
        }
        state.log.push(t.log.clone());
        Ok(true)
    }

    async fn events_between(
        &self,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<CanonicalEvent>, StoreError> {
        let mut v: Vec<CanonicalEvent> = self
            .lock()
            .values()
            .filter(|e| e.occurred_at >= from && e.occurred_at < to)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.event_id.cmp(&b.event_id));
        Ok(v)
    }

    async fn stuck(
        &self,
        destination: Destination,
        before: Timestamp,
        limit: usize,
    ) -> Result<Vec<StuckRef>, StoreError> {
        let deferred = self
            .deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut v: Vec<StuckRef> = self
            .lock()
            .values()
            .filter_map(|e| {
                let s = e.destinations.get(&destination)?;
                let due = deferred
                    .get(&(e.event_id.clone(), destination))
                    .copied()
                    .or_else(|| s.sweep_due())?;
                (s.status.is_open() && due < before).then(|| StuckRef {
                    event_id: e.event_id.clone(),
                    destination,
                    status: s.status,
                    due,
                })
            })
            .collect();
        v.sort_by(|a, b| (a.due, &a.event_id).cmp(&(b.due, &b.event_id)));
        v.truncate(limit);
        Ok(v)
    }

    async fn defer_sweep(
        &self,
        event_id: &str,
        destination: Destination,
        status: DeliveryStatus,
        due: Timestamp,
    ) -> Result<bool, StoreError> {
        let events = self.lock();
        let current = events
            .get(event_id)
            .and_then(|e| e.destinations.get(&destination))
            .map(|s| s.status);
        if current != Some(status) {
            return Ok(false);
        }
        self.deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((event_id.to_string(), destination), due);
        Ok(true)
    }
}
