//! Local fakes of the outside APIs the bridge calls, enforcing the rules the real ones do.

pub mod google;
pub mod hubspot;
pub mod meta;

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

/// Random faults a fake injects into a share of its requests (the chaos tests' weather).
#[derive(Clone)]
pub struct Chaos {
    /// Share of requests that get a fault, 0..1.
    pub rate: f64,
    /// Called after a request was accepted and before it is answered, to kill the sender
    /// between its send and its status write (`AcceptThenCrash`).
    pub crash: Option<std::sync::Arc<dyn Fn() + Send + Sync>>,
    /// How long `Slow` and `AcceptThenTimeout` hold the answer.
    pub hold: std::time::Duration,
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
