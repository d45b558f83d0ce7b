//! One SQS batch through a destination, written once for every destination: claim each event,
//! prepare and batch the sendable ones, send, classify, record state and the delivery log,
//! then retry (visibility), dead-letter, or acknowledge each message.

use super::{Backoff, Outcome};
use crate::delivery::{Claimability, DeliveryLogEntry, DeliveryStatus, Destination, ErrorInfo};
use crate::event::{CanonicalEvent, EventName};
use crate::queue::{DeadLetter, DeliveryMessage, DeliveryQueue};
use crate::store::{ClaimOutcome, EventStore, Transition};
use crate::timestamp::Timestamp;
use async_trait::async_trait;
use futures::future::join_all;
use std::collections::BTreeMap;
use std::time::Duration;

/// One SQS record as the sender Lambda receives it.
#[derive(Clone, Debug)]
pub struct Record {
    pub message_id: String,
    pub receipt: String,
    pub body: String,
}

/// What a destination contributes: how to turn a claimed event into a request item, how to
/// send a group of items, and how many fit in one request.
#[async_trait]
pub trait Platform: Send + Sync {
    type Item: Send + Sync + Clone;

    fn destination(&self) -> Destination;

    /// Most items per request.
    fn max_batch(&self) -> usize;

    /// The request item for one event and the key it is grouped by (pixel, customer), or why
    /// the event can never be valid for this platform (it is then `rejected`, not sent, so it
    /// cannot sink a batch). For a refund, `order` holds every stored event of its order (the
    /// won event it adjusts and all refunds so far); for other events it is empty.
    fn prepare(
        &self,
        event: &CanonicalEvent,
        order: &[CanonicalEvent],
        now: Timestamp,
    ) -> Result<(String, Self::Item), ErrorInfo>;

    /// The status a delivered item is recorded with: `Delivered`, or a delivered-with-a-caveat
    /// status such as `RetractionUnsupported` (a full refund restated to zero).
    fn delivered_status(&self, _item: &Self::Item) -> DeliveryStatus {
        DeliveryStatus::Delivered
    }

    /// Sends one group (at most `max_batch` items); one outcome per item, in order.
    async fn send(&self, group: &str, items: &[Self::Item]) -> Vec<Outcome>;
}

#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub lease_secs: i64,
    pub max_attempts: u32,
    pub backoff: Backoff,
    /// How long a refund waits before looking for its delivered original again.
    pub refund_wait: Duration,
}

/// What happened to each message, for logs and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// SQS message ids to list in `batchItemFailures`: they stay on the queue.
    pub failures: Vec<String>,
    pub results: BTreeMap<String, String>,
    /// Configuration errors that need a person (bad token, terms not accepted).
    pub alerts: usize,
}

struct Claimed<I> {
    record: Record,
    message: DeliveryMessage,
    event: CanonicalEvent,
    attempt: u32,
    budget_used: u32,
    item: Option<(String, I)>,
    delivered_as: DeliveryStatus,
    request_at: Timestamp,
}

const CONCURRENT_CLAIMS: usize = 64;

/// Processes one SQS batch for `platform`. Never fails as a whole: every message ends
/// acknowledged (done, skipped, rejected, dead-lettered) or listed as a failure (to retry).
pub async fn process_batch<P: Platform>(
    records: Vec<Record>,
    platform: &P,
    store: &dyn EventStore,
    queue: &dyn DeliveryQueue,
    cfg: &PipelineConfig,
    now: Timestamp,
) -> BatchReport {
    let dest = platform.destination();
    // One clock: `now` at the start, advanced by monotonic time, so request and response
    // times agree with the claim and retry times computed from `now`.
    let started = std::time::Instant::now();
    let clock = || now.plus_millis(started.elapsed().as_millis() as i64);
    let mut report = BatchReport::default();
    let mut visibility: Vec<(String, Duration)> = Vec::new();
    let mut claimed: Vec<Claimed<P::Item>> = Vec::new();

    // Claim every event (bounded concurrency); settle what needs no send right away.
    let mut parsed = Vec::new();
    for r in records {
        match DeliveryMessage::from_body(&r.body) {
            Ok(m) if m.destination == dest => parsed.push((r, m)),
            Ok(m) => {
                tracing::error!(message_id = %r.message_id, destination = %m.destination, "message for another destination; dropped");
                report
                    .results
                    .insert(r.message_id.clone(), "wrong_destination".into());
            }
            Err(e) => {
                tracing::error!(message_id = %r.message_id, error = %e, "unreadable message; dropped");
                report
                    .results
                    .insert(r.message_id.clone(), "unreadable".into());
            }
        }
    }
    let lease_until = now.plus_secs(cfg.lease_secs);
    for chunk in parsed.chunks(CONCURRENT_CLAIMS) {
        let outcomes = join_all(
            chunk
                .iter()
                .map(|(_, m)| store.claim(&m.event_id, dest, now, lease_until)),
        )
        .await;
        for ((record, message), outcome) in chunk.iter().cloned().zip(outcomes) {
            let id = message.event_id.clone();
            match outcome {
                Ok(ClaimOutcome::Claimed(event)) => {
                    let state = &event.destinations[&dest];
                    let (attempt, budget_used) = (state.attempts, state.attempts_in_budget());
                    claimed.push(Claimed {
                        record,
                        message,
                        event: *event,
                        attempt,
                        budget_used,
                        item: None,
                        delivered_as: DeliveryStatus::Delivered,
                        request_at: now,
                    });
                }
                Ok(ClaimOutcome::Refused(why, _)) => match why {
                    Claimability::AlreadyDelivered => {
                        tracing::info!(event_id = %id, destination = %dest, result = "skipped_duplicate", "already delivered");
                        report
                            .results
                            .insert(record.message_id, "skipped_duplicate".into());
                    }
                    Claimability::Leased { until } | Claimability::NotDue { at: until } => {
                        // Someone holds it, or it is early: look again when that ends.
                        let wait = until.secs_since(&now).max(1) as u64;
                        visibility.push((record.receipt.clone(), Duration::from_secs(wait)));
                        report.failures.push(record.message_id.clone());
                        report.results.insert(record.message_id, "deferred".into());
                    }
                    Claimability::Closed(status) => {
                        tracing::info!(event_id = %id, destination = %dest, result = status.as_str(), "nothing to send");
                        report
                            .results
                            .insert(record.message_id, status.as_str().into());
                    }
                    Claimability::Claimable => {
                        report.failures.push(record.message_id.clone());
                        report
                            .results
                            .insert(record.message_id, "claim_conflict".into());
                    }
                },
                Ok(ClaimOutcome::Missing) => {
                    tracing::error!(event_id = %id, destination = %dest, result = "missing", "event not in the store; dropped");
                    report.results.insert(record.message_id, "missing".into());
                }
                Err(e) => {
                    tracing::warn!(event_id = %id, destination = %dest, error = %e, result = "retry", "claim failed; message retried");
                    report.failures.push(record.message_id.clone());
                    report
                        .results
                        .insert(record.message_id, "store_unavailable".into());
                }
            }
        }
    }

    // A refund goes out only after its original conversion reached this destination, so a
    // platform never sees an adjustment before the conversion it adjusts.
    let mut settled: Vec<(usize, Outcome, Timestamp)> = Vec::new();
    let mut orders: Vec<Option<Vec<CanonicalEvent>>> = vec![Some(Vec::new()); claimed.len()];
    for (i, c) in claimed.iter().enumerate() {
        if c.event.event_name == EventName::Refund {
            match refund_gate(&c.event, dest, store, cfg.refund_wait).await {
                Ok(order) => orders[i] = Some(order),
                Err(o) => {
                    settled.push((i, o, now));
                    orders[i] = None;
                }
            }
        }
    }

    // Prepare; what can never be valid is closed as rejected and never sent.
    for (i, c) in claimed.iter_mut().enumerate() {
        let Some(order) = &orders[i] else {
            continue;
        };
        match platform.prepare(&c.event, order, now) {
            Ok(item) => {
                c.delivered_as = platform.delivered_status(&item.1);
                c.item = Some(item);
            }
            Err(error) => settled.push((
                i,
                Outcome::Rejected {
                    error,
                    dead_letter: false,
                    alert: false,
                },
                now,
            )),
        }
    }

    // Group and send in chunks of the platform's batch size.
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, c) in claimed.iter().enumerate() {
        if let Some((g, _)) = &c.item {
            groups.entry(g.clone()).or_default().push(i);
        }
    }
    for (group, idx) in groups {
        for chunk in idx.chunks(platform.max_batch().max(1)) {
            let items: Vec<P::Item> = chunk
                .iter()
                .filter_map(|&i| claimed[i].item.as_ref().map(|(_, it)| it.clone()))
                .collect();
            let request_at = clock();
            let outcomes = platform.send(&group, &items).await;
            let response_at = clock();
            for (k, &i) in chunk.iter().enumerate() {
                claimed[i].request_at = request_at;
                let o = outcomes
                    .get(k)
                    .cloned()
                    .unwrap_or_else(|| Outcome::Retryable {
                        error: ErrorInfo {
                            code: "no_outcome".into(),
                            message: "the platform answered fewer rows than sent".into(),
                        },
                        after: None,
                    });
                settled.push((i, o, response_at));
            }
        }
    }

    // Record each outcome, then route the message.
    let mut dead = Vec::new();
    let results = join_all(settled.iter().map(|(i, outcome, response_at)| {
        let c = &claimed[*i];
        let (transition, route) = decide(c, outcome, cfg, *response_at);
        let alert = matches!(outcome, Outcome::Rejected { alert: true, .. });
        async move {
            let kept = store
                .complete(&c.event.event_id, dest, c.attempt, &transition)
                .await;
            (i, transition, route, kept, alert)
        }
    }))
    .await;
    for (i, transition, route, kept, alert) in results {
        let c = &claimed[*i];
        let mid = c.record.message_id.clone();
        if alert {
            report.alerts += 1;
        }
        let err = transition.error.as_ref();
        tracing::info!(
            event_id = %c.event.event_id,
            order_id = c.event.order_id.as_deref().unwrap_or(""),
            entity_id = %c.event.entity_id,
            destination = %dest,
            attempt = c.attempt,
            result = %transition.log.result,
            error_code = err.map_or("", |e| e.code.as_str()),
            error_message = err.map_or("", |e| e.message.as_str()),
            alert,
            "delivery attempt"
        );
        match kept {
            Ok(true) => {}
            Ok(false) => {
                // Our lease lapsed and another worker took over; its result stands. The message
                // stays on the queue: the takeover may have come from this very message
                // (redelivered after its visibility timeout), and deleting it with our stale
                // receipt could leave the other worker's retry with no message. When it returns,
                // the claim sees the other worker's state.
                tracing::warn!(event_id = %c.event.event_id, destination = %dest, attempt = c.attempt, result = "lease_lost", "result discarded");
                report.failures.push(mid.clone());
                report.results.insert(mid, "lease_lost".into());
                continue;
            }
            Err(e) => {
                tracing::warn!(event_id = %c.event.event_id, destination = %dest, error = %e, "state write failed; message retried");
                report.failures.push(mid.clone());
                report.results.insert(mid, "store_unavailable".into());
                continue;
            }
        }
        report
            .results
            .insert(mid.clone(), transition.log.result.clone());
        match route {
            Route::Ack => {}
            Route::Retry(delay) => {
                visibility.push((c.record.receipt.clone(), delay));
                report.failures.push(mid);
            }
            Route::DeadLetter(reason) => dead.push((
                mid,
                DeadLetter {
                    message: c.message.clone(),
                    reason,
                    attempts: c.attempt,
                },
            )),
        }
    }
    if !dead.is_empty() {
        let failed = queue
            .dead_letter(&dead.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>())
            .await;
        for (mid, d) in &dead {
            if failed.contains(&d.message) {
                // Left on the source queue: SQS's redrive moves it after maxReceiveCount.
                report.failures.push(mid.clone());
            }
        }
    }
    if !visibility.is_empty() {
        let failed = queue.change_visibility(dest, &visibility).await;
        if !failed.is_empty() {
            tracing::warn!(destination = %dest, count = failed.len(), "visibility not changed; messages return after the queue's timeout");
        }
    }
    crate::metrics::emit(&report.metrics_line(dest, clock().unix_ms()));
    report
}

impl BatchReport {
    /// Counts per result as one EMF line (`config_errors` drives the configuration alarm,
    /// `failed` / `attempted` the error-rate alarm).
    pub fn metrics_line(&self, dest: Destination, timestamp_ms: i64) -> String {
        let count = |r: &str| self.results.values().filter(|v| v.as_str() == r).count() as f64;
        let delivered = count("delivered") + count("delivered_replay");
        let failed = count("rejected") + count("dead_letter");
        let retry = count("retry");
        let attempted = delivered + failed + retry;
        let rate = |n: f64| if attempted > 0.0 { n / attempted } else { 0.0 };
        crate::metrics::emf_line(
            timestamp_ms,
            &[("destination", dest.as_str())],
            &[
                ("delivered", delivered),
                ("skipped_duplicate", count("skipped_duplicate")),
                ("retry", retry),
                ("rejected", count("rejected")),
                ("dead_letter", count("dead_letter")),
                ("blocked_consent", count("blocked_consent")),
                ("config_errors", self.alerts as f64),
                ("attempted", attempted),
                ("failed", failed),
                ("retry_rate", rate(retry)),
                ("error_rate", rate(failed)),
            ],
        )
    }
}

/// The default of `PipelineConfig::refund_wait`.
pub const REFUND_WAIT: Duration = Duration::from_secs(900);

/// The order's stored events when the refund may be sent; else why it waits (or can never go).
async fn refund_gate(
    refund: &CanonicalEvent,
    dest: Destination,
    store: &dyn EventStore,
    wait: Duration,
) -> Result<Vec<CanonicalEvent>, Outcome> {
    let order = refund.order_id.as_deref().unwrap_or_default();
    let originals = match store.find_by_order(order).await {
        Ok(events) => events,
        Err(e) => {
            return Err(Outcome::Retryable {
                error: ErrorInfo {
                    code: "store_unavailable".into(),
                    message: e.to_string(),
                },
                after: None,
            });
        }
    };
    let won: Vec<_> = originals
        .iter()
        .filter(|e| e.event_name == EventName::Won)
        .collect();
    if won.iter().any(|w| {
        w.destinations
            .get(&dest)
            .is_some_and(|s| s.status.is_delivered())
    }) {
        return Ok(originals);
    }
    // An original that will never be sent (blocked, rejected) means the refund never can be.
    let closed = |s: DeliveryStatus| {
        matches!(
            s,
            DeliveryStatus::BlockedConsent
                | DeliveryStatus::Rejected
                | DeliveryStatus::RejectedNotSystemOfRecord
        )
    };
    if let Some(w) = won
        .iter()
        .find(|w| w.destinations.get(&dest).is_none_or(|s| closed(s.status)))
    {
        let status = w
            .destinations
            .get(&dest)
            .map_or("not mapped", |s| s.status.as_str());
        return Err(Outcome::Rejected {
            error: ErrorInfo {
                code: "original_not_sent".into(),
                message: format!(
                    "the won event for order {order} was not sent to {dest} ({status})"
                ),
            },
            dead_letter: false,
            alert: false,
        });
    }
    let why = if won.is_empty() {
        "is not known yet"
    } else {
        "has not been delivered yet"
    };
    Err(Outcome::Retryable {
        error: ErrorInfo {
            code: "original_not_delivered".into(),
            message: format!("the won event for order {order} {why} to {dest}"),
        },
        after: Some(wait),
    })
}

enum Route {
    Ack,
    Retry(Duration),
    DeadLetter(ErrorInfo),
}

fn decide<I>(
    c: &Claimed<I>,
    outcome: &Outcome,
    cfg: &PipelineConfig,
    response_at: Timestamp,
) -> (Transition, Route) {
    let log =
        |result: &str, error: Option<ErrorInfo>, platform_ref: Option<String>| DeliveryLogEntry {
            attempt: c.attempt,
            result: result.to_string(),
            request_at: c.request_at,
            response_at,
            error,
            platform_ref,
        };
    let t = |status, next: Option<Timestamp>, error: Option<ErrorInfo>, entry| Transition {
        status,
        now: response_at,
        next_attempt_at: next,
        error,
        log: entry,
    };
    match outcome {
        Outcome::Delivered {
            platform_ref,
            replay,
        } => {
            let label = if *replay {
                "delivered_replay"
            } else {
                "delivered"
            };
            (
                t(
                    c.delivered_as,
                    None,
                    None,
                    log(label, None, platform_ref.clone()),
                ),
                Route::Ack,
            )
        }
        Outcome::Retryable { error, after } if c.budget_used < cfg.max_attempts => {
            let delay = cfg.backoff.next(c.budget_used, *after);
            let next = response_at.plus_secs(delay.as_secs() as i64);
            (
                t(
                    DeliveryStatus::Retry,
                    Some(next),
                    Some(error.clone()),
                    log("retry", Some(error.clone()), None),
                ),
                Route::Retry(delay),
            )
        }
        Outcome::Retryable { error, .. } => {
            let e = ErrorInfo {
                code: error.code.clone(),
                message: format!(
                    "{} (gave up after {} attempts)",
                    error.message, c.budget_used
                ),
            };
            (
                t(
                    DeliveryStatus::DeadLetter,
                    None,
                    Some(e.clone()),
                    log("dead_letter", Some(e.clone()), None),
                ),
                Route::DeadLetter(e),
            )
        }
        Outcome::Rejected {
            error,
            dead_letter: true,
            ..
        } => (
            t(
                DeliveryStatus::DeadLetter,
                None,
                Some(error.clone()),
                log("dead_letter", Some(error.clone()), None),
            ),
            Route::DeadLetter(error.clone()),
        ),
        Outcome::Rejected {
            error,
            dead_letter: false,
            ..
        } => (
            t(
                DeliveryStatus::Rejected,
                None,
                Some(error.clone()),
                log("rejected", Some(error.clone()), None),
            ),
            Route::Ack,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::DestinationState;
    use crate::event::{ValidationContext, parse_event_json, validate};
    use crate::queue::memory::MemoryQueue;
    use crate::store::memory::MemoryStore;
    use serde_json::json;
    use std::sync::Mutex;

    /// A platform whose answers the test scripts, recording what it was sent.
    struct Scripted {
        answers: Mutex<Vec<Outcome>>,
        sent: Mutex<Vec<Vec<String>>>,
        max: usize,
    }

    impl Scripted {
        fn new(answers: Vec<Outcome>) -> Self {
            Scripted {
                answers: Mutex::new(answers),
                sent: Mutex::new(Vec::new()),
                max: 1000,
            }
        }
        fn sent(&self) -> Vec<Vec<String>> {
            self.sent.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl Platform for Scripted {
        type Item = String;
        fn destination(&self) -> Destination {
            Destination::Meta
        }
        fn max_batch(&self) -> usize {
            self.max
        }
        fn prepare(
            &self,
            e: &CanonicalEvent,
            _: &[CanonicalEvent],
            _: Timestamp,
        ) -> Result<(String, String), ErrorInfo> {
            if e.entity_id.starts_with("BAD") {
                return Err(ErrorInfo {
                    code: "invalid".into(),
                    message: "cannot be valid".into(),
                });
            }
            Ok(("pixel".into(), e.event_id.clone()))
        }
        async fn send(&self, _: &str, items: &[String]) -> Vec<Outcome> {
            self.sent.lock().unwrap().push(items.to_vec());
            let mut a = self.answers.lock().unwrap();
            let o = if a.is_empty() {
                Outcome::Delivered {
                    platform_ref: Some("t".into()),
                    replay: false,
                }
            } else {
                a.remove(0)
            };
            vec![o; items.len()]
        }
    }

    fn now() -> Timestamp {
        Timestamp::parse_rfc3339("2026-11-28T12:00:00Z").unwrap()
    }

    fn cfg() -> PipelineConfig {
        PipelineConfig {
            lease_secs: 60,
            max_attempts: 3,
            backoff: Backoff::default(),
            refund_wait: REFUND_WAIT,
        }
    }

    async fn stored(store: &MemoryStore, entity: &str) -> String {
        let v = json!({"source": "hubspot", "event_name": "lead", "occurred_at": "2026-11-28T10:00:00Z",
                       "entity_type": "lead", "entity_id": entity, "identity": {"email": "x@example.com"}});
        let ctx = ValidationContext::for_tests(now());
        let mut e = validate(&parse_event_json(&v.to_string()).unwrap(), &ctx).unwrap();
        e.destinations.insert(
            Destination::Meta,
            DestinationState::new(DeliveryStatus::Pending, now()),
        );
        store.put_new(&e).await.unwrap();
        e.event_id
    }

    fn record(n: usize, event_id: &str) -> Record {
        Record {
            message_id: format!("m{n}"),
            receipt: format!("r{n}"),
            body: DeliveryMessage::new(event_id, Destination::Meta).to_body(),
        }
    }

    fn e(code: &str) -> ErrorInfo {
        ErrorInfo {
            code: code.into(),
            message: code.into(),
        }
    }

    #[tokio::test]
    async fn each_outcome_class_gets_its_state_and_sqs_route() {
        let store = MemoryStore::new();
        let queue = MemoryQueue::new(5, Duration::from_secs(30));
        let ids = [
            stored(&store, "A").await,
            stored(&store, "B").await,
            stored(&store, "C").await,
            stored(&store, "BAD").await,
        ];
        // One request per event so each gets its own scripted answer.
        let mut p = Scripted::new(vec![
            Outcome::Delivered {
                platform_ref: Some("trace".into()),
                replay: false,
            },
            Outcome::Retryable {
                error: e("http_503"),
                after: Some(Duration::from_secs(90)),
            },
            Outcome::Rejected {
                error: e("meta_190"),
                dead_letter: true,
                alert: true,
            },
        ]);
        p.max = 1;
        let records: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(n, id)| record(n, id))
            .collect();
        let r = process_batch(records, &p, &store, &queue, &cfg(), now()).await;
        assert_eq!(r.failures, ["m1"], "only the retry stays on the queue");
        assert_eq!(r.alerts, 1);
        let emf: serde_json::Value =
            serde_json::from_str(&r.metrics_line(Destination::Meta, 0)).unwrap();
        assert_eq!(
            (
                emf["delivered"].as_f64(),
                emf["retry"].as_f64(),
                emf["dead_letter"].as_f64()
            ),
            (Some(1.0), Some(1.0), Some(1.0))
        );
        assert_eq!(
            (emf["rejected"].as_f64(), emf["config_errors"].as_f64()),
            (Some(1.0), Some(1.0))
        );
        let st = |i: usize| store.get_sync(&ids[i]).destinations[&Destination::Meta].clone();
        assert_eq!(st(0).status, DeliveryStatus::Delivered);
        assert_eq!(st(0).log[0].platform_ref.as_deref(), Some("trace"));
        assert_eq!(st(1).status, DeliveryStatus::Retry);
        assert_eq!(
            st(1).next_attempt_at,
            Some(now().plus_secs(90).max(st(1).next_attempt_at.unwrap()))
        );
        assert_eq!(st(2).status, DeliveryStatus::DeadLetter);
        assert_eq!(st(3).status, DeliveryStatus::Rejected);
        assert_eq!(st(3).last_error.as_ref().unwrap().code, "invalid");
        let dlq = queue.dlq(Destination::Meta);
        assert_eq!(dlq.len(), 1);
        assert_eq!(dlq[0].dead_letter.as_ref().unwrap().reason.code, "meta_190");
        assert_eq!(p.sent().len(), 3, "the invalid event was never sent");
    }

    #[tokio::test]
    async fn redelivery_of_a_delivered_event_sends_nothing() {
        let store = MemoryStore::new();
        let queue = MemoryQueue::new(5, Duration::from_secs(30));
        let id = stored(&store, "A").await;
        let p = Scripted::new(vec![]);
        process_batch(vec![record(0, &id)], &p, &store, &queue, &cfg(), now()).await;
        let r = process_batch(
            vec![record(1, &id)],
            &p,
            &store,
            &queue,
            &cfg(),
            now().plus_secs(5),
        )
        .await;
        assert_eq!(r.results["m1"], "skipped_duplicate");
        assert!(r.failures.is_empty());
        assert_eq!(p.sent().len(), 1);
    }

    #[tokio::test]
    async fn two_invocations_racing_for_one_event_send_it_once() {
        let store = MemoryStore::new();
        let queue = MemoryQueue::new(5, Duration::from_secs(30));
        let id = stored(&store, "A").await;
        let p = Scripted::new(vec![]);
        let c = cfg();
        let (a, b) = tokio::join!(
            process_batch(vec![record(0, &id)], &p, &store, &queue, &c, now()),
            process_batch(vec![record(1, &id)], &p, &store, &queue, &c, now())
        );
        assert_eq!(p.sent().len(), 1);
        let outcomes = [
            a.results.values().next().unwrap().clone(),
            b.results.values().next().unwrap().clone(),
        ];
        assert!(outcomes.contains(&"delivered".to_string()));
    }

    #[tokio::test]
    async fn transient_failures_end_in_the_dlq_after_the_attempt_limit() {
        let store = MemoryStore::new();
        let queue = MemoryQueue::new(50, Duration::from_secs(30));
        let id = stored(&store, "A").await;
        let p = Scripted::new(vec![
            Outcome::Retryable {
                error: e("http_500"),
                after: None
            };
            10
        ]);
        let mut t = now();
        for n in 0..3 {
            let r = process_batch(vec![record(n, &id)], &p, &store, &queue, &cfg(), t).await;
            t = store.get_sync(&id).destinations[&Destination::Meta]
                .next_attempt_at
                .unwrap_or(t)
                .plus_secs(1);
            let status = store.get_sync(&id).destinations[&Destination::Meta].status;
            if n < 2 {
                assert_eq!(
                    (status, r.failures.len()),
                    (DeliveryStatus::Retry, 1),
                    "attempt {}",
                    n + 1
                );
            } else {
                assert_eq!(
                    (status, r.failures.len()),
                    (DeliveryStatus::DeadLetter, 0),
                    "attempt 3 is the last"
                );
            }
        }
        let s = store.get_sync(&id).destinations[&Destination::Meta].clone();
        assert_eq!(
            s.log.iter().map(|l| l.result.as_str()).collect::<Vec<_>>(),
            ["retry", "retry", "dead_letter"]
        );
        assert_eq!(queue.dlq(Destination::Meta).len(), 1);
    }

    #[tokio::test]
    async fn early_or_leased_messages_wait_without_sending() {
        let store = MemoryStore::new();
        let queue = MemoryQueue::new(5, Duration::from_secs(30));
        let id = stored(&store, "A").await;
        store
            .claim(&id, Destination::Meta, now(), now().plus_secs(60))
            .await
            .unwrap();
        let p = Scripted::new(vec![]);
        let r = process_batch(
            vec![record(0, &id)],
            &p,
            &store,
            &queue,
            &cfg(),
            now().plus_secs(1),
        )
        .await;
        assert_eq!(
            (r.failures.as_slice(), r.results["m0"].as_str()),
            (["m0".to_string()].as_slice(), "deferred")
        );
        assert!(p.sent().is_empty());
    }

    #[tokio::test]
    async fn a_refund_waits_for_its_won_event_to_be_delivered() {
        let store = MemoryStore::new();
        let queue = MemoryQueue::new(5, Duration::from_secs(30));
        let ctx = ValidationContext::for_tests(now());
        let mk = |name: &str, at: &str, value: f64| {
            let v = json!({"source": "hubspot", "event_name": name, "occurred_at": at, "entity_type": "opportunity",
                           "entity_id": "D-1", "order_id": "O-1", "value": value, "currency": "USD",
                           "identity": {"email": "x@example.com"}});
            let mut e = validate(&parse_event_json(&v.to_string()).unwrap(), &ctx).unwrap();
            e.destinations.insert(
                Destination::Meta,
                DestinationState::new(DeliveryStatus::Pending, now()),
            );
            e
        };
        let refund = mk("refund", "2026-11-28T11:00:00Z", 20.0);
        store.put_new(&refund).await.unwrap();
        let p = Scripted::new(vec![]);
        // The refund arrives first: it waits and nothing is sent.
        let r = process_batch(
            vec![record(0, &refund.event_id)],
            &p,
            &store,
            &queue,
            &cfg(),
            now(),
        )
        .await;
        assert_eq!(r.failures, ["m0"]);
        let s = store.get_sync(&refund.event_id).destinations[&Destination::Meta].clone();
        assert_eq!(
            (s.status, s.last_error.unwrap().code.as_str()),
            (DeliveryStatus::Retry, "original_not_delivered")
        );
        assert_eq!(
            s.next_attempt_at,
            Some(now().plus_secs(REFUND_WAIT.as_secs() as i64))
        );
        assert!(p.sent().is_empty());
        // The won event is delivered; the refund goes out on its next attempt.
        let won = mk("won", "2026-11-28T10:00:00Z", 100.0);
        store.put_new(&won).await.unwrap();
        process_batch(
            vec![record(1, &won.event_id)],
            &p,
            &store,
            &queue,
            &cfg(),
            now(),
        )
        .await;
        let later = now().plus_secs(REFUND_WAIT.as_secs() as i64);
        let r = process_batch(
            vec![record(2, &refund.event_id)],
            &p,
            &store,
            &queue,
            &cfg(),
            later,
        )
        .await;
        assert!(r.failures.is_empty());
        assert_eq!(
            store.get_sync(&refund.event_id).destinations[&Destination::Meta].status,
            DeliveryStatus::Delivered
        );
        assert_eq!(
            p.sent(),
            [vec![won.event_id.clone()], vec![refund.event_id.clone()]]
        );
    }

    #[tokio::test]
    async fn a_refund_of_a_won_event_that_was_never_sent_is_rejected() {
        let store = MemoryStore::new();
        let queue = MemoryQueue::new(5, Duration::from_secs(30));
        let ctx = ValidationContext::for_tests(now());
        let mut ids = Vec::new();
        for (name, status) in [
            ("won", DeliveryStatus::BlockedConsent),
            ("refund", DeliveryStatus::Pending),
        ] {
            let v = json!({"source": "hubspot", "event_name": name, "occurred_at": "2026-11-28T10:00:00Z", "entity_type": "opportunity",
                           "entity_id": "D-2", "order_id": "O-2", "value": 5, "currency": "USD"});
            let mut e = validate(&parse_event_json(&v.to_string()).unwrap(), &ctx).unwrap();
            e.destinations
                .insert(Destination::Meta, DestinationState::new(status, now()));
            store.put_new(&e).await.unwrap();
            ids.push(e.event_id);
        }
        let p = Scripted::new(vec![]);
        let r = process_batch(vec![record(0, &ids[1])], &p, &store, &queue, &cfg(), now()).await;
        assert!(r.failures.is_empty());
        let s = store.get_sync(&ids[1]).destinations[&Destination::Meta].clone();
        assert_eq!(
            (s.status, s.last_error.unwrap().code.as_str()),
            (DeliveryStatus::Rejected, "original_not_sent")
        );
        assert!(p.sent().is_empty());
    }

    #[tokio::test]
    async fn batches_are_cut_at_the_platform_limit() {
        let store = MemoryStore::new();
        let queue = MemoryQueue::new(5, Duration::from_secs(30));
        let mut records = Vec::new();
        for n in 0..25 {
            records.push(record(n, &stored(&store, &format!("E{n}")).await));
        }
        let mut p = Scripted::new(vec![]);
        p.max = 10;
        process_batch(records, &p, &store, &queue, &cfg(), now()).await;
        assert_eq!(
            p.sent().iter().map(Vec::len).collect::<Vec<_>>(),
            [10, 10, 5]
        );
    }
}
