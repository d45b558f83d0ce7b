//! Delivery: the per-destination state machine and claim rule (`state`), the outcomes a
//! platform's answer is read into, retry timing with full jitter, the isolation of bad items,
//! and the pipeline every sender runs (`pipeline`).

pub mod code;
pub mod pipeline;
pub mod state;

pub use code::ErrorCode;

pub use state::{
    Claimability, DeliveryLogEntry, DeliveryStatus, Destination, DestinationState, ErrorInfo,
    LOG_KEEP, PairResult, SWEEP_GRACE_SECS,
};

use std::time::{Duration, Instant};

/// How a Data Manager requestId is kept in the delivery log (`platform_ref`), so
/// reconciliation can tell it from an Ads API job id.
pub const REQUEST_ID_PREFIX: &str = "requestId:";

/// How one attempt for one (event, destination) ended, as a destination (or the pipeline's
/// own checks) classifies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The platform accepted it (or already had it: a replay the platform deduplicated).
    Delivered {
        platform_ref: Option<String>,
        replay: bool,
    },
    /// Transient: try again, no earlier than `after` when the platform said so.
    Retryable {
        error: ErrorInfo,
        after: Option<Duration>,
    },
    /// Can never succeed as it is. `dead_letter` sends it to the DLQ for an operator to redrive
    /// after a fix (permanent platform errors); otherwise it is closed as `rejected` (an event
    /// that cannot be valid for the platform). `alert` marks configuration errors (bad token,
    /// missing terms) that need a person, not a retry.
    Rejected {
        error: ErrorInfo,
        dead_letter: bool,
        alert: bool,
    },
    /// Not sent: it must wait for something else first (a refund for its won to be delivered,
    /// or for the platform to confirm it processed the won). Waiting spends no attempt. With
    /// `on_deadline`, the wait counts toward the pair's wait deadline and, once that passes,
    /// the pair ends in that status (`dead_letter` or `unconfirmed`); without, it is only put
    /// off (the invocation ran out of time, or its order already has a row in this request).
    Wait {
        error: ErrorInfo,
        after: Duration,
        on_deadline: Option<DeliveryStatus>,
    },
    /// Not sent, and never will be: closed with this status (e.g. `duplicate_order`).
    Closed {
        status: DeliveryStatus,
        error: ErrorInfo,
    },
}

impl Outcome {
    /// The result this outcome is recorded as (before the pipeline applies the attempt limit
    /// and the wait deadline).
    pub fn result(&self) -> PairResult {
        match self {
            Outcome::Delivered { replay: false, .. } => PairResult::Delivered,
            Outcome::Delivered { replay: true, .. } => PairResult::DeliveredReplay,
            Outcome::Retryable { .. } => PairResult::Retry,
            Outcome::Rejected {
                dead_letter: true, ..
            } => PairResult::DeadLetter,
            Outcome::Rejected {
                dead_letter: false, ..
            } => PairResult::Rejected,
            Outcome::Wait {
                on_deadline: Some(_),
                ..
            } => PairResult::Waiting,
            Outcome::Wait {
                on_deadline: None, ..
            } => PairResult::OutOfTime,
            Outcome::Closed {
                status: DeliveryStatus::DuplicateOrder,
                ..
            } => PairResult::DuplicateOrder,
            Outcome::Closed {
                status: DeliveryStatus::Unconfirmed,
                ..
            } => PairResult::Unconfirmed,
            Outcome::Closed { .. } => PairResult::Closed,
        }
    }

    /// The error this outcome carries, if any.
    pub fn error(&self) -> Option<&ErrorInfo> {
        match self {
            Outcome::Delivered { .. } => None,
            Outcome::Retryable { error, .. }
            | Outcome::Rejected { error, .. }
            | Outcome::Wait { error, .. }
            | Outcome::Closed { error, .. } => Some(error),
        }
    }

    /// Put off without spending an attempt or starting the wait clock.
    pub fn put_off(code: ErrorCode, message: impl Into<String>, after: Duration) -> Outcome {
        Outcome::Wait {
            error: ErrorInfo::new(code, message),
            after,
            on_deadline: None,
        }
    }
}

/// A platform's answer to one request, before it is spread over the request's items.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// One outcome per item, in order (Google's partial failure).
    PerItem(Vec<Outcome>),
    /// The same outcome for every item (Meta, or a whole-request error anywhere).
    Whole(Outcome),
    /// The request was refused because of these items (index into the request, reason); the
    /// others were not processed and can be sent again without them (Data Manager's fast-fail).
    BadItems(Vec<(usize, ErrorInfo)>),
}

/// One request to a platform: what `deliver_isolating` drives.
#[async_trait::async_trait]
pub trait Attempt<T: Send + Sync>: Send + Sync {
    async fn attempt(&self, items: &[T]) -> Answer;
}

/// How far one send may go: a bound on the requests isolating bad items may take, and the
/// time by which no new request may start.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Requests one `deliver_isolating` call may make, the first included.
    pub max_requests: usize,
    /// No request starts after this instant (the invocation's deadline less one request
    /// timeout and a margin).
    pub start_by: Option<Instant>,
}

impl Limits {
    /// Requests enough to isolate a few bad items in the largest batch (each costs about two
    /// per halving), no time bound.
    pub const DEFAULT: Limits = Limits {
        max_requests: 40,
        start_by: None,
    };

    fn may_send(&self, sent: usize) -> bool {
        sent < self.max_requests && self.start_by.is_none_or(|t| Instant::now() < t)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A whole-request rejection that splitting may help: permanent and not a configuration
/// error (which applies to any subset).
fn splittable(a: &Answer) -> Option<&ErrorInfo> {
    match a {
        Answer::Whole(Outcome::Rejected {
            error,
            alert: false,
            ..
        }) => Some(error),
        _ => None,
    }
}

/// Sends `items` so that one bad item never sinks the others: items a platform names as bad
/// are rejected alone and the rest resent; a permanent whole-request rejection of more than one
/// item is bisected until the bad item is alone with its own error. Configuration errors
/// (`alert`) and transient errors apply to the whole request: splitting cannot help them. When
/// both halves of a split fail with the same error code, one item of each is tried alone: if
/// they fail the same way too, the problem is the request, not an item, and every item gets
/// that error without further splitting (five requests for a 1,000-event batch, not 2,000).
/// Past `limits` (requests or time) what is not settled is put off, unsent, for the next
/// invocation.
pub async fn deliver_isolating<T, A>(sender: &A, items: &[T], limits: Limits) -> Vec<Outcome>
where
    T: Clone + Send + Sync,
    A: Attempt<T> + ?Sized,
{
    enum Job {
        Send(Vec<usize>),
        /// A group the platform refused as a whole: try its halves.
        Split(Vec<usize>),
    }
    let mut out: Vec<Option<Outcome>> = vec![None; items.len()];
    let mut jobs: Vec<Job> = vec![Job::Send((0..items.len()).collect())];
    let mut sent = 0usize;
    // Whether the whole-request check (one item of each half alone) was made already.
    let mut probed = false;
    let batch = |idx: &[usize]| -> Vec<T> { idx.iter().map(|&i| items[i].clone()).collect() };
    while let Some(job) = jobs.pop() {
        match job {
            Job::Send(idx) => {
                if idx.is_empty() {
                    continue;
                }
                if !limits.may_send(sent) {
                    jobs.push(Job::Send(idx));
                    break;
                }
                sent += 1;
                let answer = sender.attempt(&batch(&idx)).await;
                apply(answer, &idx, &mut out, &mut jobs_push(&mut jobs));
            }
            Job::Split(idx) => {
                let (a, b) = idx.split_at(idx.len() / 2);
                if !limits.may_send(sent + 1) {
                    jobs.push(Job::Split(idx));
                    break;
                }
                sent += 2;
                let ra = sender.attempt(&batch(a)).await;
                let rb = sender.attempt(&batch(b)).await;
                let same = match (splittable(&ra), splittable(&rb)) {
                    (Some(ea), Some(eb)) => ea.code == eb.code,
                    _ => false,
                };
                if same && !probed && a.len() > 1 && b.len() > 1 {
                    // Both halves refused for the same reason: a whole-request problem, or a
                    // bad item in each half. One item of each half alone tells which, for two
                    // requests instead of a bisection of the whole batch.
                    if !limits.may_send(sent + 1) {
                        jobs.push(Job::Split(idx));
                        break;
                    }
                    probed = true;
                    sent += 2;
                    let pa = sender.attempt(&batch(&a[..1])).await;
                    let pb = sender.attempt(&batch(&b[..1])).await;
                    let code = |r: &Answer| splittable(r).map(|e| e.code.clone());
                    let whole = code(&ra);
                    if code(&pa) == whole && code(&pb) == whole {
                        let o = match ra {
                            Answer::Whole(o) => o,
                            _ => no_outcome(),
                        };
                        for &i in &idx {
                            out[i] = Some(o.clone());
                        }
                        continue;
                    }
                    let mut push = jobs_push(&mut jobs);
                    for (half, whole_answer, probe) in [(a, ra, pa), (b, rb, pb)] {
                        let clean = matches!(
                            probe,
                            Answer::Whole(Outcome::Delivered { .. }) | Answer::PerItem(_)
                        );
                        apply(probe, &half[..1], &mut out, &mut push);
                        let rest = &half[1..];
                        if clean {
                            // The half failed and its probe did not: the bad item is in the rest.
                            apply(whole_answer, rest, &mut out, &mut push);
                        } else {
                            push(Job::Send(rest.to_vec()));
                        }
                    }
                    continue;
                }
                let mut push = jobs_push(&mut jobs);
                apply(ra, a, &mut out, &mut push);
                apply(rb, b, &mut out, &mut push);
            }
        }
    }
    // Whatever the limits left unsettled goes to the next invocation, unsent.
    let leftover: Vec<usize> = jobs
        .iter()
        .flat_map(|j| match j {
            Job::Send(i) | Job::Split(i) => i.clone(),
        })
        .collect();
    for i in leftover {
        if out[i].is_none() {
            out[i] = Some(Outcome::put_off(
                ErrorCode::IsolationLimit,
                "not sent: the invocation's request or time limit was reached",
                Duration::from_secs(1),
            ));
        }
    }
    return out
        .into_iter()
        .map(|o| o.unwrap_or_else(no_outcome))
        .collect();

    fn jobs_push(jobs: &mut Vec<Job>) -> impl FnMut(Job) + '_ {
        move |j| jobs.push(j)
    }

    /// Spreads one answer over the items of its request; what needs another request is pushed.
    fn apply(
        answer: Answer,
        idx: &[usize],
        out: &mut [Option<Outcome>],
        push: &mut impl FnMut(Job),
    ) {
        if splittable(&answer).is_some() && idx.len() > 1 {
            push(Job::Split(idx.to_vec()));
            return;
        }
        match answer {
            Answer::PerItem(outcomes) => {
                for (k, &i) in idx.iter().enumerate() {
                    out[i] = Some(outcomes.get(k).cloned().unwrap_or_else(no_outcome));
                }
            }
            Answer::Whole(o) => {
                for &i in idx {
                    out[i] = Some(o.clone());
                }
            }
            Answer::BadItems(bad) => {
                let named: Vec<(usize, ErrorInfo)> =
                    bad.into_iter().filter(|(k, _)| *k < idx.len()).collect();
                if named.is_empty() {
                    // Nothing we can pin down: an unexplained whole-request refusal.
                    let e = ErrorInfo::new(
                        ErrorCode::RequestRejected,
                        "the platform refused the request without naming an item",
                    );
                    if idx.len() > 1 {
                        push(Job::Split(idx.to_vec()));
                    } else {
                        out[idx[0]] = Some(Outcome::Rejected {
                            error: e,
                            dead_letter: true,
                            alert: false,
                        });
                    }
                    return;
                }
                let mut is_bad = vec![false; idx.len()];
                for (k, error) in named {
                    is_bad[k] = true;
                    out[idx[k]] = Some(Outcome::Rejected {
                        error,
                        dead_letter: true,
                        alert: false,
                    });
                }
                push(Job::Send(
                    idx.iter()
                        .zip(is_bad)
                        .filter(|(_, b)| !b)
                        .map(|(&i, _)| i)
                        .collect(),
                ));
            }
        }
    }
}

fn no_outcome() -> Outcome {
    Outcome::Retryable {
        error: ErrorInfo::new(
            ErrorCode::NoOutcome,
            "the platform answered fewer rows than sent",
        ),
        after: None,
    }
}

/// Exponential backoff with full jitter: uniform in `[floor, min(cap, base * 2^(attempt-1))]`.
///
/// Full jitter spreads a burst of failures (a platform outage) over the whole window instead
/// of having every sender return at the same instant.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    pub floor: Duration,
}

/// SQS cannot hide a message for longer than 12 hours.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(30),
            cap: Duration::from_secs(3600),
            floor: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The delay before the next try after `attempt` (1-based) failed. `unit` is a uniform
    /// random number in `[0, 1)`, passed in so tests are deterministic.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exp = self.base.as_secs_f64() * 2f64.powi(attempt.saturating_sub(1).min(30) as i32);
        let ceiling = exp.min(self.cap.as_secs_f64());
        let d = (ceiling * unit.clamp(0.0, 1.0)).max(self.floor.as_secs_f64());
        Duration::try_from_secs_f64(d.min(MAX_VISIBILITY.as_secs_f64())).unwrap_or(MAX_VISIBILITY)
    }

    /// The delay for a retry: the platform's own `after` when given (never shortened by
    /// jitter), else the jittered backoff.
    pub fn next(&self, attempt: u32, platform_after: Option<Duration>) -> Duration {
        match platform_after {
            Some(after) => after.clamp(self.floor, MAX_VISIBILITY),
            None => self.delay(attempt, fastrand::f64()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_bounds() {
        let b = Backoff::default();
        assert_eq!(b.delay(1, 0.0), Duration::from_secs(5), "floor");
        assert_eq!(b.delay(1, 1.0), Duration::from_secs(30));
        assert_eq!(b.delay(3, 1.0), Duration::from_secs(120));
        assert_eq!(b.delay(20, 1.0), Duration::from_secs(3600), "cap");
        assert_eq!(b.delay(3, 0.5), Duration::from_secs(60));
        for attempt in 1..12 {
            let d = b.next(attempt, None);
            assert!(d >= b.floor && d <= b.cap);
        }
    }

    #[test]
    fn platform_delay_wins_and_is_bounded_by_sqs() {
        let b = Backoff::default();
        assert_eq!(
            b.next(1, Some(Duration::from_secs(6 * 3600))),
            Duration::from_secs(6 * 3600)
        );
        assert_eq!(
            b.next(1, Some(Duration::from_secs(48 * 3600))),
            MAX_VISIBILITY
        );
    }

    /// A platform that refuses any request containing a "bad" item, in the given style.
    struct Picky {
        style: &'static str,
        calls: std::sync::Mutex<Vec<usize>>,
    }

    #[async_trait::async_trait]
    impl Attempt<&'static str> for Picky {
        async fn attempt(&self, items: &[&'static str]) -> Answer {
            self.calls.lock().unwrap().push(items.len());
            let bad: Vec<usize> = (0..items.len()).filter(|&i| items[i] == "bad").collect();
            let e = ErrorInfo::new(ErrorCode::Invalid, "bad row");
            if self.style == "request" {
                // Refuses every request, whatever it holds (a wrong pixel id, say).
                return Answer::Whole(Outcome::Rejected {
                    error: ErrorInfo::new(ErrorCode::meta(100, Some(2804050)), "whole request"),
                    dead_letter: true,
                    alert: false,
                });
            }
            if bad.is_empty() {
                return Answer::Whole(Outcome::Delivered {
                    platform_ref: None,
                    replay: false,
                });
            }
            match self.style {
                "named" => Answer::BadItems(bad.into_iter().map(|i| (i, e.clone())).collect()),
                "config" => Answer::Whole(Outcome::Rejected {
                    error: e,
                    dead_letter: true,
                    alert: true,
                }),
                _ => Answer::Whole(Outcome::Rejected {
                    error: e,
                    dead_letter: true,
                    alert: false,
                }),
            }
        }
    }

    fn picky(style: &'static str) -> Picky {
        Picky {
            style,
            calls: Default::default(),
        }
    }

    #[tokio::test]
    async fn bad_items_are_isolated_and_the_rest_delivered() {
        let items = ["ok", "ok", "bad", "ok", "ok", "ok", "bad", "ok"];
        for style in ["named", "whole"] {
            let p = picky(style);
            let out = deliver_isolating(&p, &items, Limits::DEFAULT).await;
            let labels: Vec<_> = out.iter().map(|o| o.result().as_str()).collect();
            assert_eq!(
                labels,
                [
                    "delivered",
                    "delivered",
                    "dead_letter",
                    "delivered",
                    "delivered",
                    "delivered",
                    "dead_letter",
                    "delivered"
                ],
                "{style}"
            );
            let calls = p.calls.lock().unwrap().clone();
            if style == "named" {
                assert_eq!(calls, [8, 6], "one resend without the named rows");
            } else {
                // Each bad item costs at most two requests per halving: 1 + 2 * 2 * log2(8).
                assert!(calls.len() <= 13, "bisection stays logarithmic: {calls:?}");
            }
        }
        let p = picky("config");
        let out = deliver_isolating(&p, &items, Limits::DEFAULT).await;
        assert!(
            out.iter()
                .all(|o| matches!(o, Outcome::Rejected { alert: true, .. }))
        );
        assert_eq!(
            p.calls.lock().unwrap().len(),
            1,
            "no split for configuration errors"
        );
    }

    #[tokio::test]
    async fn a_whole_request_problem_stops_the_bisection_at_the_first_split() {
        let items = ["ok"; 1000];
        let p = picky("request");
        let out = deliver_isolating(&p, &items, Limits::DEFAULT).await;
        assert!(out.iter().all(|o| o.result() == PairResult::DeadLetter));
        assert_eq!(
            *p.calls.lock().unwrap(),
            [1000, 500, 500, 1, 1],
            "both halves and one item of each failed with the same code: no further splitting"
        );
    }

    #[tokio::test]
    async fn limits_put_off_what_they_leave_unsettled() {
        let items = ["bad", "ok", "ok", "bad", "ok", "ok", "ok", "bad"];
        let p = picky("whole");
        let limits = Limits {
            max_requests: 3,
            start_by: None,
        };
        let out = deliver_isolating(&p, &items, limits).await;
        assert!(p.calls.lock().unwrap().len() <= 3);
        assert!(
            out.iter().any(|o| o.result() == PairResult::OutOfTime),
            "{out:?}"
        );
        assert!(out.iter().all(|o| o.result() != PairResult::Retry));
        let p = picky("whole");
        let past = Limits {
            max_requests: 40,
            start_by: Some(Instant::now()),
        };
        let out = deliver_isolating(&p, &items, past).await;
        assert!(p.calls.lock().unwrap().is_empty(), "no time: nothing sent");
        assert!(out.iter().all(|o| o.result() == PairResult::OutOfTime));
    }

    #[test]
    fn results() {
        let e = ErrorInfo::new(ErrorCode::platform("x"), "y");
        assert_eq!(
            Outcome::Delivered {
                platform_ref: None,
                replay: true
            }
            .result(),
            PairResult::DeliveredReplay
        );
        assert_eq!(
            Outcome::Rejected {
                error: e.clone(),
                dead_letter: true,
                alert: false
            }
            .result(),
            PairResult::DeadLetter
        );
        assert_eq!(
            Outcome::Retryable {
                error: e.clone(),
                after: None
            }
            .result(),
            PairResult::Retry
        );
        assert_eq!(
            Outcome::Closed {
                status: DeliveryStatus::DuplicateOrder,
                error: e
            }
            .result(),
            PairResult::DuplicateOrder
        );
    }
}
