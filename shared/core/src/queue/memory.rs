//! In-memory SQS model for unit tests: visibility timeouts, receive counts and redrive to a
//! dead-letter queue after `max_receive_count`, on a clock the test controls.

use super::{DeadLetter, DeliveryMessage, DeliveryQueue};
use crate::delivery::Destination;
use crate::timestamp::Timestamp;
use async_trait::async_trait;
use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Stored {
    pub id: u64,
    pub message: DeliveryMessage,
    pub receive_count: u32,
    pub visible_at: Timestamp,
    pub receipt: Option<String>,
    pub dead_letter: Option<DeadLetter>,
}

/// A received message: what the Lambda SQS event carries per record.
#[derive(Clone, Debug)]
pub struct Received {
    pub receipt: String,
    pub message: DeliveryMessage,
    pub receive_count: u32,
}

#[derive(Default)]
struct State {
    now: Option<Timestamp>,
    next_id: u64,
    queues: BTreeMap<Destination, Vec<Stored>>,
    dlqs: BTreeMap<Destination, Vec<Stored>>,
    /// Destinations whose sends fail, to test enqueue failures.
    broken: HashSet<Destination>,
    send_calls: usize,
}

pub struct MemoryQueue {
    state: Mutex<State>,
    max_receive_count: u32,
    visibility: Duration,
}

impl MemoryQueue {
    pub fn new(max_receive_count: u32, visibility: Duration) -> Self {
        MemoryQueue {
            state: Mutex::new(State::default()),
            max_receive_count,
            visibility,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_now(&self, now: Timestamp) {
        self.lock().now = Some(now);
    }

    fn now(st: &State) -> Timestamp {
        st.now.unwrap_or_else(Timestamp::now)
    }

    pub fn break_destination(&self, d: Destination, broken: bool) {
        let mut st = self.lock();
        if broken {
            st.broken.insert(d);
        } else {
            st.broken.remove(&d);
        }
    }

    /// Batch send calls made so far (each carries up to 10 messages).
    pub fn send_calls(&self) -> usize {
        self.lock().send_calls
    }

    /// Receives up to `max` visible messages, as SQS does: each receive counts, and a message
    /// received more than `max_receive_count` times moves to the DLQ instead.
    pub fn receive(&self, d: Destination, max: usize) -> Vec<Received> {
        let mut st = self.lock();
        let now = Self::now(&st);
        let mut out = Vec::new();
        let mut to_dlq = Vec::new();
        let vis = self.visibility.as_secs() as i64;
        let queue = st.queues.entry(d).or_default();
        for m in queue.iter_mut() {
            if out.len() >= max {
                break;
            }
            if m.visible_at > now {
                continue;
            }
            if m.receive_count >= self.max_receive_count {
                to_dlq.push(m.id);
                continue;
            }
            m.receive_count += 1;
            m.visible_at = now.plus_secs(vis);
            let receipt = format!("r-{}-{}", m.id, m.receive_count);
            m.receipt = Some(receipt.clone());
            out.push(Received {
                receipt,
                message: m.message.clone(),
                receive_count: m.receive_count,
            });
        }
        let moved: Vec<Stored> = queue
            .iter()
            .filter(|m| to_dlq.contains(&m.id))
            .cloned()
            .collect();
        queue.retain(|m| !to_dlq.contains(&m.id));
        st.dlqs.entry(d).or_default().extend(moved);
        out
    }

    pub fn delete(&self, d: Destination, receipt: &str) -> bool {
        let mut st = self.lock();
        let q = st.queues.entry(d).or_default();
        let before = q.len();
        q.retain(|m| m.receipt.as_deref() != Some(receipt));
        q.len() != before
    }

    pub fn depth(&self, d: Destination) -> usize {
        self.lock().queues.get(&d).map_or(0, Vec::len)
    }

    pub fn dlq(&self, d: Destination) -> Vec<Stored> {
        self.lock().dlqs.get(&d).cloned().unwrap_or_default()
    }

    pub fn messages(&self, d: Destination) -> Vec<Stored> {
        self.lock().queues.get(&d).cloned().unwrap_or_default()
    }

    /// The console's DLQ redrive: every DLQ message back to its source queue, counts reset.
    pub fn redrive(&self, d: Destination) -> usize {
        let mut st = self.lock();
        let now = Self::now(&st);
        let moved: Vec<Stored> = st.dlqs.remove(&d).unwrap_or_default();
        let n = moved.len();
        let q = st.queues.entry(d).or_default();
        for mut m in moved {
            m.receive_count = 0;
            m.visible_at = now;
            m.receipt = None;
            m.dead_letter = None;
            q.push(m);
        }
        n
    }

    fn push(st: &mut State, m: DeliveryMessage, dl: Option<DeadLetter>, to_dlq: bool) {
        st.next_id += 1;
        let now = Self::now(st);
        let stored = Stored {
            id: st.next_id,
            message: m.clone(),
            receive_count: 0,
            visible_at: now,
            receipt: None,
            dead_letter: dl,
        };
        let map = if to_dlq { &mut st.dlqs } else { &mut st.queues };
        map.entry(m.destination).or_default().push(stored);
    }
}

#[async_trait]
impl DeliveryQueue for MemoryQueue {
    async fn enqueue(&self, messages: &[DeliveryMessage]) -> Vec<DeliveryMessage> {
        let mut st = self.lock();
        let mut failed = Vec::new();
        let mut dests: Vec<Destination> = messages.iter().map(|m| m.destination).collect();
        dests.sort();
        dests.dedup();
        for d in dests {
            let msgs: Vec<_> = messages.iter().filter(|m| m.destination == d).collect();
            st.send_calls += msgs.len().div_ceil(super::SQS_BATCH);
            if st.broken.contains(&d) {
                failed.extend(msgs.into_iter().cloned());
                continue;
            }
            for m in msgs {
                Self::push(&mut st, m.clone(), None, false);
            }
        }
        failed
    }

    async fn change_visibility(
        &self,
        d: Destination,
        changes: &[(String, Duration)],
    ) -> Vec<String> {
        let mut st = self.lock();
        let now = Self::now(&st);
        let mut failed = Vec::new();
        let q = st.queues.entry(d).or_default();
        for (receipt, delay) in changes {
            match q
                .iter_mut()
                .find(|m| m.receipt.as_deref() == Some(receipt.as_str()))
            {
                Some(m) => {
                    m.visible_at = now.plus_secs(i64::try_from(delay.as_secs()).unwrap_or(0))
                }
                None => failed.push(receipt.clone()),
            }
        }
        failed
    }

    async fn dead_letter(&self, items: &[DeadLetter]) -> Vec<DeliveryMessage> {
        let mut st = self.lock();
        for it in items {
            Self::push(&mut st, it.dlq_message(), Some(it.clone()), true);
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn visibility_receive_count_and_redrive() {
        let q = MemoryQueue::new(2, Duration::from_secs(30));
        let t0 = Timestamp::from_unix_secs(1_800_000_000);
        q.set_now(t0);
        q.enqueue(&[DeliveryMessage::new("e1", Destination::Meta)])
            .await;
        let r = q.receive(Destination::Meta, 10);
        assert_eq!(r.len(), 1);
        assert!(
            q.receive(Destination::Meta, 10).is_empty(),
            "invisible while in flight"
        );
        q.set_now(t0.plus_secs(31));
        assert_eq!(q.receive(Destination::Meta, 10)[0].receive_count, 2);
        q.set_now(t0.plus_secs(62));
        assert!(
            q.receive(Destination::Meta, 10).is_empty(),
            "third receive moves it to the DLQ"
        );
        assert_eq!(q.dlq(Destination::Meta).len(), 1);
        assert_eq!(q.redrive(Destination::Meta), 1);
        let r = q.receive(Destination::Meta, 10);
        assert_eq!(r[0].receive_count, 1);
        assert!(q.delete(Destination::Meta, &r[0].receipt));
        assert_eq!(q.depth(Destination::Meta), 0);
    }

    #[tokio::test]
    async fn batches_of_ten_and_failures() {
        let q = MemoryQueue::new(3, Duration::from_secs(30));
        let msgs: Vec<_> = (0..25)
            .map(|i| DeliveryMessage::new(format!("e{i}"), Destination::Google))
            .collect();
        assert!(q.enqueue(&msgs).await.is_empty());
        assert_eq!(q.send_calls(), 3);
        q.break_destination(Destination::Meta, true);
        let failed = q
            .enqueue(&[DeliveryMessage::new("x", Destination::Meta)])
            .await;
        assert_eq!(failed.len(), 1);
    }
}
