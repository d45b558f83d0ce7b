//! Delivery: the per-destination state machine and claim rule (`state`), the outcomes a
//! platform's answer is read into, retry timing with full jitter, the isolation of bad items,
//! and the pipeline every sender runs (`pipeline`).

pub mod pipeline;
pub mod state;

pub use state::{
    Claimability, DeliveryLogEntry, DeliveryStatus, Destination, DestinationState, ErrorInfo,
    SWEEP_GRACE_SECS,
};

/// How a Data Manager requestId is kept in the delivery log (`platform_ref`), so
/// reconciliation can tell it from an Ads API job id.
pub const REQUEST_ID_PREFIX: &str = "requestId:";
use std::time::Duration;

/// How one attempt for one (event, destination) ended, as a destination classifies it.
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
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Delivered { replay: false, .. } => "delivered",
            Outcome::Delivered { replay: true, .. } => "skipped_duplicate",
            Outcome::Retryable { .. } => "retry",
            Outcome::Rejected {
                dead_letter: true, ..
            } => "dead_letter",
            Outcome::Rejected {
                dead_letter: false, ..
            } => "rejected",
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

/// Sends `items` so that one bad item never sinks the others: items a platform names as bad
/// are rejected alone and the rest resent; a permanent whole-request rejection of more than one
/// item is bisected until the bad item is alone with its own error. Configuration errors
/// (`alert`) and transient errors apply to the whole request: splitting cannot help them.
pub async fn deliver_isolating<T, A>(sender: &A, items: &[T]) -> Vec<Outcome>
where
    T: Clone + Send + Sync,
    A: Attempt<T> + ?Sized,
{
    let mut out: Vec<Option<Outcome>> = vec![None; items.len()];
    let mut work: Vec<Vec<usize>> = vec![(0..items.len()).collect()];
    while let Some(idx) = work.pop() {
        if idx.is_empty() {
            continue;
        }
        let batch: Vec<T> = idx.iter().map(|&i| items[i].clone()).collect();
        match sender.attempt(&batch).await {
            Answer::PerItem(outcomes) => {
                for (k, &i) in idx.iter().enumerate() {
                    out[i] = Some(outcomes.get(k).cloned().unwrap_or_else(no_outcome));
                }
            }
            Answer::Whole(Outcome::Rejected { alert: false, .. }) if idx.len() > 1 => {
                let (a, b) = idx.split_at(idx.len() / 2);
                work.push(b.to_vec());
                work.push(a.to_vec());
            }
            Answer::Whole(o) => {
                for &i in &idx {
                    out[i] = Some(o.clone());
                }
            }
            Answer::BadItems(bad) => {
                let named: Vec<(usize, ErrorInfo)> =
                    bad.into_iter().filter(|(k, _)| *k < idx.len()).collect();
                if named.is_empty() {
                    // Nothing we can pin down: treat as an unexplained whole-request refusal.
                    let e = ErrorInfo {
                        code: "request_rejected".into(),
                        message: "the platform refused the request without naming an item".into(),
                    };
                    if idx.len() > 1 {
                        let (a, b) = idx.split_at(idx.len() / 2);
                        work.push(b.to_vec());
                        work.push(a.to_vec());
                    } else {
                        out[idx[0]] = Some(Outcome::Rejected {
                            error: e,
                            dead_letter: true,
                            alert: false,
                        });
                    }
                    continue;
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
                work.push(
                    idx.iter()
                        .zip(is_bad)
                        .filter(|(_, b)| !b)
                        .map(|(&i, _)| i)
                        .collect(),
                );
            }
        }
    }
    out.into_iter()
        .map(|o| o.unwrap_or_else(no_outcome))
        .collect()
}

fn no_outcome() -> Outcome {
    Outcome::Retryable {
        error: ErrorInfo {
            code: "no_outcome".into(),
            message: "the platform answered fewer rows than sent".into(),
        },
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
        Duration::from_secs_f64(d.min(MAX_VISIBILITY.as_secs_f64()))
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
            let e = ErrorInfo {
                code: "invalid".into(),
                message: "bad row".into(),
            };
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

    #[tokio::test]
    async fn bad_items_are_isolated_and_the_rest_delivered() {
        let items = ["ok", "ok", "bad", "ok", "ok", "ok", "bad", "ok"];
        for style in ["named", "whole"] {
            let p = Picky {
                style,
                calls: Default::default(),
            };
            let out = deliver_isolating(&p, &items).await;
            let labels: Vec<_> = out.iter().map(Outcome::label).collect();
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
        let p = Picky {
            style: "config",
            calls: Default::default(),
        };
        let out = deliver_isolating(&p, &items).await;
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

    #[test]
    fn labels() {
        let e = ErrorInfo {
            code: "x".into(),
            message: "y".into(),
        };
        assert_eq!(
            Outcome::Delivered {
                platform_ref: None,
                replay: true
            }
            .label(),
            "skipped_duplicate"
        );
        assert_eq!(
            Outcome::Rejected {
                error: e.clone(),
                dead_letter: true,
                alert: false
            }
            .label(),
            "dead_letter"
        );
        assert_eq!(
            Outcome::Retryable {
                error: e,
                after: None
            }
            .label(),
            "retry"
        );
    }
}
