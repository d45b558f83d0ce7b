//! What every destination shares: delivery outcomes and retry timing with full jitter.

pub mod pipeline;

use crate::destination::ErrorInfo;
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
