//! A Lambda Runtime API emulator that runs a function's real binary natively: each instance is
//! a child process with its own Runtime API endpoint, configured only through the environment
//! (as in Lambda); invocations queue until an instance asks for the next one; a crash or a
//! timeout fails the invocation and the instance is restarted (a new cold start).

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, oneshot};

/// Why an invocation failed, as Lambda reports it to the caller (the event source mapping
/// treats every one of these as "all messages failed").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvokeError {
    /// The handler returned an error.
    Function(String),
    /// The process exited (or was killed) during the invocation.
    Crashed,
    /// No answer within the function's timeout: the instance is killed.
    Timeout,
    /// The runtime is shutting down.
    Stopped,
}

impl std::fmt::Display for InvokeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InvokeError::Function(m) => write!(f, "function error: {m}"),
            InvokeError::Crashed => f.write_str("Runtime.ExitError: the process exited"),
            InvokeError::Timeout => f.write_str("Task timed out"),
            InvokeError::Stopped => f.write_str("runtime stopped"),
        }
    }
}

type Reply = oneshot::Sender<Result<Value, InvokeError>>;

struct Invocation {
    id: String,
    payload: Value,
    deadline_ms: i64,
    reply: Reply,
}

/// What every log line of a function goes through: the local stack writes them to a file and
/// sums the EMF metrics; tests scan them.
pub type LineSink = Arc<dyn Fn(&str, &str) + Send + Sync>;

#[derive(Clone)]
pub struct FunctionSpec {
    pub name: String,
    pub binary: PathBuf,
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
    pub memory_mb: u32,
    pub instances: usize,
}

struct Shared {
    spec: FunctionSpec,
    queue: tokio::sync::Mutex<mpsc::Receiver<Invocation>>,
    /// In-flight invocation per instance: (request id, reply).
    inflight: Mutex<HashMap<usize, (String, Reply)>>,
    /// Child process ids per instance, to kill on timeout or on demand.
    pids: Mutex<HashMap<usize, u32>>,
    stopped: AtomicBool,
    sink: LineSink,
    cold_starts: AtomicU64,
    /// Peak resident memory seen per instance (kB), from /proc.
    peak_rss_kb: AtomicU64,
    /// When each instance's current process started, until its first `next`.
    spawned_at: Mutex<HashMap<usize, std::time::Instant>>,
    /// Process start to first `next` of every process started (Lambda's Init Duration).
    init_ms: Mutex<Vec<f64>>,
}

/// One function: its instances and the handle to invoke it.
#[derive(Clone)]
pub struct Function {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Invocation>,
    seq: Arc<AtomicU64>,
}

struct Instance {
    shared: Arc<Shared>,
    index: usize,
    /// Bumped when the instance's process exits: a `next` still waiting for the dead process
    /// must not take an invocation it can never answer.
    generation: tokio::sync::watch::Sender<u64>,
}

async fn next(State(inst): State<Arc<Instance>>) -> Response {
    let s = &inst.shared;
    if let Some(at) = s
        .spawned_at
        .lock()
        .ok()
        .and_then(|mut m| m.remove(&inst.index))
        && let Ok(mut v) = s.init_ms.lock()
    {
        v.push(at.elapsed().as_secs_f64() * 1000.0);
    }
    let mut restarted = inst.generation.subscribe();
    let inv = tokio::select! {
        inv = async {
            let mut q = s.queue.lock().await;
            q.recv().await
        } => inv,
        _ = restarted.changed() => None,
    };
    let Some(inv) = inv else {
        return (StatusCode::GONE, "stopped").into_response();
    };
    if let Ok(mut m) = s.inflight.lock() {
        m.insert(inst.index, (inv.id.clone(), inv.reply));
    }
    let mut headers = HeaderMap::new();
    let h = |v: &str| HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("x"));
    headers.insert("lambda-runtime-aws-request-id", h(&inv.id));
    headers.insert(
        "lambda-runtime-deadline-ms",
        h(&inv.deadline_ms.to_string()),
    );
    headers.insert(
        "lambda-runtime-invoked-function-arn",
        h(&format!(
            "arn:aws:lambda:us-east-1:123456789012:function:{}",
            s.spec.name
        )),
    );
    headers.insert(
        "lambda-runtime-trace-id",
        h("Root=1-00000000-000000000000000000000000;Parent=0000000000000000;Sampled=0"),
    );
    headers.insert("content-type", h("application/json"));
    (StatusCode::OK, headers, inv.payload.to_string()).into_response()
}

fn finish(inst: &Instance, id: &str, result: Result<Value, InvokeError>) -> StatusCode {
    let reply = inst.shared.inflight.lock().ok().and_then(|mut m| {
        if m.get(&inst.index).is_some_and(|(rid, _)| rid == id) {
            m.remove(&inst.index).map(|(_, r)| r)
        } else {
            None
        }
    });
    match reply {
        Some(r) => {
            let _ = r.send(result);
            StatusCode::ACCEPTED
        }
        None => StatusCode::BAD_REQUEST,
    }
}

async fn response(
    State(inst): State<Arc<Instance>>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> StatusCode {
    let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
    finish(&inst, &id, Ok(v))
}

async fn error(
    State(inst): State<Arc<Instance>>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> StatusCode {
    finish(
        &inst,
        &id,
        Err(InvokeError::Function(
            String::from_utf8_lossy(&body).into_owned(),
        )),
    )
}

async fn init_error(State(inst): State<Arc<Instance>>, body: Bytes) -> StatusCode {
    (inst.shared.sink)(
        &inst.shared.spec.name,
        &format!("INIT ERROR: {}", String::from_utf8_lossy(&body)),
    );
    StatusCode::ACCEPTED
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl Function {
    /// Starts `spec.instances` instances of the binary, each against its own Runtime API.
    pub async fn start(spec: FunctionSpec, sink: LineSink) -> std::io::Result<Function> {
        let (tx, rx) = mpsc::channel(1024);
        let shared = Arc::new(Shared {
            spec: spec.clone(),
            queue: tokio::sync::Mutex::new(rx),
            inflight: Mutex::new(HashMap::new()),
            pids: Mutex::new(HashMap::new()),
            stopped: AtomicBool::new(false),
            sink,
            cold_starts: AtomicU64::new(0),
            spawned_at: Mutex::new(HashMap::new()),
            init_ms: Mutex::new(Vec::new()),
            peak_rss_kb: AtomicU64::new(0),
        });
        for index in 0..spec.instances.max(1) {
            let inst = Arc::new(Instance {
                shared: shared.clone(),
                index,
                generation: tokio::sync::watch::channel(0).0,
            });
            let app = Router::new()
                .route("/2018-06-01/runtime/invocation/next", get(next))
                .route(
                    "/2018-06-01/runtime/invocation/{id}/response",
                    post(response),
                )
                .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
                .route("/2018-06-01/runtime/init/error", post(init_error))
                .with_state(inst.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let api = listener.local_addr()?.to_string();
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            tokio::spawn(supervise(inst, api));
        }
        Ok(Function {
            shared,
            tx,
            seq: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.spec.name
    }

    /// What the function was started with (to start another copy of it).
    pub fn spec(&self) -> &FunctionSpec {
        &self.shared.spec
    }

    /// Invokes the function synchronously (RequestResponse), as an event source mapping or a
    /// function URL does.
    pub async fn invoke(&self, payload: Value) -> Result<Value, InvokeError> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let id = format!(
            "{:08x}-local-{}-{n}",
            std::process::id(),
            self.shared.spec.name.len()
        );
        let timeout = self.shared.spec.timeout;
        let deadline_ms =
            bridge_core::timestamp::Timestamp::now().unix_ms() + timeout.as_millis() as i64;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Invocation {
                id: id.clone(),
                payload,
                deadline_ms,
                reply,
            })
            .await
            .map_err(|_| InvokeError::Stopped)?;
        // The clock starts when an instance takes the invocation; queueing is not timed out
        // here (Lambda would scale out instead), only the run.
        let started = tokio::time::Instant::now();
        let mut rx = rx;
        loop {
            match tokio::time::timeout(Duration::from_millis(200), &mut rx).await {
                Ok(Ok(r)) => return r,
                Ok(Err(_)) => return Err(InvokeError::Crashed),
                Err(_) => {
                    let holder =
                        self.shared.inflight.lock().ok().and_then(|m| {
                            m.iter().find(|(_, (rid, _))| rid == &id).map(|(i, _)| *i)
                        });
                    match holder {
                        Some(i) if started.elapsed() > timeout + Duration::from_millis(500) => {
                            self.kill_instance(i);
                            return Err(InvokeError::Timeout);
                        }
                        Some(_) => {}
                        None => {}
                    }
                    if self.shared.stopped.load(Ordering::Relaxed) {
                        return Err(InvokeError::Stopped);
                    }
                }
            }
        }
    }

    fn kill_instance(&self, index: usize) {
        if let Some(pid) = self
            .shared
            .pids
            .lock()
            .ok()
            .and_then(|p| p.get(&index).copied())
        {
            let _ = std::process::Command::new("kill")
                .arg("-9")
                .arg(pid.to_string())
                .status();
        }
    }

    /// The process ids of the running instances.
    fn pids(&self) -> Vec<u32> {
        self.shared
            .pids
            .lock()
            .map(|p| p.values().copied().collect())
            .unwrap_or_default()
    }

    /// Kills every instance at once (a crash); each restarts with a cold start.
    pub fn crash(&self) {
        let pids = self.pids();
        for pid in pids {
            let _ = std::process::Command::new("kill")
                .arg("-9")
                .arg(pid.to_string())
                .status();
        }
    }

    /// Process start to first `next` (the runtime ready for work: Lambda's Init Duration), in
    /// ms, of every process this function started.
    pub fn init_durations_ms(&self) -> Vec<f64> {
        self.shared
            .init_ms
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    pub fn cold_starts(&self) -> u64 {
        self.shared.cold_starts.load(Ordering::Relaxed)
    }

    /// The highest resident memory any instance reached, in MB.
    pub fn peak_rss_mb(&self) -> f64 {
        let pids = self.pids();
        for pid in pids {
            if let Some(kb) = rss_kb(pid) {
                self.shared.peak_rss_kb.fetch_max(kb, Ordering::Relaxed);
            }
        }
        self.shared.peak_rss_kb.load(Ordering::Relaxed) as f64 / 1024.0
    }

    pub fn stop(&self) {
        self.shared.stopped.store(true, Ordering::Relaxed);
        self.peak_rss_mb();
        self.crash();
    }
}

/// Keeps one instance's process running: starts it, forwards its output, and on exit fails
/// its in-flight invocation and starts it again (unless stopped).
async fn supervise(inst: Arc<Instance>, api: String) {
    let s = inst.shared.clone();
    let mut backoff = Duration::from_millis(100);
    while !s.stopped.load(Ordering::Relaxed) {
        let spec = &s.spec;
        let mut cmd = tokio::process::Command::new(&spec.binary);
        cmd.env_clear()
            .envs(&spec.env)
            .env("AWS_LAMBDA_RUNTIME_API", &api)
            .env("AWS_LAMBDA_FUNCTION_NAME", &spec.name)
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env(
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                spec.memory_mb.to_string(),
            )
            .env(
                "AWS_LAMBDA_LOG_GROUP_NAME",
                format!("/aws/lambda/{}", spec.name),
            )
            .env(
                "AWS_LAMBDA_LOG_STREAM_NAME",
                format!("local/{}", inst.index),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let spawned = std::time::Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                (s.sink)(
                    &spec.name,
                    &format!("cannot start {}: {e}", spec.binary.display()),
                );
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        s.cold_starts.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = s.spawned_at.lock() {
            m.insert(inst.index, spawned);
        }
        if let Some(pid) = child.id()
            && let Ok(mut p) = s.pids.lock()
        {
            p.insert(inst.index, pid);
        }
        let mut readers = Vec::new();
        for stream in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|e| Box::new(e) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let (sink, name) = (s.sink.clone(), spec.name.clone());
            readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    sink(&name, &l);
                }
            }));
        }
        let started = tokio::time::Instant::now();
        // Sample memory while it runs.
        let status = loop {
            tokio::select! {
                st = child.wait() => break st,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {
                    if let Some(kb) = child.id().and_then(rss_kb) {
                        s.peak_rss_kb.fetch_max(kb, Ordering::Relaxed);
                    }
                }
            }
        };
        for r in readers {
            let _ = tokio::time::timeout(Duration::from_secs(1), r).await;
        }
        if let Ok(mut p) = s.pids.lock() {
            p.remove(&inst.index);
        }
        inst.generation.send_modify(|g| *g += 1);
        let reply = s
            .inflight
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&inst.index));
        if let Some((_, r)) = reply {
            let _ = r.send(Err(InvokeError::Crashed));
        }
        if s.stopped.load(Ordering::Relaxed) {
            break;
        }
        (s.sink)(
            &spec.name,
            &format!("instance {} exited ({status:?}); restarting", inst.index),
        );
        // A process that dies at init again and again is backed off, as Lambda does.
        if started.elapsed() < Duration::from_secs(2) {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        } else {
            backoff = Duration::from_millis(100);
        }
    }
}
