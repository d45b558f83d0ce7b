//! Credentials a platform reads once, when it first sends: a sender starts the read at init
//! and its first send waits for it, so the read (an SSM round trip, its TLS handshake
//! included) runs while the first batch is loaded and claimed in the store, not before the
//! function may take work.

use bridge_core::delivery::{ErrorCode, ErrorInfo, Outcome};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// How long a failed read answers for the reads after it: as long as one read may take (the
/// senders bound an SSM read by 5 s), so the other groups of a batch meet the same error at
/// once instead of each waiting on SSM again, and an SSM that throttles is not asked harder.
pub const FAILURE_HOLD: Duration = Duration::from_secs(5);

/// Why credentials could not be read. The message names what was read (a parameter's name),
/// never a value.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct ReadError {
    pub message: String,
    /// A person must fix it (a parameter that does not exist, a value that does not parse);
    /// otherwise the next send reads again.
    pub permanent: bool,
}

impl ReadError {
    /// What every row of a request gets when the credentials it needs could not be read:
    /// a retry, or for a permanent error a dead letter with an alert.
    pub fn outcome(&self) -> Outcome {
        let error = ErrorInfo::new(ErrorCode::CredentialsUnavailable, self.message.clone());
        if self.permanent {
            Outcome::Rejected {
                error,
                dead_letter: true,
                alert: true,
            }
        } else {
            Outcome::Retryable { error, after: None }
        }
    }
}

type Read<T> =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<T, ReadError>> + Send>> + Send + Sync>;

/// A platform's credentials: given (tests, operators' tools) or read on first use. A read
/// that failed is not kept: its error answers for [`FAILURE_HOLD`], then the next use reads
/// again (after an operator fixed a parameter, a redrive succeeds without a new deploy).
pub struct Deferred<T> {
    cell: Arc<tokio::sync::OnceCell<T>>,
    read: Option<Read<T>>,
    failed: Arc<Mutex<Option<(Instant, ReadError)>>>,
    hold: Duration,
}

impl<T> Clone for Deferred<T> {
    fn clone(&self) -> Self {
        Deferred {
            cell: self.cell.clone(),
            read: self.read.clone(),
            failed: self.failed.clone(),
            hold: self.hold,
        }
    }
}

impl<T> fmt::Debug for Deferred<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.cell.initialized() {
            "read"
        } else {
            "not read"
        };
        write!(f, "Deferred(<redacted>, {state})")
    }
}

impl<T> From<T> for Deferred<T> {
    fn from(value: T) -> Self {
        Deferred {
            cell: Arc::new(tokio::sync::OnceCell::new_with(Some(value))),
            read: None,
            failed: Arc::default(),
            hold: FAILURE_HOLD,
        }
    }
}

impl<T: Send + Sync + 'static> Deferred<T> {
    /// Credentials `read` gives, read first now (in the background, on the current Tokio
    /// runtime) and waited for at their first use.
    ///
    /// # Panics
    /// Outside a Tokio runtime (every function's `main` runs in one).
    pub fn read<F, Fut>(read: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, ReadError>> + Send + 'static,
    {
        let d = Deferred {
            cell: Arc::new(tokio::sync::OnceCell::new()),
            read: Some(Arc::new(move || Box::pin(read()))),
            failed: Arc::default(),
            hold: FAILURE_HOLD,
        };
        let first = d.clone();
        tokio::spawn(async move {
            // A failure here is met again, and reported, by the send that needs the value.
            let _ = first.get().await;
        });
        d
    }

    /// Before a send of `rows` rows to `destination`: None when the credentials can be had,
    /// else the outcome of every row (logged once). Credentials that cannot be read are no
    /// row's fault, so the rows get that outcome without the bisection a refused request gets.
    pub async fn unavailable(&self, destination: &str, rows: usize) -> Option<Vec<Outcome>> {
        let e = self.get().await.err()?;
        tracing::error!(destination, error = %e, permanent = e.permanent, "credentials unavailable");
        Some(vec![e.outcome(); rows])
    }

    /// The same credentials with failures held for `hold` instead of [`FAILURE_HOLD`] (tests
    /// that cannot wait five seconds).
    pub fn with_failure_hold(mut self, hold: Duration) -> Self {
        self.hold = hold;
        self
    }

    /// The credentials, read now if no read has succeeded yet and none failed within the
    /// hold. Concurrent callers wait for the read in flight; when it fails, they get its error.
    pub async fn get(&self) -> Result<&T, ReadError> {
        let Some(read) = &self.read else {
            return self.cell.get().ok_or_else(|| ReadError {
                message: "no credentials were given".into(),
                permanent: true,
            });
        };
        self.cell
            .get_or_try_init(|| async {
                if let Some(e) = self.held_failure() {
                    return Err(e);
                }
                let result = read().await;
                if let Err(e) = &result {
                    *self.failed.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((Instant::now(), e.clone()));
                }
                result
            })
            .await
    }

    /// The last read's error, while it is held.
    fn held_failure(&self) -> Option<ReadError> {
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed
            .as_ref()
            .filter(|(at, _)| at.elapsed() < self.hold)
            .map(|(_, e)| e.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn given_credentials_are_there_at_once() {
        let d = Deferred::from("token".to_string());
        assert_eq!(d.get().await.unwrap(), "token");
    }

    #[tokio::test]
    async fn a_read_starts_at_once_and_is_shared_by_every_use() {
        let reads = Arc::new(AtomicUsize::new(0));
        let counted = reads.clone();
        let d = Deferred::read(move || {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
                Ok::<_, ReadError>("token".to_string())
            }
        });
        let (a, b) = tokio::join!(d.get(), d.clone().get_owned());
        assert_eq!(a.unwrap(), "token");
        assert_eq!(b.unwrap(), "token");
        assert_eq!(reads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_read_is_not_kept_and_the_next_use_reads_again() {
        let reads = Arc::new(AtomicUsize::new(0));
        let counted = reads.clone();
        let d = Deferred::read(move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    Err(ReadError {
                        message: "SSM parameter /bridge/token does not exist".into(),
                        permanent: true,
                    })
                } else {
                    Ok("token".to_string())
                }
            }
        });
        // Let the first read (started at once) finish and fail.
        while reads.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        tokio::task::yield_now().await;
        // Within the hold, every use (concurrent ones too) gets that error without a read.
        let (a, b) = tokio::join!(d.get(), d.get());
        assert!(a.is_err() && b.is_err());
        assert!(a.unwrap_err().message.contains("/bridge/token"));
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        tokio::time::advance(FAILURE_HOLD).await;
        assert_eq!(d.get().await.unwrap(), "token");
        assert_eq!(reads.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_permanent_error_dead_letters_with_an_alert_and_a_transient_one_retries() {
        let permanent = ReadError {
            message: "SSM parameter /bridge/token does not exist".into(),
            permanent: true,
        };
        match permanent.outcome() {
            Outcome::Rejected {
                error,
                dead_letter: true,
                alert: true,
            } => {
                assert_eq!(error.code, ErrorCode::CredentialsUnavailable);
                assert!(error.message.contains("/bridge/token"));
            }
            other => panic!("{other:?}"),
        }
        let transient = ReadError {
            message: "SSM GetParameters failed".into(),
            permanent: false,
        };
        assert!(matches!(
            transient.outcome(),
            Outcome::Retryable { after: None, .. }
        ));
    }

    #[test]
    fn debug_never_shows_the_value() {
        let d = Deferred::from("s3cr3t".to_string());
        assert!(!format!("{d:?}").contains("s3cr3t"));
    }

    impl<T: Send + Sync + 'static> Deferred<T> {
        async fn get_owned(self) -> Result<T, ReadError>
        where
            T: Clone,
        {
            self.get().await.cloned()
        }
    }
}
