//! Local fakes of the outside APIs the bridge calls. Each is an independent witness: its rules
//! come from the platform's documentation or official SDK (every rule names its source in a
//! `// source:` comment; keys such as M-DEDUP or G-ERR-UP are those of
//! `shared/reference/platform-semantics.md` §Sources), and it counts what the platform counts.
//! This module holds what the fakes share: serving, the injectable `Clock`, the one `Fault`
//! type and the `Chaos` weather.
//!
//! Source keys used here that platform-semantics.md does not list:
//! - M-LEADS: developers.facebook.com/docs/marketing-api/conversions-api/conversion-leads-integration/payload-specification
//! - M-CIP: developers.facebook.com/docs/marketing-api/conversions-api/parameters/customer-information-parameters
//! - M-PARAMS: developers.facebook.com/docs/marketing-api/conversions-api/parameters
//! - M-FBC: developers.facebook.com/docs/marketing-api/conversions-api/parameters/fbp-and-fbc
//! - M-SEC: developers.facebook.com/docs/graph-api/securing-requests
//! - Ads Pixel Events reference: developers.facebook.com/docs/marketing-api/reference/ads-pixel/events/
//! - G-CONSENT: googleapis/googleapis `google/ads/googleads/v25/common/consent.proto`
//! - DM-PROTO: googleapis/googleapis `google/ads/datamanager/v1/event.proto`
//! - DM-UE: developers.google.com/data-manager/api/devguides/concepts/understand-errors
//! - DM-FMT: developers.google.com/data-manager/api/devguides/concepts/formatting
//! - FMTPY: googleads/data-manager-python `google/ads/datamanager_util/format.py`
//! - RFC 6749: the OAuth 2.0 framework (token endpoint errors)

pub mod google;
pub mod hubspot;
pub mod meta;
pub mod salesforce;

use axum::Json;
use axum::http::StatusCode;
use bridge_core::timestamp::Timestamp;
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// What a fake's handler answers: a status and a JSON body.
pub type Reply = (StatusCode, Json<Value>);

/// Serves `app` on an ephemeral loopback port until the test process ends; returns its base URL.
pub async fn serve(app: axum::Router) -> String {
    serve_on("127.0.0.1:0", app).await
}

/// Serves `app` on `addr` until the process ends; returns its base URL.
pub async fn serve_on(addr: &str, app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

/// The time every time rule of a fake reads (Meta's 7-day window and 48 h dedup window,
/// Google's 6 h and 54-day rules, token expiry, Data Manager's processing delay). The system
/// clock by default; a virtual one lets a test move time without waiting.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    #[default]
    System,
    /// Unix milliseconds, set and moved by the test.
    Virtual(Arc<AtomicI64>),
}

impl Clock {
    /// A virtual clock standing at `t`.
    pub fn virtual_at(t: Timestamp) -> Clock {
        Clock::Virtual(Arc::new(AtomicI64::new(t.unix_ms())))
    }

    pub fn now(&self) -> Timestamp {
        match self {
            Clock::System => Timestamp::now(),
            Clock::Virtual(ms) => Timestamp::from_unix_ms(ms.load(Ordering::SeqCst)),
        }
    }

    pub fn now_ms(&self) -> i64 {
        self.now().unix_ms()
    }

    /// Moves a virtual clock to `t`. Panics on the system clock, which a test cannot move:
    /// give the fake a virtual clock first.
    pub fn set(&self, t: Timestamp) {
        match self {
            Clock::Virtual(ms) => ms.store(t.unix_ms(), Ordering::SeqCst),
            Clock::System => panic!("the system clock cannot be set: use Clock::virtual_at"),
        }
    }

    /// Moves a virtual clock forward by `d` (panics on the system clock, as `set`).
    pub fn advance(&self, d: Duration) {
        self.set(self.now().plus(d));
    }
}

/// What a test controls on a platform fake, whichever it is: faults queued for the next
/// requests, the chaos weather, the clock, and whether the rules whose reaction the platform
/// does not document (each labelled UNCONFIRMED where it is checked) are enforced.
pub struct Controls {
    pub faults: VecDeque<Fault>,
    pub chaos: Option<Chaos>,
    pub clock: Clock,
    /// On by default.
    pub strict: bool,
}

impl Default for Controls {
    fn default() -> Self {
        Controls {
            faults: VecDeque::new(),
            chaos: None,
            clock: Clock::System,
            strict: true,
        }
    }
}

impl Controls {
    /// The fault for the next request: a queued one first, else one rolled from the chaos
    /// weather. `throttled` and `server_error` give the fake's own shapes for those kinds.
    pub(crate) fn next_fault(
        &mut self,
        throttled: impl FnOnce() -> (u16, Value),
        server_error: impl FnOnce() -> (u16, Value),
    ) -> Option<Fault> {
        if let Some(f) = self.faults.pop_front() {
            return Some(f);
        }
        let c = self.chaos.as_ref()?;
        Some(match c.roll()? {
            ChaosKind::Throttled => {
                let (s, b) = throttled();
                Fault::Respond(s, b)
            }
            ChaosKind::ServerError => {
                let (s, b) = server_error();
                Fault::Respond(s, b)
            }
            ChaosKind::Slow => Fault::Slow(c.hold),
            ChaosKind::AcceptThenTimeout => Fault::AcceptThenTimeout(c.hold),
            ChaosKind::AcceptThenCrash => Fault::AcceptThenCrash(c.crash.clone()?),
        })
    }
}

/// The controls the Meta and Google fakes share over their state (`data`, holding
/// [`Controls`]): run a closure on it, queue a fault for the next requests, set the chaos, set
/// and read the clock, turn strictness off.
macro_rules! state_controls {
    () => {
        pub fn with<R>(&self, f: impl FnOnce(&mut Data) -> R) -> R {
            f(&mut lock(&self.data))
        }

        pub fn inject(&self, f: Fault) {
            self.with(|d| d.controls.faults.push_back(f));
        }

        pub fn set_chaos(&self, chaos: Option<Chaos>) {
            self.with(|d| d.controls.chaos = chaos);
        }

        pub fn set_clock(&self, clock: Clock) {
            self.with(|d| d.controls.clock = clock);
        }

        pub fn clock(&self) -> Clock {
            self.with(|d| d.controls.clock.clone())
        }

        pub fn set_strict(&self, strict: bool) {
            self.with(|d| d.controls.strict = strict);
        }
    };
}
pub(crate) use state_controls;

/// A fault a fake injects into one request, in place of or around its normal processing.
#[derive(Clone)]
pub enum Fault {
    /// Answer with this status and body instead of processing.
    Respond(u16, Value),
    /// Process normally after a delay.
    Slow(Duration),
    /// Accept (and record) the request, then answer only after this delay (past the client's timeout).
    AcceptThenTimeout(Duration),
    /// Accept (and record) the request, then run the callback (which kills the sender) before answering.
    AcceptThenCrash(Arc<dyn Fn() + Send + Sync>),
}

impl Fault {
    /// Before processing: a `Respond` is the answer (`Err`), a `Slow` waits. What remains to do
    /// after processing is returned.
    pub(crate) async fn before(fault: Option<Fault>) -> Result<Option<Fault>, Reply> {
        match fault {
            Some(Fault::Respond(status, body)) => Err((
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                Json(body),
            )),
            Some(Fault::Slow(d)) => {
                tokio::time::sleep(d).await;
                Ok(None)
            }
            other => Ok(other),
        }
    }

    /// After a request was accepted: hold the answer past the client's timeout, or crash the sender.
    pub(crate) async fn after(fault: Option<Fault>) {
        match fault {
            Some(Fault::AcceptThenTimeout(d)) => tokio::time::sleep(d).await,
            Some(Fault::AcceptThenCrash(crash)) => {
                crash();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ => {}
        }
    }
}

/// Random faults a fake injects into a share of its requests (the chaos tests' weather).
#[derive(Clone)]
pub struct Chaos {
    /// Share of requests that get a fault, 0..1.
    pub rate: f64,
    /// Called after a request was accepted and before it is answered, to kill the sender
    /// between its send and its status write (`AcceptThenCrash`).
    pub crash: Option<Arc<dyn Fn() + Send + Sync>>,
    /// How long `Slow` and `AcceptThenTimeout` hold the answer.
    pub hold: Duration,
}

/// The kinds of chaos a fake can inject; each fake answers them in its API's own shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChaosKind {
    Throttled,
    ServerError,
    Slow,
    AcceptThenTimeout,
    AcceptThenCrash,
}

impl Chaos {
    pub fn roll(&self) -> Option<ChaosKind> {
        if fastrand::f64() >= self.rate {
            return None;
        }
        let kinds: &[ChaosKind] = if self.crash.is_some() {
            &[
                ChaosKind::Throttled,
                ChaosKind::ServerError,
                ChaosKind::Slow,
                ChaosKind::AcceptThenTimeout,
                ChaosKind::AcceptThenCrash,
            ]
        } else {
            &[
                ChaosKind::Throttled,
                ChaosKind::ServerError,
                ChaosKind::Slow,
                ChaosKind::AcceptThenTimeout,
            ]
        };
        Some(kinds[fastrand::usize(..kinds.len())])
    }
}

/// `s` is 64 lowercase hex characters: a SHA-256 digest as Meta and the Google Ads API take it.
pub(crate) fn is_sha256_lower_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
