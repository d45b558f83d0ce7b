//! One SQS batch through a destination, written once for every destination: claim each event,
//! hold its order (wons) or find its won (refunds), prepare and batch the sendable ones, send
//! within the invocation's time, classify, record state and the delivery log after every
//! request, then retry (visibility), dead-letter, or acknowledge each message.

use super::{Backoff, Limits, MAX_VISIBILITY, Outcome};
use crate::delivery::{
    Claimability, DeliveryLogEntry, DeliveryStatus, Destination, DestinationState, ErrorCode,
    ErrorInfo, PairResult,
};
use crate::event::{CanonicalEvent, EventName};
use crate::queue::{DeadLetter, DeliveryMessage, DeliveryQueue};
use crate::store::{ClaimOutcome, EventStore, OrderHold, StoreError, Transition};
use crate::timestamp::Timestamp;
use async_trait::async_trait;
use futures::future::join_all;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// One SQS record as the sender Lambda receives it.
#[derive(Clone, Debug, Default)]
pub struct Record {
    pub message_id: String,
    pub receipt: String,
    pub body: String,
    /// The message's string attributes (a DLQ message carries `attempts`, the redrive token of
    /// messages dead-lettered before the token moved into the body).
    pub attributes: BTreeMap<String, String>,
}

impl Record {
    pub fn new(message_id: impl Into<String>, receipt: impl Into<String>, body: String) -> Self {
        Record {
            message_id: message_id.into(),
            receipt: receipt.into(),
            body,
            attributes: BTreeMap::new(),
        }
    }
}

/// What a destination contributes: how to turn a claimed event into a request item, how to
/// send a group of items, and how many fit in one request.
#[async_trait]
pub trait Platform: Send + Sync {
    type Item: Send + Sync + Clone + PartialEq;

    fn destination(&self) -> Destination;

    /// Most items per request.
    fn max_batch(&self) -> usize;

    /// The longest one request may take: no send starts with less of the invocation left
    /// than this plus a margin, so results are always recorded before the function is stopped.
    fn request_timeout(&self) -> Duration;

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

    /// What the item is sent as (Google's conversion action, Meta's event name), kept in the
    /// delivery log so later adjustments target what was really sent.
    fn sent_as(&self, _item: &Self::Item) -> Option<String> {
        None
    }

    /// Items with the same key would be one row to the platform (Google: the call, the action
    /// and the order id). At most one is sent per request; equal ones share its outcome, and
    /// a different one waits for the next request.
    fn row_key(&self, _item: &Self::Item) -> Option<String> {
        None
    }

    /// Before a refund is prepared: whether the platform has confirmed it processed the won
    /// the refund adjusts (Data Manager works asynchronously). `Err` is the refund's outcome
    /// (a `Wait`, or a retry when the platform could not be asked).
    async fn confirm_original(
        &self,
        _refund: &CanonicalEvent,
        _order: &[CanonicalEvent],
    ) -> Result<(), Outcome> {
        Ok(())
    }

    /// Sends one group (at most `max_batch` items) within `limits`; one outcome per item, in
    /// order.
    async fn send(&self, group: &str, items: &[Self::Item], limits: Limits) -> Vec<Outcome>;
}

#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub lease_secs: i64,
    pub max_attempts: u32,
    pub backoff: Backoff,
    /// How long a refund whose won is not delivered yet first waits before looking again; the
    /// wait grows with the time already waited, up to [`max_wait_step`].
    pub refund_wait: Duration,
    /// How long a pair may wait for something else (a refund for its won, a won's
    /// confirmation) before it ends: dead-lettered, or `unconfirmed`. Outside the attempt
    /// budget, and below the queue's retention.
    pub wait_deadline: Duration,
}

impl PipelineConfig {
    pub fn new(lease_secs: i64, max_attempts: u32, backoff: Backoff) -> Self {
        PipelineConfig {
            lease_secs,
            max_attempts,
            backoff,
            refund_wait: REFUND_WAIT,
            wait_deadline: WAIT_DEADLINE,
        }
    }
}

/// The default of `PipelineConfig::refund_wait`.
pub const REFUND_WAIT: Duration = Duration::from_secs(900);
/// The default of `PipelineConfig::wait_deadline`: three days covers Google's own holds (6 h
/// for a new click, hourly retries) and the won's whole retry budget, and stays inside the
/// delivery queues' seven-day retention.
pub const WAIT_DEADLINE: Duration = Duration::from_secs(72 * 3600);
/// The longest single wait step.
pub const MAX_WAIT_STEP: Duration = Duration::from_secs(6 * 3600);

/// The longest wait step for a given first wait: 24 of them, and never past [`MAX_WAIT_STEP`]
/// (6 hours for the default 15 minutes). Scaling with the first wait keeps a short configured
/// wait (a test, a fast account) short all the way instead of jumping to hours.
pub fn max_wait_step(refund_wait: Duration) -> Duration {
    refund_wait.saturating_mul(24).min(MAX_WAIT_STEP)
}
/// Claims past the attempt budget by more than this are dead-lettered without a send: the
/// pair crashed or timed out its sender that often without a result.
pub const CLAIM_MARGIN: u32 = 2;
/// Time kept back at the end of an invocation to record results and route messages.
pub const SEND_MARGIN: Duration = Duration::from_secs(5);
/// Requests one group's send may make to isolate bad items.
pub const MAX_REQUESTS_PER_SEND: usize = 40;
const CONCURRENT_CLAIMS: usize = 64;
/// State writes in flight at once: enough to hide latency, few enough not to burst the table.
const CONCURRENT_WRITES: usize = 32;

/// One invocation: its start time and, in Lambda, its deadline.
#[derive(Clone, Copy, Debug)]
pub struct Invocation {
    pub now: Timestamp,
    pub deadline: Option<Instant>,
}

impl From<Timestamp> for Invocation {
    fn from(now: Timestamp) -> Self {
        Invocation {
            now,
            deadline: None,
        }
    }
}

/// What happened to each message, for logs and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// SQS message ids to list in `batchItemFailures`: they stay on the queue.
    pub failures: Vec<String>,
    pub results: BTreeMap<String, PairResult>,
    /// Configuration errors that need a person (bad token, terms not accepted): distinct
    /// error codes, so one refused request of 2,000 events is one, not 2,000.
    pub alerts: usize,
}

impl BatchReport {
    pub fn count(&self, r: PairResult) -> usize {
        self.results.values().filter(|v| **v == r).count()
    }
}

struct Claimed<I> {
    record: Record,
    message: DeliveryMessage,
    event: CanonicalEvent,
    /// The pair's state as claimed (log, wait start), and its destination.
    state: DestinationState,
    state_destination: Destination,
    attempt: u32,
    budget_used: u32,
    item: Option<(String, I)>,
    delivered_as: DeliveryStatus,
    sent_as: Option<String>,
    request_at: Timestamp,
}

/// What the batch will do with its messages, gathered as outcomes are recorded.
#[derive(Default)]
struct Routing {
    report: BatchReport,
    visibility: Vec<(String, Duration)>,
    dead: Vec<(String, DeadLetter)>,
    /// The configuration error codes seen in this batch (`report.alerts` counts them).
    alert_codes: std::collections::BTreeSet<String>,
}

impl Routing {
    fn keep(&mut self, message_id: &str, result: PairResult) {
        self.report.failures.push(message_id.to_string());
        self.report.results.insert(message_id.to_string(), result);
    }

    fn done(&mut self, message_id: &str, result: PairResult) {
        self.report.results.insert(message_id.to_string(), result);
    }
}

/// The dead-letter token a record carries: in its body, or (messages dead-lettered before the
/// token moved into the body) the `attempts` attribute the bridge set on every DLQ message.
fn redrive_token(record: &Record, message: &DeliveryMessage) -> Option<u32> {
    message.redrive_of.or_else(|| {
        record
            .attributes
            .get("attempts")
            .and_then(|a| a.parse().ok())
    })
}

/// Processes one SQS batch for `platform`. Never fails as a whole: every message ends
/// acknowledged (done, skipped, rejected, dead-lettered) or listed as a failure (to retry).
pub async fn process_batch<P: Platform>(
    records: Vec<Record>,
    platform: &P,
    store: &dyn EventStore,
    queue: &dyn DeliveryQueue,
    cfg: &PipelineConfig,
    invocation: impl Into<Invocation>,
) -> BatchReport {
    let inv: Invocation = invocation.into();
    let now = inv.now;
    let dest = platform.destination();
    // One clock: `now` at the start, advanced by monotonic time, so request and response
    // times agree with the claim and retry times computed from `now`.
    let started = Instant::now();
    let clock = || now.plus(started.elapsed());
    // No request starts after this: its answer must be recorded before the deadline.
    let start_by = inv.deadline.map(|d| {
        d.checked_sub(platform.request_timeout() + SEND_MARGIN)
            .unwrap_or(started)
    });
    let mut routing = Routing::default();

    // Read every message; claim each (event, destination) with bounded concurrency.
    let mut parsed = Vec::new();
    for r in records {
        match DeliveryMessage::from_body(&r.body) {
            Ok(m) if m.destination == dest => parsed.push((r, m)),
            Ok(m) => {
                tracing::error!(message_id = %r.message_id, destination = %m.destination, result = "wrong_destination", "message for another destination; dropped");
                routing.done(&r.message_id, PairResult::WrongDestination);
            }
            Err(e) => {
                tracing::error!(message_id = %r.message_id, error = %e, result = "unreadable", "unreadable message; dropped");
                routing.done(&r.message_id, PairResult::Unreadable);
            }
        }
    }
    let lease_until = now.plus_secs(cfg.lease_secs);
    let mut claimed: Vec<Claimed<P::Item>> = Vec::new();
    for chunk in parsed.chunks(CONCURRENT_CLAIMS) {
        let outcomes = join_all(
            chunk
                .iter()
                .map(|(r, m)| store.claim(&m.key, dest, now, lease_until, redrive_token(r, m))),
        )
        .await;
        for ((record, message), outcome) in chunk.iter().cloned().zip(outcomes) {
            let key = message.key.clone();
            let mid = record.message_id.clone();
            match outcome {
                Ok(ClaimOutcome::Claimed(event)) => {
                    let Some(state) = event.destinations.get(&dest).cloned() else {
                        routing.done(&mid, PairResult::Missing);
                        continue;
                    };
                    claimed.push(Claimed {
                        record,
                        message,
                        attempt: state.attempts,
                        budget_used: state.attempts_in_budget(),
                        state,
                        state_destination: dest,
                        event: *event,
                        item: None,
                        delivered_as: DeliveryStatus::Delivered,
                        sent_as: None,
                        request_at: now,
                    });
                }
                Ok(ClaimOutcome::Refused(why, _)) => match why {
                    Claimability::AlreadyDelivered => {
                        tracing::info!(key = %key, destination = %dest, result = "already_delivered", "already delivered; nothing sent");
                        routing.done(&mid, PairResult::AlreadyDelivered);
                    }
                    Claimability::Leased { until } | Claimability::NotDue { at: until } => {
                        // Someone holds it, or it is early: look again when that ends.
                        let wait = until.secs_since(&now).max(1).unsigned_abs();
                        routing
                            .visibility
                            .push((record.receipt.clone(), Duration::from_secs(wait)));
                        routing.keep(&mid, PairResult::Deferred);
                    }
                    Claimability::Closed(status) => {
                        tracing::info!(key = %key, destination = %dest, status = status.as_str(), result = "closed", "nothing to send");
                        routing.done(&mid, PairResult::Closed);
                    }
                    Claimability::Claimable => routing.keep(&mid, PairResult::Deferred),
                },
                Ok(ClaimOutcome::Missing) => {
                    tracing::error!(key = %key, destination = %dest, result = "missing", "event not in the store; dropped");
                    routing.done(&mid, PairResult::Missing);
                }
                Err(e) => {
                    tracing::warn!(key = %key, destination = %dest, error = %e, result = "store_unavailable", "claim failed; message retried");
                    routing.keep(&mid, PairResult::StoreUnavailable);
                }
            }
        }
    }

    // Checks before anything is built: each may settle a pair without a send.
    let mut settled: Vec<(usize, Outcome, Timestamp)> = Vec::new();
    let mut open: Vec<bool> = vec![true; claimed.len()];
    for (i, c) in claimed.iter().enumerate() {
        if c.budget_used > cfg.max_attempts.saturating_add(CLAIM_MARGIN) {
            // Claimed this often without a recorded result: the pair crashes or times out its
            // sender. It is parked for a person instead of being tried forever.
            settled.push((
                i,
                Outcome::Rejected {
                    error: ErrorInfo::new(
                        ErrorCode::AttemptsExhausted,
                        format!(
                            "claimed {} times without a recorded result (the sender crashed or timed out); not sent again",
                            c.budget_used
                        ),
                    ),
                    dead_letter: true,
                    alert: false,
                },
                now,
            ));
            open[i] = false;
        }
    }
    // A won holds its order at this destination before it is sent: the order is counted once.
    let wons: Vec<usize> = (0..claimed.len())
        .filter(|&i| open[i] && claimed[i].event.event_name == EventName::Won)
        .collect();
    for chunk in wons.chunks(CONCURRENT_WRITES) {
        let guards = join_all(
            chunk
                .iter()
                .map(|&i| guard_order(&claimed[i].event, dest, store)),
        )
        .await;
        for (&i, g) in chunk.iter().zip(guards) {
            if let Err(o) = g {
                settled.push((i, o, now));
                open[i] = false;
            }
        }
    }
    // A refund goes out only after its won reached this destination (and the platform
    // confirmed it, where it must), so a platform never sees an adjustment before the
    // conversion it adjusts. One read of each order per batch: refunds of one order see one
    // snapshot, and so build one row.
    let mut snapshots: HashMap<String, Result<Vec<CanonicalEvent>, String>> = HashMap::new();
    let mut orders: Vec<Vec<CanonicalEvent>> = vec![Vec::new(); claimed.len()];
    for i in 0..claimed.len() {
        let c = &claimed[i];
        let correction = c.event.event_name == EventName::Correction;
        if !open[i] || !(c.event.event_name == EventName::Refund || correction) {
            continue;
        }
        let order_id = c.event.order_id.clone().unwrap_or_default();
        if !snapshots.contains_key(&order_id) {
            let read = store
                .find_by_order(&order_id)
                .await
                .map_err(|e| e.to_string());
            snapshots.insert(order_id.clone(), read);
        }
        let gate = match snapshots.get(&order_id) {
            // A correction's step waits for the step before it.
            Some(Ok(order)) if correction => {
                crate::correction::gate(&c.event, dest, order, cfg.refund_wait)
                    .map(|()| order.clone())
            }
            Some(Ok(order)) => match refund_gate(&c.event, dest, order, cfg.refund_wait) {
                Ok(()) => platform
                    .confirm_original(&c.event, order)
                    .await
                    .map(|()| order.clone()),
                Err(o) => Err(o),
            },
            Some(Err(e)) => Err(Outcome::Retryable {
                error: ErrorInfo::new(ErrorCode::StoreUnavailable, e.clone()),
                after: None,
            }),
            None => Ok(Vec::new()),
        };
        match gate {
            Ok(order) => orders[i] = order,
            Err(o) => {
                settled.push((i, o, now));
                open[i] = false;
            }
        }
    }
    // Prepare; what can never be valid is closed as rejected and never sent.
    for (i, c) in claimed.iter_mut().enumerate() {
        if !open[i] {
            continue;
        }
        match platform.prepare(&c.event, &orders[i], now) {
            Ok(item) => {
                c.delivered_as = platform.delivered_status(&item.1);
                c.sent_as = platform.sent_as(&item.1);
                c.item = Some(item);
            }
            Err(error) => {
                settled.push((
                    i,
                    Outcome::Rejected {
                        error,
                        dead_letter: false,
                        alert: false,
                    },
                    now,
                ));
                open[i] = false;
            }
        }
    }
    // What is settled so far is recorded before anything is sent.
    record(
        &claimed,
        std::mem::take(&mut settled),
        dest,
        store,
        cfg,
        &mut routing,
    )
    .await;

    // Group, keep one row per order in a request, and send chunk by chunk, recording each
    // chunk's results before the next starts: a function stopped at its deadline loses no
    // result, and nothing starts that could not be recorded in time.
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, c) in claimed.iter().enumerate() {
        if let Some((g, _)) = &c.item {
            groups.entry(g.clone()).or_default().push(i);
        }
    }
    for (group, idx) in groups {
        let (reps, followers, put_off) = collapse(platform, &claimed, &idx);
        let later = put_off_a_second(
            put_off,
            ErrorCode::OrderInRequest,
            "another row of this order is in this request; sent in the next one",
            now,
        );
        record(&claimed, later, dest, store, cfg, &mut routing).await;
        for chunk in reps.chunks(platform.max_batch().max(1)) {
            let members = |i: usize| {
                std::iter::once(i).chain(followers.get(&i).into_iter().flatten().copied())
            };
            if start_by.is_some_and(|t| Instant::now() >= t) {
                let out_of_time = put_off_a_second(
                    chunk.iter().flat_map(|&i| members(i)),
                    ErrorCode::OutOfTime,
                    "not sent: the invocation's time was up",
                    now,
                );
                record(&claimed, out_of_time, dest, store, cfg, &mut routing).await;
                continue;
            }
            let items: Vec<P::Item> = chunk
                .iter()
                .filter_map(|&i| claimed[i].item.as_ref().map(|(_, it)| it.clone()))
                .collect();
            let request_at = clock();
            let limits = Limits {
                max_requests: MAX_REQUESTS_PER_SEND,
                start_by,
            };
            let outcomes = platform.send(&group, &items, limits).await;
            let response_at = clock();
            let mut done = Vec::new();
            for (k, &i) in chunk.iter().enumerate() {
                let o = outcomes
                    .get(k)
                    .cloned()
                    .unwrap_or_else(|| Outcome::Retryable {
                        error: ErrorInfo::new(
                            ErrorCode::NoOutcome,
                            "the platform answered fewer rows than sent",
                        ),
                        after: None,
                    });
                for m in members(i) {
                    claimed[m].request_at = request_at;
                    done.push((m, o.clone(), response_at));
                }
            }
            record(&claimed, done, dest, store, cfg, &mut routing).await;
        }
    }

    let Routing {
        mut report,
        visibility,
        dead,
        ..
    } = routing;
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

/// The rows of one group to send, at most one per row key: `reps` are sent; `followers` (by
/// their representative) are equal rows that share its outcome; `put_off` are different rows
/// of an order already in the request, sent in the next one. Google refuses every row of an
/// order repeated in one request (DUPLICATE_ORDER_ID, DUPLICATE_ADJUSTMENT_IN_REQUEST).
fn collapse<P: Platform>(
    platform: &P,
    claimed: &[Claimed<P::Item>],
    idx: &[usize],
) -> (Vec<usize>, HashMap<usize, Vec<usize>>, Vec<usize>) {
    let mut reps = Vec::new();
    let mut followers: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut put_off = Vec::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    for &i in idx {
        let Some((_, item)) = &claimed[i].item else {
            continue;
        };
        let Some(key) = platform.row_key(item) else {
            reps.push(i);
            continue;
        };
        match by_key.get(&key) {
            None => {
                by_key.insert(key, i);
                reps.push(i);
            }
            Some(&r) => {
                let same = claimed[r].item.as_ref().is_some_and(|(_, it)| it == item);
                if same {
                    followers.entry(r).or_default().push(i);
                } else {
                    put_off.push(i);
                }
            }
        }
    }
    (reps, followers, put_off)
}

/// Records outcomes (bounded concurrency) and notes how each message is routed.
/// The claimed pairs at `indices`, each put off a second with `code`: sent again by the next
/// invocation, outside the retry budget (a wait, not a failed send).
fn put_off_a_second(
    indices: impl IntoIterator<Item = usize>,
    code: ErrorCode,
    why: &str,
    now: Timestamp,
) -> Vec<(usize, Outcome, Timestamp)> {
    indices
        .into_iter()
        .map(|i| {
            let after = Duration::from_secs(1);
            (i, Outcome::put_off(code.clone(), why, after), now)
        })
        .collect()
}

async fn record<I>(
    claimed: &[Claimed<I>],
    settled: Vec<(usize, Outcome, Timestamp)>,
    dest: Destination,
    store: &dyn EventStore,
    cfg: &PipelineConfig,
    routing: &mut Routing,
) {
    let settled: Vec<_> = (settled.into_iter())
        .map(|(i, o, at)| (i, crate::correction::escalate(&claimed[i].event, o), at))
        .collect();
    for chunk in settled.chunks(CONCURRENT_WRITES) {
        let results = join_all(chunk.iter().map(|(i, outcome, at)| {
            let c = &claimed[*i];
            let (transition, route, result) = decide(c, outcome, cfg, *at);
            let alert = matches!(outcome, Outcome::Rejected { alert: true, .. });
            async move {
                let kept = complete(store, &c.event.key, dest, c.attempt, &transition).await;
                (*i, transition, route, result, kept, alert)
            }
        }))
        .await;
        for (i, transition, route, result, kept, alert) in results {
            let c = &claimed[i];
            let mid = c.record.message_id.as_str();
            let err = transition.error.as_ref();
            if alert
                && routing
                    .alert_codes
                    .insert(err.map_or_else(String::new, |e| e.code.to_string()))
            {
                routing.report.alerts += 1;
            }
            tracing::info!(
                event_id = %c.event.event_id,
                order_id = c.event.order_id.as_deref().unwrap_or(""),
                entity_id = %c.event.entity_id,
                destination = %dest,
                attempt = c.attempt,
                result = result.as_str(),
                error_code = err.map_or("", |e| e.code.as_str()),
                error_message = err.map_or("", |e| e.message.as_str()),
                alert,
                "delivery attempt"
            );
            match kept {
                Ok(true) => {}
                Ok(false) => {
                    // Our lease lapsed and another worker took over; its result stands. The
                    // message stays on the queue: the takeover may have come from this very
                    // message (redelivered after its visibility timeout), and deleting it with
                    // our stale receipt could leave the other worker's retry with no message.
                    // When it returns, the claim sees the other worker's state.
                    tracing::warn!(event_id = %c.event.event_id, destination = %dest, attempt = c.attempt, result = "lease_lost", "result discarded");
                    routing.keep(mid, PairResult::LeaseLost);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(event_id = %c.event.event_id, destination = %dest, error = %e, result = "store_unavailable", "state write failed; message retried");
                    routing.keep(mid, PairResult::StoreUnavailable);
                    continue;
                }
            }
            match route {
                Route::Ack => routing.done(mid, result),
                Route::Retry(delay) => {
                    routing.visibility.push((c.record.receipt.clone(), delay));
                    routing.keep(mid, result);
                }
                Route::DeadLetter(reason) => {
                    routing.done(mid, result);
                    routing.dead.push((
                        mid.to_string(),
                        DeadLetter {
                            message: c.message.clone(),
                            reason,
                            attempts: c.attempt,
                        },
                    ));
                }
            }
        }
    }
}

/// Writes a transition; an item the store refuses as too large is written once more with the
/// bare minimum (the status, and this attempt's entry without its message), so one oversized
/// value can never keep a pair from being recorded.
async fn complete(
    store: &dyn EventStore,
    key: &str,
    dest: Destination,
    attempt: u32,
    t: &Transition,
) -> Result<bool, StoreError> {
    match store.complete(key, dest, attempt, t).await {
        Err(StoreError::TooLarge { reason, .. }) => {
            tracing::warn!(key, destination = %dest, reason = %reason, "state too large; recorded without its log");
            let strip = |e: &ErrorInfo| ErrorInfo {
                code: e.code.clone(),
                message: String::new(),
            };
            let minimal = Transition {
                error: t.error.as_ref().map(strip),
                log: t
                    .entry()
                    .map(|e| DeliveryLogEntry {
                        error: e.error.as_ref().map(strip),
                        ..e.clone()
                    })
                    .into_iter()
                    .collect(),
                ..t.clone()
            };
            store.complete(key, dest, attempt, &minimal).await
        }
        other => other,
    }
}

impl BatchReport {
    /// Counts per result as one EMF line (`config_errors` drives the configuration alarm,
    /// `failed` / `attempted` the error-rate alarm).
    pub fn metrics_line(&self, dest: Destination, timestamp_ms: i64) -> String {
        let count = |r: PairResult| self.count(r) as f64;
        let delivered = count(PairResult::Delivered) + count(PairResult::DeliveredReplay);
        let failed = count(PairResult::Rejected) + count(PairResult::DeadLetter);
        let retry = count(PairResult::Retry);
        let attempted = delivered + failed + retry;
        let rate = |n: f64| if attempted > 0.0 { n / attempted } else { 0.0 };
        crate::metrics::emf_line(
            timestamp_ms,
            &[("destination", dest.as_str())],
            &[
                ("delivered", delivered),
                ("already_delivered", count(PairResult::AlreadyDelivered)),
                ("retry", retry),
                ("waiting", count(PairResult::Waiting)),
                ("out_of_time", count(PairResult::OutOfTime)),
                ("rejected", count(PairResult::Rejected)),
                ("dead_letter", count(PairResult::DeadLetter)),
                ("duplicate_order", count(PairResult::DuplicateOrder)),
                ("unconfirmed", count(PairResult::Unconfirmed)),
                ("config_errors", self.alerts as f64),
                ("attempted", attempted),
                ("failed", failed),
                ("retry_rate", rate(retry)),
                ("error_rate", rate(failed)),
            ],
        )
    }
}

/// Holds the won's order at this destination, so the order is counted there once: the first
/// won holds it; a later won is closed as `duplicate_order` while the holder is delivered or
/// in flight, and takes the holder's place when the holder will never be counted (blocked,
/// rejected, dead-lettered, expired). The decision is the store's atomic conditional write on
/// the order item. Only where a won was delivered before order items existed (an upgraded
/// stack) is the by-order index read, to hand the hold to that won.
async fn guard_order(
    event: &CanonicalEvent,
    dest: Destination,
    store: &dyn EventStore,
) -> Result<(), Outcome> {
    let Some(order) = event.order_id.as_deref() else {
        return Ok(());
    };
    let unavailable = |e: StoreError| Outcome::Retryable {
        error: ErrorInfo::new(ErrorCode::StoreUnavailable, e.to_string()),
        after: None,
    };
    let duplicate = |holder: &CanonicalEvent, status: DeliveryStatus| Outcome::Closed {
        status: DeliveryStatus::DuplicateOrder,
        error: ErrorInfo::new(
            ErrorCode::DuplicateOrder,
            format!(
                "order {order} is already counted at {dest} by event {} ({status}); this won is not sent",
                holder.event_id
            ),
        ),
    };
    match store
        .hold_order(order, dest, &event.key)
        .await
        .map_err(unavailable)?
    {
        OrderHold::Held { first: false } => Ok(()),
        OrderHold::Held { first: true } => {
            let others = store.find_by_order(order).await.map_err(unavailable)?;
            let legacy = others.iter().find(|w| {
                w.key != event.key
                    && w.event_name == EventName::Won
                    && w.destinations
                        .get(&dest)
                        .is_some_and(|s| s.status.is_delivered())
            });
            let Some(w) = legacy else {
                return Ok(());
            };
            let status = w
                .destinations
                .get(&dest)
                .map_or(DeliveryStatus::Delivered, |s| s.status);
            store
                .take_over_order(order, dest, &event.key, &w.key)
                .await
                .map_err(unavailable)?;
            Err(duplicate(w, status))
        }
        OrderHold::HeldBy(holder_key) => {
            let holder = store.get(&holder_key).await.map_err(unavailable)?;
            if let Some(h) = &holder
                && let Some(s) = h.destinations.get(&dest)
                && (s.status.is_delivered() || s.status.is_open())
            {
                return Err(duplicate(h, s.status));
            }
            if store
                .take_over_order(order, dest, &holder_key, &event.key)
                .await
                .map_err(unavailable)?
            {
                Ok(())
            } else {
                Err(Outcome::Retryable {
                    error: ErrorInfo::new(
                        ErrorCode::OrderHoldMoved,
                        "another won of this order took the hold at the same moment",
                    ),
                    after: None,
                })
            }
        }
    }
}

/// Whether a refund may be sent, given its order's stored events. Only wons that can count
/// are considered: a won from a source that is not the system of record, or one closed as a
/// duplicate of its order, is neither the refund's original nor a reason to give up on it.
fn refund_gate(
    refund: &CanonicalEvent,
    dest: Destination,
    order: &[CanonicalEvent],
    wait: Duration,
) -> Result<(), Outcome> {
    let order_id = refund.order_id.as_deref().unwrap_or_default();
    let wons: Vec<&CanonicalEvent> = order
        .iter()
        .filter(|e| e.event_name == EventName::Won)
        .filter(|e| {
            !matches!(
                e.destinations.get(&dest).map(|s| s.status),
                Some(DeliveryStatus::RejectedNotSystemOfRecord | DeliveryStatus::DuplicateOrder)
            )
        })
        .collect();
    let status = |w: &CanonicalEvent| w.destinations.get(&dest).map(|s| s.status);
    // A correction moving the order's conversion to another action is on its way: the refund's
    // adjustment must reach the conversion that will count, so it waits for the move.
    if crate::correction::in_progress(order, dest) {
        return Err(Outcome::Wait {
            error: ErrorInfo::new(
                ErrorCode::CorrectionInProgress,
                format!("order {order_id} is being moved to another action at {dest}"),
            ),
            after: wait,
            on_deadline: Some(DeliveryStatus::DeadLetter),
        });
    }
    if wons
        .iter()
        .any(|w| status(w).is_some_and(|s| s.is_delivered()))
    {
        return Ok(());
    }
    // Every won that could count will never be sent (blocked, rejected, not mapped): neither
    // can the refund of it.
    let may_still_go = |w: &&&CanonicalEvent| {
        status(w).is_some_and(|s| s.is_open() || s == DeliveryStatus::DeadLetter)
    };
    if !wons.is_empty() && !wons.iter().any(|w| may_still_go(&w)) {
        let states: Vec<&str> = wons
            .iter()
            .map(|w| status(w).map_or("not mapped", |s| s.as_str()))
            .collect();
        return Err(Outcome::Rejected {
            error: ErrorInfo::new(
                ErrorCode::OriginalNotSent,
                format!(
                    "the won event for order {order_id} was not sent to {dest} ({})",
                    states.join(", ")
                ),
            ),
            dead_letter: false,
            alert: false,
        });
    }
    let why = if wons.is_empty() {
        "is not known yet"
    } else {
        "has not been delivered yet"
    };
    Err(Outcome::Wait {
        error: ErrorInfo::new(
            ErrorCode::OriginalNotDelivered,
            format!("the won event for order {order_id} {why} to {dest}"),
        ),
        after: wait,
        on_deadline: Some(DeliveryStatus::DeadLetter),
    })
}

enum Route {
    Ack,
    Retry(Duration),
    DeadLetter(ErrorInfo),
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// The state an outcome moves the pair to, how its message is routed, and what it is called.
fn decide<I>(
    c: &Claimed<I>,
    outcome: &Outcome,
    cfg: &PipelineConfig,
    at: Timestamp,
) -> (Transition, Route, PairResult) {
    struct T {
        status: DeliveryStatus,
        next: Option<Timestamp>,
        error: Option<ErrorInfo>,
        result: PairResult,
        platform_ref: Option<String>,
        release: bool,
        waiting_since: Option<Timestamp>,
    }
    let build = |t: T| {
        let entry = DeliveryLogEntry {
            attempt: c.attempt,
            result: t.result,
            request_at: c.request_at,
            response_at: at,
            error: t.error.clone(),
            platform_ref: t.platform_ref,
            sent_as: t.result.is_delivered().then(|| c.sent_as.clone()).flatten(),
        };
        (
            Transition {
                status: t.status,
                now: at,
                next_attempt_at: t.next,
                error: t.error,
                log: c.state.log_with(entry),
                release_attempt: t.release,
                waiting_since: t.waiting_since,
                scrub_browser: crate::privacy::closes_last_pair(
                    &c.event,
                    c.state_destination,
                    t.status,
                ),
            },
            t.result,
        )
    };
    let closed = |status, error: &ErrorInfo, result| T {
        status,
        next: None,
        error: Some(error.clone()),
        result,
        platform_ref: None,
        release: false,
        waiting_since: None,
    };
    let (t, route) = match outcome {
        Outcome::Delivered { platform_ref, .. } => (
            T {
                status: c.delivered_as,
                next: None,
                error: None,
                result: outcome.result(),
                platform_ref: platform_ref.clone(),
                release: false,
                waiting_since: None,
            },
            Route::Ack,
        ),
        Outcome::Retryable { error, after } if c.budget_used < cfg.max_attempts => {
            let delay = cfg.backoff.next(c.budget_used, *after);
            (
                T {
                    status: DeliveryStatus::Retry,
                    next: Some(at.plus_secs(secs(delay))),
                    ..closed(DeliveryStatus::Retry, error, PairResult::Retry)
                },
                Route::Retry(delay),
            )
        }
        Outcome::Retryable { error, .. } => {
            let e = ErrorInfo::new(
                error.code.clone(),
                format!(
                    "{} (gave up after {} attempts)",
                    error.message, c.budget_used
                ),
            );
            (
                closed(DeliveryStatus::DeadLetter, &e, PairResult::DeadLetter),
                Route::DeadLetter(e),
            )
        }
        Outcome::Rejected {
            error,
            dead_letter: true,
            ..
        } => (
            closed(DeliveryStatus::DeadLetter, error, PairResult::DeadLetter),
            Route::DeadLetter(error.clone()),
        ),
        Outcome::Rejected {
            error,
            dead_letter: false,
            ..
        } => (
            closed(DeliveryStatus::Rejected, error, PairResult::Rejected),
            Route::Ack,
        ),
        Outcome::Closed { status, error } => (closed(*status, error, outcome.result()), Route::Ack),
        Outcome::Wait {
            error,
            after,
            on_deadline: Some(end),
        } => {
            let since = c.state.waiting_since.unwrap_or(at);
            let waited = Duration::from_secs(at.secs_since(&since).max(0).unsigned_abs());
            if waited >= cfg.wait_deadline {
                let e = ErrorInfo::new(
                    error.code.clone(),
                    format!(
                        "{} (waited {} h; the deadline is {} h)",
                        error.message,
                        waited.as_secs() / 3600,
                        cfg.wait_deadline.as_secs() / 3600
                    ),
                );
                let result = if *end == DeliveryStatus::DeadLetter {
                    PairResult::DeadLetter
                } else {
                    PairResult::Unconfirmed
                };
                let route = if *end == DeliveryStatus::DeadLetter {
                    Route::DeadLetter(e.clone())
                } else {
                    Route::Ack
                };
                (closed(*end, &e, result), route)
            } else {
                // The longer it has waited, the longer it waits next: few receives over days.
                let cap = max_wait_step(cfg.refund_wait);
                let step = (*after).max(waited.min(cap)).min(MAX_VISIBILITY);
                (
                    T {
                        status: DeliveryStatus::Retry,
                        next: Some(at.plus_secs(secs(step))),
                        release: true,
                        waiting_since: Some(since),
                        ..closed(DeliveryStatus::Retry, error, PairResult::Waiting)
                    },
                    Route::Retry(step),
                )
            }
        }
        Outcome::Wait {
            error,
            after,
            on_deadline: None,
        } => (
            T {
                status: DeliveryStatus::Retry,
                next: Some(at.plus_secs(secs(*after))),
                release: true,
                waiting_since: c.state.waiting_since,
                ..closed(DeliveryStatus::Retry, error, PairResult::OutOfTime)
            },
            Route::Retry(*after),
        ),
    };
    let (transition, result) = build(t);
    (transition, route, result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ValidationContext, parse_event_json, validate};
    use crate::queue::memory::MemoryQueue;
    use crate::store::memory::MemoryStore;
    use serde_json::{Value, json};
    use std::sync::Mutex;

    #[test]
    fn wait_steps_scale_with_the_first_wait_and_stop_at_six_hours() {
        assert_eq!(max_wait_step(REFUND_WAIT), MAX_WAIT_STEP);
        assert_eq!(
            max_wait_step(Duration::from_secs(4)),
            Duration::from_secs(96)
        );
        assert_eq!(max_wait_step(Duration::from_secs(43_200)), MAX_WAIT_STEP);
    }

    /// A platform whose answers the test scripts, recording what it was sent. Items are the
    /// event's entity id (`row_key`: its part before `~`), and `send` sleeps `pause` first.
    struct Scripted {
        answers: Mutex<Vec<Outcome>>,
        sent: Mutex<Vec<Vec<String>>>,
        max: usize,
        pause: Duration,
    }

    impl Scripted {
        fn new(answers: Vec<Outcome>) -> Self {
            Scripted {
                answers: Mutex::new(answers),
                sent: Mutex::new(Vec::new()),
                max: 1000,
                pause: Duration::ZERO,
            }
        }
        fn sent(&self) -> Vec<Vec<String>> {
            self.sent.lock().unwrap().clone()
        }
        fn sends(&self) -> usize {
            self.sent().iter().map(Vec::len).sum()
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
        fn request_timeout(&self) -> Duration {
            Duration::from_secs(1)
        }
        fn prepare(
            &self,
            e: &CanonicalEvent,
            _: &[CanonicalEvent],
            _: Timestamp,
        ) -> Result<(String, String), ErrorInfo> {
            if e.entity_id.starts_with("BAD") {
                return Err(ErrorInfo::new(ErrorCode::Invalid, "cannot be valid"));
            }
            Ok(("pixel".into(), e.entity_id.clone()))
        }
        fn row_key(&self, item: &String) -> Option<String> {
            item.split_once('~').map(|(k, _)| k.to_string())
        }
        async fn send(&self, _: &str, items: &[String], _: Limits) -> Vec<Outcome> {
            if !self.pause.is_zero() {
                tokio::time::sleep(self.pause).await;
            }
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
        PipelineConfig::new(60, 3, Backoff::default())
    }

    fn event(v: Value) -> CanonicalEvent {
        let ctx = ValidationContext::for_tests(now());
        let mut e = validate(&parse_event_json(&v.to_string()).unwrap(), &ctx).unwrap();
        e.destinations.insert(
            Destination::Meta,
            DestinationState::new(DeliveryStatus::Pending, now()),
        );
        e
    }

    async fn stored(store: &MemoryStore, entity: &str) -> String {
        let e = event(
            json!({"source": "hubspot", "event_name": "lead", "occurred_at": "2026-11-28T10:00:00Z",
                       "entity_type": "lead", "entity_id": entity, "identity": {"email": "x@example.com"}}),
        );
        store.put_new(&e).await.unwrap();
        e.key
    }

    /// [`stored`] for each of `entities`, in order: their keys.
    async fn stored_all(store: &MemoryStore, entities: &[&str]) -> Vec<String> {
        let mut keys = Vec::new();
        for entity in entities {
            keys.push(stored(store, entity).await);
        }
        keys
    }

    fn revenue(name: &str, entity: &str, order: &str, at: &str, value: f64) -> CanonicalEvent {
        event(
            json!({"source": "hubspot", "event_name": name, "occurred_at": at, "entity_type": "opportunity",
                   "entity_id": entity, "order_id": order, "value": value, "currency": "USD",
                   "identity": {"email": "x@example.com"}}),
        )
    }

    /// One invocation with the one message `m{n}` for `key`, under the tests' configuration.
    async fn one<P: Platform>(
        p: &P,
        store: &MemoryStore,
        queue: &MemoryQueue,
        n: usize,
        key: &str,
        at: Timestamp,
    ) -> BatchReport {
        process_batch(vec![record(n, key)], p, store, queue, &cfg(), at).await
    }

    /// One invocation of `records` at `now()`, under the tests' configuration.
    async fn run_batch<P: Platform>(
        records: Vec<Record>,
        p: &P,
        store: &MemoryStore,
        queue: &MemoryQueue,
    ) -> BatchReport {
        process_batch(records, p, store, queue, &cfg(), now()).await
    }

    fn record(n: usize, key: &str) -> Record {
        Record::new(
            format!("m{n}"),
            format!("r{n}"),
            DeliveryMessage::new(key, Destination::Meta).to_body(),
        )
    }

    /// One message per key, `m0`, `m1`, ... in order.
    fn records_for(keys: &[String]) -> Vec<Record> {
        keys.iter()
            .enumerate()
            .map(|(n, key)| record(n, key))
            .collect()
    }

    fn e(code: &str) -> ErrorInfo {
        ErrorInfo::new(ErrorCode::parse(code), code)
    }

    fn state(store: &MemoryStore, key: &str) -> DestinationState {
        store.get_sync(key).destinations[&Destination::Meta].clone()
    }

    /// An empty store, and a queue whose redrive policy allows `max_receives` receives.
    fn memory(max_receives: u32) -> (MemoryStore, MemoryQueue) {
        (
            MemoryStore::new(),
            MemoryQueue::new(max_receives, Duration::from_secs(30)),
        )
    }

    /// Event "A" stored, and a platform that refuses its first send for good: after one
    /// message the pair is dead-lettered.
    async fn dead_lettered() -> (MemoryStore, MemoryQueue, String, Scripted) {
        let (store, queue) = memory(50);
        let id = stored(&store, "A").await;
        let p = Scripted::new(vec![Outcome::Rejected {
            error: e("meta_100"),
            dead_letter: true,
            alert: false,
        }]);
        one(&p, &store, &queue, 0, &id, now()).await;
        (store, queue, id, p)
    }

    #[tokio::test]
    async fn configuration_errors_count_once_per_code_not_per_event() {
        let (store, queue) = memory(5);
        let ids = stored_all(&store, &["A", "B", "C"]).await;
        let refused = |code: &str| Outcome::Rejected {
            error: e(code),
            dead_letter: true,
            alert: true,
        };
        let mut p = Scripted::new(vec![
            refused("terms_not_signed"),
            refused("terms_not_signed"),
            refused("meta_190"),
        ]);
        p.max = 1;
        let records = records_for(&ids);
        let r = run_batch(records, &p, &store, &queue).await;
        assert_eq!(r.alerts, 2, "two codes, one of them on two events");
        assert_eq!(r.count(PairResult::DeadLetter), 3);
    }

    #[tokio::test]
    async fn each_outcome_class_gets_its_state_and_sqs_route() {
        let (store, queue) = memory(5);
        let ids = stored_all(&store, &["A", "B", "C", "BAD"]).await;
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
        let records = records_for(&ids);
        let r = run_batch(records, &p, &store, &queue).await;
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
        let st = |i: usize| state(&store, &ids[i]);
        assert_eq!(st(0).status, DeliveryStatus::Delivered);
        assert_eq!(st(0).log[0].platform_ref.as_deref(), Some("trace"));
        assert_eq!(st(1).status, DeliveryStatus::Retry);
        assert!(st(1).next_attempt_at.unwrap() >= now().plus_secs(90));
        assert_eq!(st(2).status, DeliveryStatus::DeadLetter);
        assert_eq!(st(3).status, DeliveryStatus::Rejected);
        assert_eq!(st(3).last_error.as_ref().unwrap().code, "invalid");
        let dlq = queue.dlq(Destination::Meta);
        assert_eq!(dlq.len(), 1);
        assert_eq!(dlq[0].dead_letter.as_ref().unwrap().reason.code, "meta_190");
        assert_eq!(
            dlq[0].message.redrive_of,
            Some(1),
            "the DLQ body carries its redrive token"
        );
        assert_eq!(p.sent().len(), 3, "the invalid event was never sent");
    }

    #[tokio::test]
    async fn redelivery_of_a_delivered_event_sends_nothing() {
        let (store, queue) = memory(5);
        let id = stored(&store, "A").await;
        let p = Scripted::new(vec![]);
        one(&p, &store, &queue, 0, &id, now()).await;
        let r = one(&p, &store, &queue, 1, &id, now().plus_secs(5)).await;
        assert_eq!(r.results["m1"], PairResult::AlreadyDelivered);
        assert!(r.failures.is_empty());
        assert_eq!(p.sent().len(), 1);
    }

    #[tokio::test]
    async fn two_invocations_racing_for_one_event_send_it_once() {
        let (store, queue) = memory(5);
        let id = stored(&store, "A").await;
        let p = Scripted::new(vec![]);
        let c = cfg();
        let (a, b) = tokio::join!(
            process_batch(vec![record(0, &id)], &p, &store, &queue, &c, now()),
            process_batch(vec![record(1, &id)], &p, &store, &queue, &c, now())
        );
        assert_eq!(p.sent().len(), 1);
        let outcomes = [a.results["m0"], b.results["m1"]];
        assert!(outcomes.contains(&PairResult::Delivered));
    }

    #[tokio::test]
    async fn transient_failures_end_in_the_dlq_after_the_attempt_limit() {
        let (store, queue) = memory(50);
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
            let r = one(&p, &store, &queue, n, &id, t).await;
            t = state(&store, &id).next_attempt_at.unwrap_or(t).plus_secs(1);
            let status = state(&store, &id).status;
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
        let s = state(&store, &id);
        assert_eq!(
            s.log.iter().map(|l| l.result.as_str()).collect::<Vec<_>>(),
            ["retry", "retry", "dead_letter"]
        );
        assert_eq!(queue.dlq(Destination::Meta).len(), 1);
    }

    #[tokio::test]
    async fn early_or_leased_messages_wait_without_sending() {
        let (store, queue) = memory(5);
        let id = stored(&store, "A").await;
        store
            .claim(&id, Destination::Meta, now(), now().plus_secs(60), None)
            .await
            .unwrap();
        let p = Scripted::new(vec![]);
        let r = one(&p, &store, &queue, 0, &id, now().plus_secs(1)).await;
        assert_eq!(
            (r.failures.as_slice(), r.results["m0"]),
            (["m0".to_string()].as_slice(), PairResult::Deferred)
        );
        assert!(p.sent().is_empty());
    }

    #[tokio::test]
    async fn a_refund_waits_for_its_won_event_to_be_delivered() {
        let (store, queue) = memory(5);
        let refund = revenue("refund", "D-1", "O-1", "2026-11-28T11:00:00Z", 20.0);
        store.put_new(&refund).await.unwrap();
        let p = Scripted::new(vec![]);
        // The refund arrives first: it waits and nothing is sent.
        let r = one(&p, &store, &queue, 0, &refund.key, now()).await;
        assert_eq!(r.failures, ["m0"]);
        assert_eq!(r.results["m0"], PairResult::Waiting);
        let s = state(&store, &refund.key);
        assert_eq!(
            (s.status, s.last_error.unwrap().code.as_str()),
            (DeliveryStatus::Retry, "original_not_delivered")
        );
        assert_eq!(s.next_attempt_at, Some(now().plus_secs(900)));
        assert!(p.sent().is_empty());
        // The won event is delivered; the refund goes out on its next attempt.
        let won = revenue("won", "D-1", "O-1", "2026-11-28T10:00:00Z", 100.0);
        store.put_new(&won).await.unwrap();
        one(&p, &store, &queue, 1, &won.key, now()).await;
        let later = now().plus_secs(900);
        let r = one(&p, &store, &queue, 2, &refund.key, later).await;
        assert!(r.failures.is_empty());
        assert_eq!(state(&store, &refund.key).status, DeliveryStatus::Delivered);
        assert_eq!(p.sent(), [vec!["D-1".to_string()], vec!["D-1".to_string()]]);
    }

    #[tokio::test]
    async fn a_refund_of_a_won_event_that_was_never_sent_is_rejected() {
        let (store, queue) = memory(5);
        let mut won = revenue("won", "D-2", "O-2", "2026-11-28T10:00:00Z", 5.0);
        won.destinations.get_mut(&Destination::Meta).unwrap().status =
            DeliveryStatus::BlockedConsent;
        let refund = revenue("refund", "D-2", "O-2", "2026-11-28T10:30:00Z", 5.0);
        store.put_new(&won).await.unwrap();
        store.put_new(&refund).await.unwrap();
        let p = Scripted::new(vec![]);
        let r = one(&p, &store, &queue, 0, &refund.key, now()).await;
        assert!(r.failures.is_empty());
        let s = state(&store, &refund.key);
        assert_eq!(
            (s.status, s.last_error.unwrap().code.as_str()),
            (DeliveryStatus::Rejected, "original_not_sent")
        );
        assert!(p.sent().is_empty());
    }

    #[tokio::test]
    async fn a_won_from_another_source_never_closes_a_refund() {
        // The system of record's won is still pending; another source posted a won with the
        // same order id (stored rejected_not_system_of_record). The refund must wait for the
        // real won, not be closed because of the other one.
        let (store, queue) = memory(5);
        let real = revenue("won", "D-3", "O-3", "2026-11-28T10:00:00Z", 50.0);
        let mut foreign = revenue("won", "X-3", "O-3", "2026-11-28T10:01:00Z", 50.0);
        foreign.source = "billing".into();
        foreign
            .destinations
            .get_mut(&Destination::Meta)
            .unwrap()
            .status = DeliveryStatus::RejectedNotSystemOfRecord;
        let refund = revenue("refund", "D-3", "O-3", "2026-11-28T11:00:00Z", 10.0);
        for e in [&real, &foreign, &refund] {
            store.put_new(e).await.unwrap();
        }
        let p = Scripted::new(vec![]);
        let r = one(&p, &store, &queue, 0, &refund.key, now()).await;
        assert_eq!(r.results["m0"], PairResult::Waiting);
        one(&p, &store, &queue, 1, &real.key, now()).await;
        let r = one(&p, &store, &queue, 2, &refund.key, now().plus_secs(900)).await;
        assert_eq!(r.results["m2"], PairResult::Delivered);
    }

    #[tokio::test]
    async fn waiting_spends_no_attempt_and_ends_at_its_own_deadline() {
        let (store, queue) = memory(500);
        let refund = revenue("refund", "D-4", "O-4", "2026-11-28T11:00:00Z", 20.0);
        store.put_new(&refund).await.unwrap();
        let p = Scripted::new(vec![]);
        let c = cfg(); // 3 attempts
        let mut t = now();
        let mut waits = 0;
        loop {
            let r =
                process_batch(vec![record(waits, &refund.key)], &p, &store, &queue, &c, t).await;
            let s = state(&store, &refund.key);
            if s.status != DeliveryStatus::Retry {
                assert_eq!(r.results[&format!("m{waits}")], PairResult::DeadLetter);
                break;
            }
            assert_eq!(s.attempts_in_budget(), 0, "a wait spends no attempt");
            waits += 1;
            t = s.next_attempt_at.unwrap();
        }
        assert!(
            waits > c.max_attempts as usize,
            "waited past the attempt budget: {waits}"
        );
        assert!(waits < 40, "the waits grow: {waits} looks over three days");
        let s = state(&store, &refund.key);
        assert_eq!(s.status, DeliveryStatus::DeadLetter);
        assert!(t.secs_since(&now()) >= c.wait_deadline.as_secs() as i64);
        assert!(p.sent().is_empty());
        assert_eq!(queue.dlq(Destination::Meta).len(), 1);
    }

    #[tokio::test]
    async fn a_re_won_deal_is_counted_once() {
        // Won, reopened and won again: a second event id for the same order. It is closed as
        // a duplicate of the order and never sent.
        let (store, queue) = memory(5);
        let first = revenue("won", "D-5", "O-5", "2026-11-28T09:00:00Z", 100.0);
        let again = revenue("won", "D-5", "O-5", "2026-11-28T10:00:00Z", 100.0);
        assert_ne!(first.event_id, again.event_id);
        store.put_new(&first).await.unwrap();
        store.put_new(&again).await.unwrap();
        let p = Scripted::new(vec![]);
        one(&p, &store, &queue, 0, &first.key, now()).await;
        let r = one(&p, &store, &queue, 1, &again.key, now()).await;
        assert_eq!(r.results["m1"], PairResult::DuplicateOrder);
        assert_eq!(
            state(&store, &again.key).status,
            DeliveryStatus::DuplicateOrder
        );
        assert_eq!(p.sends(), 1, "one send for the order");
        // Both in one batch: still one send.
        let store = MemoryStore::new();
        store.put_new(&first).await.unwrap();
        store.put_new(&again).await.unwrap();
        let p = Scripted::new(vec![]);
        let records = vec![record(0, &first.key), record(1, &again.key)];
        let r = run_batch(records, &p, &store, &queue).await;
        assert_eq!(p.sends(), 1);
        assert_eq!(r.count(PairResult::DuplicateOrder), 1);
    }

    #[tokio::test]
    async fn a_won_that_will_never_count_hands_the_order_to_the_next() {
        let (store, queue) = memory(5);
        let bad = revenue("won", "BAD-6", "O-6", "2026-11-28T09:00:00Z", 100.0);
        let good = revenue("won", "D-6", "O-6", "2026-11-28T10:00:00Z", 100.0);
        store.put_new(&bad).await.unwrap();
        store.put_new(&good).await.unwrap();
        let p = Scripted::new(vec![]);
        one(&p, &store, &queue, 0, &bad.key, now()).await;
        assert_eq!(state(&store, &bad.key).status, DeliveryStatus::Rejected);
        let r = one(&p, &store, &queue, 1, &good.key, now()).await;
        assert_eq!(r.results["m1"], PairResult::Delivered);
    }

    #[tokio::test]
    async fn a_won_delivered_before_order_holds_existed_still_counts_the_order() {
        // An upgraded stack: the first won was delivered by a release without order items.
        let (store, queue) = memory(5);
        let mut old = revenue("won", "D-7", "O-7", "2026-11-28T09:00:00Z", 100.0);
        old.destinations.get_mut(&Destination::Meta).unwrap().status = DeliveryStatus::Delivered;
        store.put_new(&old).await.unwrap();
        let again = revenue("won", "D-7", "O-7", "2026-11-28T10:00:00Z", 100.0);
        store.put_new(&again).await.unwrap();
        let p = Scripted::new(vec![]);
        let r = one(&p, &store, &queue, 0, &again.key, now()).await;
        assert_eq!(r.results["m0"], PairResult::DuplicateOrder);
        assert!(p.sent().is_empty());
    }

    #[tokio::test]
    async fn a_stray_message_never_reopens_a_dead_lettered_pair() {
        let (store, queue, id, p) = dead_lettered().await;
        assert_eq!(state(&store, &id).status, DeliveryStatus::DeadLetter);
        // A duplicate of the original message (or the sweep's): acknowledged, nothing sent.
        let r = one(&p, &store, &queue, 1, &id, now()).await;
        assert_eq!((r.results["m1"], r.failures.len()), (PairResult::Closed, 0));
        assert_eq!(p.sends(), 1);
        // The operator redrives the DLQ: that message re-opens it, with a fresh budget.
        let dlq = queue.dlq(Destination::Meta);
        let redriven = Record::new("m2", "r2", dlq[0].message.to_body());
        let r = run_batch(vec![redriven.clone()], &p, &store, &queue).await;
        assert_eq!(r.results["m2"], PairResult::Delivered);
        assert_eq!(p.sends(), 2);
        // The same redriven message again (redelivered): already delivered.
        let r = run_batch(vec![redriven], &p, &store, &queue).await;
        assert_eq!(r.results["m2"], PairResult::AlreadyDelivered);
    }

    #[tokio::test]
    async fn a_pair_dead_lettered_by_a_previous_release_reopens_from_its_attempts_attribute() {
        let (store, queue, id, p) = dead_lettered().await;
        // The old DLQ body had no token; the bridge always set the `attempts` attribute.
        let mut old = record(1, &id);
        old.attributes.insert("attempts".into(), "1".into());
        let r = run_batch(vec![old], &p, &store, &queue).await;
        assert_eq!(r.results["m1"], PairResult::Delivered);
    }

    #[tokio::test]
    async fn claims_past_the_budget_are_dead_lettered_without_a_send() {
        // A pair whose every attempt crashed its sender: claimed again and again, never
        // recorded. Past the budget plus a margin it is parked, and the sweep leaves it.
        let (store, queue) = memory(50);
        let id = stored(&store, "A").await;
        let c = cfg();
        let mut t = now();
        for _ in 0..c.max_attempts + CLAIM_MARGIN {
            store
                .claim(&id, Destination::Meta, t, t.plus_secs(60), None)
                .await
                .unwrap();
            t = t.plus_secs(61);
        }
        let p = Scripted::new(vec![]);
        let r = process_batch(vec![record(0, &id)], &p, &store, &queue, &c, t).await;
        assert_eq!(r.results["m0"], PairResult::DeadLetter);
        assert!(p.sent().is_empty());
        let s = state(&store, &id);
        assert_eq!(
            (s.status, s.last_error.unwrap().code.as_str()),
            (DeliveryStatus::DeadLetter, "attempts_exhausted")
        );
        assert!(
            store
                .stuck(Destination::Meta, t.plus_secs(86_400), 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(queue.dlq(Destination::Meta).len(), 1);
    }

    #[tokio::test]
    async fn nothing_starts_without_time_to_record_it() {
        let (store, queue) = memory(50);
        let ids = stored_all(&store, &["A", "B"]).await;
        let mut p = Scripted::new(vec![]);
        p.max = 1;
        p.pause = Duration::from_millis(300);
        // Time for one request (1 s timeout + 5 s margin) and 0.1 s more.
        let inv = Invocation {
            now: now(),
            deadline: Some(Instant::now() + Duration::from_millis(6_100)),
        };
        let records = vec![record(0, &ids[0]), record(1, &ids[1])];
        let r = process_batch(records, &p, &store, &queue, &cfg(), inv).await;
        assert_eq!(r.results["m0"], PairResult::Delivered, "recorded at once");
        assert_eq!(r.results["m1"], PairResult::OutOfTime);
        assert_eq!(r.failures, ["m1"]);
        let s = state(&store, &ids[1]);
        assert_eq!(
            (s.status, s.attempts_in_budget()),
            (DeliveryStatus::Retry, 0),
            "not started, not charged"
        );
        assert_eq!(p.sends(), 1);
    }

    #[tokio::test]
    async fn one_row_per_order_in_a_request() {
        let (store, queue) = memory(50);
        // Same row key (before `~`): two equal items and one different.
        let a = stored(&store, "K~1").await;
        let b = {
            let e = event(
                json!({"source": "hubspot", "event_name": "lead", "occurred_at": "2026-11-28T10:30:00Z",
                       "entity_type": "lead", "entity_id": "K~1", "identity": {"email": "y@example.com"}}),
            );
            store.put_new(&e).await.unwrap();
            e.key
        };
        let c = stored(&store, "K~2").await;
        let p = Scripted::new(vec![]);
        let records = vec![record(0, &a), record(1, &b), record(2, &c)];
        let r = run_batch(records, &p, &store, &queue).await;
        assert_eq!(p.sent(), [vec!["K~1".to_string()]], "one row of the order");
        assert_eq!(r.results["m0"], PairResult::Delivered);
        assert_eq!(
            r.results["m1"],
            PairResult::Delivered,
            "an equal row shares it"
        );
        assert_eq!(
            r.results["m2"],
            PairResult::OutOfTime,
            "a different row waits"
        );
        assert_eq!(state(&store, &c).attempts_in_budget(), 0);
    }

    #[tokio::test]
    async fn batches_are_cut_at_the_platform_limit() {
        let (store, queue) = memory(5);
        let mut records = Vec::new();
        for n in 0..25 {
            records.push(record(n, &stored(&store, &format!("E{n}")).await));
        }
        let mut p = Scripted::new(vec![]);
        p.max = 10;
        run_batch(records, &p, &store, &queue).await;
        assert_eq!(
            p.sent().iter().map(Vec::len).collect::<Vec<_>>(),
            [10, 10, 5]
        );
    }

    #[tokio::test]
    async fn a_huge_retry_delay_from_a_platform_cannot_panic() {
        let (store, queue) = memory(5);
        let id = stored(&store, "A").await;
        let p = Scripted::new(vec![Outcome::Retryable {
            error: e("quota"),
            after: Some(Duration::MAX),
        }]);
        let r = one(&p, &store, &queue, 0, &id, now()).await;
        assert_eq!(r.results["m0"], PairResult::Retry);
        let s = state(&store, &id);
        assert_eq!(s.next_attempt_at, Some(now().plus(MAX_VISIBILITY)));
    }

    #[tokio::test]
    async fn the_write_that_closes_the_last_pair_removes_the_ip_address_and_user_agent() {
        let (store, queue) = memory(5);
        let mut e = event(
            json!({"source": "hubspot", "event_name": "lead", "occurred_at": "2026-11-28T10:00:00Z",
            "entity_type": "lead", "entity_id": "IP-1", "identity": {"email": "x@example.com",
            "client_ip_address": "203.0.113.9", "client_user_agent": "Mozilla/5.0"}}),
        );
        e.destinations.insert(
            Destination::Google,
            DestinationState::new(DeliveryStatus::Pending, now()),
        );
        store.put_new(&e).await.unwrap();
        let p = Scripted::new(vec![]);
        one(&p, &store, &queue, 0, &e.key, now()).await;
        let kept = store.get_sync(&e.key).identity.click;
        assert!(
            kept.client_ip_address.is_some(),
            "Google is still owed a send: the IP stays"
        );
        // Google closes (here by hand); the next close is the last one.
        let mut e2 = store.get_sync(&e.key);
        e2.destinations
            .get_mut(&Destination::Google)
            .unwrap()
            .status = DeliveryStatus::BlockedConsent;
        let store2 = MemoryStore::new();
        e2.destinations.get_mut(&Destination::Meta).unwrap().status = DeliveryStatus::Pending;
        store2.put_new(&e2).await.unwrap();
        run_batch(vec![record(1, &e2.key)], &p, &store2, &queue).await;
        let gone = store2.get_sync(&e2.key).identity.click;
        assert_eq!(
            (gone.client_ip_address, gone.client_user_agent),
            (None, None)
        );
    }

    #[tokio::test]
    async fn a_dead_lettered_pair_keeps_the_ip_address_and_user_agent_its_redrive_needs() {
        let (store, queue) = memory(5);
        let ev = event(
            json!({"source": "hubspot", "event_name": "lead", "occurred_at": "2026-11-28T10:00:00Z",
            "entity_type": "lead", "entity_id": "IP-2", "identity": {"email": "x@example.com",
            "client_ip_address": "203.0.113.9", "client_user_agent": "Mozilla/5.0"}}),
        );
        store.put_new(&ev).await.unwrap();
        let p = Scripted::new(vec![Outcome::Rejected {
            error: e("meta_100"),
            dead_letter: true,
            alert: false,
        }]);
        one(&p, &store, &queue, 0, &ev.key, now()).await;
        assert_eq!(state(&store, &ev.key).status, DeliveryStatus::DeadLetter);
        let browser = |store: &MemoryStore| {
            let c = store.get_sync(&ev.key).identity.click;
            (c.client_ip_address, c.client_user_agent)
        };
        let kept = (
            Some("203.0.113.9".to_string()),
            Some("Mozilla/5.0".to_string()),
        );
        assert_eq!(browser(&store), kept, "a redrive must still send them");
        // The daily retention run leaves them while the DLQ can still hold the message...
        let in_dlq = now().plus_secs(crate::privacy::DLQ_RETENTION_SECS - 3600);
        crate::privacy::apply_retention(&store, in_dlq)
            .await
            .unwrap();
        assert_eq!(browser(&store), kept);
        // ...and the operator's redrive delivers with them and removes them in the same write.
        let dlq = queue.dlq(Destination::Meta);
        let redriven = Record::new("m1", "r1", dlq[0].message.to_body());
        let r = process_batch(vec![redriven], &p, &store, &queue, &cfg(), in_dlq).await;
        assert_eq!(r.results["m1"], PairResult::Delivered);
        assert_eq!(browser(&store), (None, None));

        // A pair nobody redrives: once the DLQ has dropped the message, retention removes them.
        let store = MemoryStore::new();
        store.put_new(&ev).await.unwrap();
        let p = Scripted::new(vec![Outcome::Rejected {
            error: e("meta_100"),
            dead_letter: true,
            alert: false,
        }]);
        one(&p, &store, &queue, 2, &ev.key, now()).await;
        let gone = now().plus_secs(crate::privacy::DLQ_RETENTION_SECS + 3600);
        let report = crate::privacy::apply_retention(&store, gone).await.unwrap();
        assert_eq!(report.browser_data_removed, 1);
        assert_eq!(browser(&store), (None, None));
    }
}
