//! Cold-start benchmark: process start to the runtime's first request for work (the init,
//! Lambda's Init Duration) and to the first answer, for the ingest function and both senders,
//! each run interleaved with a bare lambda_runtime function built with the same profile
//! (`bridge-bare-lambda`), under the local Runtime API emulator against moto and the fakes.
//! Prints medians, worsts, peak memory and each function's ratio to the bare one (targets:
//! ingest <= 1.5x, senders <= 1.2x).
//!
//! Run (moto up) on optimised binaries, which the `local` profile builds:
//! `cargo build --profile local -p ingest -p meta-sender -p google-sender -p reconcile -p bridge-devstack --bins`
//! then `target/local/bridge-coldstart [runs]` (default 15). The functions are taken from this
//! binary's directory unless `BRIDGE_BIN_DIR` says otherwise.

use bridge_devstack::local::harness::{LocalBridge, SECRET};
use bridge_devstack::local::runtime::{Function, FunctionSpec, LineSink};
use bridge_devstack::local::{sqs_event, url_event};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Target {
    label: &'static str,
    spec: FunctionSpec,
    event: fn() -> Value,
    /// The ratio this function is held to (None for the baseline itself).
    target: Option<f64>,
    times_ms: Vec<f64>,
    init_ms: Vec<f64>,
    peak_mb: f64,
}

fn ingest_event() -> Value {
    let body =
        json!({"event_name": "lead", "occurred_at": "2026-11-27T10:00:00Z", "entity_type": "lead",
        "entity_id": "L-cold", "identity": {"email": "a@example.com", "phone": "+1 650 555 1234"},
        "consent": {"status": "granted"}})
        .to_string();
    let t = bridge_core::timestamp::Timestamp::now().unix_secs();
    let sig = bridge_core::webhook::signature::bridge_sign(SECRET.as_bytes(), t, body.as_bytes());
    let mut headers = serde_json::Map::new();
    headers.insert("content-type".into(), json!("application/json"));
    headers.insert("x-bridge-signature".into(), json!(sig));
    url_event(
        "POST",
        "/webhooks/generic",
        "",
        headers,
        "coldstart",
        json!(body),
        false,
    )
}

/// A message for an event that is not in the store: the sender's whole path from the SQS
/// event to its answer, without a platform call.
fn sender_event() -> Value {
    let m = aws_sdk_sqs::types::Message::builder()
        .message_id("cold-1")
        .receipt_handle("cold-1")
        .body(json!({"event_id": "not-stored", "destination": "meta"}).to_string())
        .build();
    sqs_event(&[m], "arn:aws:sqs:us-east-1:000000000000:coldstart")
}

fn bare_event() -> Value {
    json!({"ping": 1})
}

/// Starts a fresh copy of `spec` and times it from the start to its first answer; with the
/// time from the start to its first request for work (its init) and its peak memory.
async fn once(spec: &FunctionSpec, event: Value) -> Result<(f64, f64, f64), String> {
    let sink: LineSink = Arc::new(|_: &str, _: &str| {});
    let started = Instant::now();
    let f = Function::start(spec.clone(), sink)
        .await
        .map_err(|e| e.to_string())?;
    let answer = f.invoke(event).await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let peak = f.peak_rss_mb();
    let init = f.init_durations_ms().first().copied().unwrap_or(f64::NAN);
    f.stop();
    answer.map_err(|e| format!("{}: {e}", spec.name))?;
    Ok((ms, init, peak))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> Result<(), String> {
    let runs: usize = match std::env::args().nth(1) {
        Some(n) => n
            .parse()
            .map_err(|_| format!("runs must be a number, got {n:?}"))?,
        None => 15,
    };
    if std::env::var_os("BRIDGE_BIN_DIR").is_none()
        && let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|p| p.to_path_buf()))
    {
        // SAFETY: no other thread exists yet (the runtime is built below).
        unsafe { std::env::set_var("BRIDGE_BIN_DIR", dir) };
    }
    tokio::runtime::Runtime::new()
        .map_err(|e| e.to_string())?
        .block_on(run(runs))
}

async fn run(runs: usize) -> Result<(), String> {
    let bin_dir = bridge_devstack::local::harness::bin_dir();
    let bridge = LocalBridge::start("coldstart", &[], 1).await;
    let function = |name: &str| bridge.running.function(name).spec().clone();
    let ingest = function("IngestFunction");
    let mut bare = ingest.clone();
    bare.name = "BareFunction".into();
    bare.binary = bin_dir.join("bridge-bare-lambda");
    if !bare.binary.exists() {
        return Err(format!(
            "{} is not built (bash infra/local/build.sh)",
            bare.binary.display()
        ));
    }
    bare.env.retain(|k, _| k.starts_with("AWS_"));
    let mut targets = vec![
        Target {
            label: "bare lambda_runtime",
            spec: bare,
            event: bare_event,
            target: None,
            times_ms: vec![],
            init_ms: vec![],
            peak_mb: 0.0,
        },
        Target {
            label: "ingest",
            spec: ingest,
            event: ingest_event,
            target: Some(1.5),
            times_ms: vec![],
            init_ms: vec![],
            peak_mb: 0.0,
        },
        Target {
            label: "meta sender",
            spec: function("MetaSenderFunction"),
            event: sender_event,
            target: Some(1.2),
            times_ms: vec![],
            init_ms: vec![],
            peak_mb: 0.0,
        },
        Target {
            label: "google sender",
            spec: function("GoogleSenderFunction"),
            event: sender_event,
            target: Some(1.2),
            times_ms: vec![],
            init_ms: vec![],
            peak_mb: 0.0,
        },
    ];
    // The stack's own instances are idle from here; stop them so they do not compete.
    bridge.running.stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // One unmeasured round warms the page cache for every binary alike.
    for t in &targets {
        once(&t.spec, (t.event)()).await?;
    }
    for _ in 0..runs {
        for t in &mut targets {
            let (ms, init, peak) = once(&t.spec, (t.event)()).await?;
            t.times_ms.push(ms);
            t.init_ms.push(init);
            t.peak_mb = t.peak_mb.max(peak);
        }
    }
    let mut all_met = true;
    for (title, pick) in [
        (
            "init: process start to the runtime's first request for work (Lambda's Init Duration; \
             SSM reads go to moto)",
            (|t: &Target| t.init_ms.clone()) as fn(&Target) -> Vec<f64>,
        ),
        (
            "first answer: init and the first event (its DynamoDB and SQS calls go to moto, \
             where the bare function makes none)",
            |t: &Target| t.times_ms.clone(),
        ),
    ] {
        let base = median(&pick(&targets[0]));
        println!("cold start, {title}, {runs} interleaved runs:");
        for t in &targets {
            let times = pick(t);
            let med = median(&times);
            let worst = times.iter().copied().fold(0.0, f64::max);
            let size = std::fs::metadata(&t.spec.binary)
                .map(|m| m.len() as f64 / 1e6)
                .unwrap_or(0.0);
            let ratio = med / base;
            let verdict = match t.target {
                Some(limit) if ratio <= limit => {
                    format!("{ratio:.2}x bare (target <= {limit}x) met")
                }
                Some(limit) => {
                    all_met = false;
                    format!("{ratio:.2}x bare (target <= {limit}x) NOT met")
                }
                None => "baseline".into(),
            };
            println!(
                "  {:20} median {med:6.1} ms, worst {worst:6.1} ms, peak RSS {:5.1} MB, binary {size:4.1} MB: {verdict}",
                t.label, t.peak_mb
            );
        }
    }
    println!("  all targets {}", if all_met { "met" } else { "NOT met" });
    Ok(())
}
