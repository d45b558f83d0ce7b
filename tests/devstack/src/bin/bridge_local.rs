//! `bridge-local`: the whole bridge on one machine (see `infra/local/up.sh`), and the operator
//! commands that go with it: post the sample events, look an event up, redrive a DLQ.
//!
//!   bridge-local up [--port 9000] [--instances 1] [--bin-dir DIR (default: this binary's)]
//!                   [--mapping FILE (default: the bundled infra/mapping.toml)] [--param K=V ...]
//!   bridge-local post-samples [--url http://127.0.0.1:9000]
//!   bridge-local show <event_id>
//!   bridge-local redrive <meta|google>
//!   bridge-local status

use bridge_core::store::EventStore;
use bridge_devstack::local::bridge::{Bridge, BridgeConfig, Destinations, Secrets};
use bridge_devstack::local::{self, Plan};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Result<T> = std::result::Result<T, String>;

/// Local signing secrets, stored in the emulator's SSM like real ones.
pub const SECRETS: &[(&str, &str)] = &[
    ("generic", "local-generic-secret"),
    ("hubspot", "local-hubspot-secret"),
    ("salesforce", "local-salesforce-secret"),
    ("hubspot-app-secret", "local-hubspot-app-secret"),
];
const META_TOKEN: &str = "local-meta-token";
const HUBSPOT_TOKEN: &str = "local-hubspot-token";

fn root() -> PathBuf {
    bridge_devstack::repo_root()
}

fn state_dir() -> PathBuf {
    root().join(".local")
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn env_or(k: &str, default: &str) -> String {
    std::env::var(k)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

async fn up(args: &[String]) -> Result<()> {
    let port: u16 = arg(args, "--port")
        .or_else(|| std::env::var("BRIDGE_PORT").ok())
        .and_then(|p| p.parse().ok())
        .unwrap_or(9000);
    let instances: usize = arg(args, "--instances")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1);
    // By default the functions built beside this binary (same profile, same build).
    let bin_dir = arg(args, "--bin-dir")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(PathBuf::from))
        })
        .unwrap_or_else(|| root().join("target/debug"));
    // Checked here, so a bad file is one clear error instead of every function failing init.
    let mapping = match arg(args, "--mapping") {
        Some(p) => {
            let path = std::fs::canonicalize(&p).map_err(|e| format!("--mapping {p}: {e}"))?;
            let text = std::fs::read_to_string(&path).map_err(|e| format!("--mapping {p}: {e}"))?;
            bridge_core::mapping::Mapping::load(&text)
                .map_err(|e| format!("--mapping {p}: {e}"))?;
            Some(path)
        }
        None => None,
    };
    let stack = env_or("STACK_NAME", "bridge-local");
    let endpoint = bridge_devstack::endpoint();
    std::fs::create_dir_all(state_dir().join("logs")).map_err(|e| e.to_string())?;

    // Destinations: the strict fakes unless real endpoints are configured.
    let mut params: Vec<(String, String)> = Vec::new();
    let real = std::env::var("BRIDGE_REAL_DESTINATIONS").is_ok_and(|v| v == "1");
    if real {
        for (var, param) in [
            ("META_GRAPH_BASE_URL", "MetaGraphBaseUrl"),
            ("GOOGLE_ADS_BASE_URL", "GoogleAdsBaseUrl"),
            ("GOOGLE_DATAMANAGER_BASE_URL", "GoogleDataManagerBaseUrl"),
            ("GOOGLE_OAUTH_TOKEN_URL", "GoogleOAuthTokenUrl"),
        ] {
            if let Ok(v) = std::env::var(var) {
                params.push((param.into(), v));
            }
        }
    } else {
        params.push(("HubSpotPortalId".into(), SAMPLE_PORTAL.into()));
    }
    params.push(("PublicBaseUrl".into(), format!("http://127.0.0.1:{port}")));
    for p in args
        .iter()
        .enumerate()
        .filter(|(_, a)| *a == "--param")
        .map(|(i, _)| i + 1)
    {
        if let Some((k, v)) = args.get(p).and_then(|kv| kv.split_once('=')) {
            params.push((k.into(), v.into()));
        }
    }

    let logs = Arc::new(Mutex::new(BTreeMap::<String, std::fs::File>::new()));
    let sink_logs = logs.clone();
    let sink: local::runtime::LineSink = Arc::new(move |f: &str, line: &str| {
        if let Ok(mut m) = sink_logs.lock() {
            let file = m.entry(f.to_string()).or_insert_with(|| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(state_dir().join("logs").join(format!("{f}.log")))
                    .unwrap_or_else(|_| tempfile_fallback())
            });
            let _ = writeln!(file, "{line}");
        }
    });
    let mut env = BTreeMap::new();
    if let Some(path) = &mapping {
        env.insert("MAPPING_PATH".into(), path.display().to_string());
    }
    let bridge = Bridge::start(BridgeConfig {
        stack: stack.clone(),
        reuse_stack: true,
        params,
        ssm_prefix: "/conversion-bridge".into(),
        secrets: Secrets {
            meta_token: META_TOKEN.into(),
            meta_app_secret: None,
            hubspot_token: HUBSPOT_TOKEN.into(),
            webhooks: SECRETS
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        },
        destinations: if real {
            Destinations::Real
        } else {
            Destinations::Fakes {
                base_port: Some(port),
            }
        },
        plan_path: state_dir().join("plan.json"),
        env_file: Some(state_dir().join("bridge.env")),
        bin_dir,
        url_addr: format!("127.0.0.1:{port}"),
        instances,
        env,
        schedules: true,
        sink,
    })
    .await?;
    let mut started = Vec::new();
    match &bridge.fakes {
        None => started.push("destinations: the endpoints in the environment (BRIDGE_REAL_DESTINATIONS=1); secrets must already be in SSM".to_string()),
        Some(f) => {
            // The sample records; `post-samples` records their stage changes at its own times.
            f.hubspot.seed_samples(
                bridge_core::timestamp::Timestamp::now()
                    .minus_secs(7200)
                    .unix_ms(),
            );
            started.push(format!("fake Meta Conversions API   {}", f.meta.base_url));
            started.push(format!(
                "fake Google Ads/Data Manager {} (OAuth {})",
                f.google.base_url,
                f.google.token_url()
            ));
            started.push(format!("fake HubSpot CRM API        {}", f.hubspot.base_url));
        }
    }
    let (plan, running) = (&bridge.plan, &bridge.running);
    println!("local AWS (moto)             {endpoint}, stack {stack} from infra/template.yaml");
    match &mapping {
        Some(p) => println!(
            "mapping                      {} (MAPPING_PATH)",
            p.display()
        ),
        None => println!("mapping                      the bundled infra/mapping.toml"),
    }
    for s in &started {
        println!("{s}");
    }
    for (name, f) in &plan.functions {
        println!("function {name:<22} {} x{instances}", f.binary);
    }
    for m in &plan.sqs {
        println!(
            "SQS mapping {} -> {} (BatchSize {}, window {} s)",
            m.queue, m.function, m.batch_size, m.window_secs
        );
    }
    for s in &plan.schedules {
        println!("schedule {} -> {}", s.expression, s.function);
    }
    if let Some(u) = &running.url {
        println!("webhooks                     {u}/webhooks/{{generic,hubspot,salesforce}}");
    }
    println!(
        "logs                         {}/logs/<function>.log",
        state_dir().display()
    );
    println!("post the samples:            bash infra/local/post-samples.sh");
    println!("Ctrl-C stops everything this started.");

    let mut last = String::new();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {
                let line = running.stats.line();
                if line != last {
                    println!("{line}");
                    last = line;
                }
            }
        }
    }
    println!("\nstopping");
    for (name, f) in &running.functions {
        println!(
            "{name}: peak RSS {:.1} MB, {} cold starts",
            f.peak_rss_mb(),
            f.cold_starts()
        );
    }
    running.stop();
    Ok(())
}

fn tempfile_fallback() -> std::fs::File {
    std::fs::OpenOptions::new()
        .append(true)
        .open("/dev/null")
        .expect("/dev/null")
}

/// Rewrites every timestamp in a sample so the latest is an hour ago, keeping their order:
/// samples stay inside the platforms' windows whenever they are posted.
fn freshen(v: &mut Value, shift_ms: i64) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k == "occurred_at"
                    && let Some(t) = x
                        .as_str()
                        .and_then(|s| bridge_core::timestamp::Timestamp::parse_rfc3339(s).ok())
                {
                    *x = json!(t.plus_millis(shift_ms).canonical());
                } else if k == "occurredAt"
                    && let Some(ms) = x.as_i64()
                {
                    *x = json!(ms + shift_ms);
                } else {
                    freshen(x, shift_ms);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| freshen(x, shift_ms)),
        _ => {}
    }
}

fn latest(v: &Value) -> i64 {
    match v {
        Value::Object(m) => m
            .iter()
            .map(|(k, x)| match (k.as_str(), x) {
                ("occurred_at", Value::String(s)) => {
                    bridge_core::timestamp::Timestamp::parse_rfc3339(s)
                        .map(|t| t.unix_ms())
                        .unwrap_or(i64::MIN)
                }
                ("occurredAt", Value::Number(n)) => n.as_i64().unwrap_or(i64::MIN),
                _ => latest(x),
            })
            .max()
            .unwrap_or(i64::MIN),
        Value::Array(a) => a.iter().map(latest).max().unwrap_or(i64::MIN),
        _ => i64::MIN,
    }
}

/// The HubSpot account of the sample webhooks.
const SAMPLE_PORTAL: &str = "62515";

/// Before the sample HubSpot delivery is posted: records its changes in the fake HubSpot's
/// property histories (at the freshened times), which the bridge checks every webhook
/// against. The fake listens beside the bridge (port + 102); with real destinations there is
/// no fake and nothing to record.
async fn record_hubspot_changes(http: &reqwest::Client, base: &str, delivery: &Value) {
    let port: u16 = base
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or(9000);
    let changes: Vec<Value> = delivery
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let kind = if e["subscriptionType"]
                .as_str()
                .is_some_and(|t| t.starts_with("deal"))
            {
                "deal"
            } else {
                "contact"
            };
            json!({"kind": kind, "id": e["objectId"].to_string(), "property": e["propertyName"],
                   "value": e["propertyValue"], "at_ms": e["occurredAt"]})
        })
        .collect();
    let url = format!("http://127.0.0.1:{}/_fake/changes", port + 102);
    if let Err(e) = http.post(&url).json(&changes).send().await {
        println!("(no fake HubSpot at {url}: {e}; the delivery is posted as it is)");
    }
}

async fn post_samples(args: &[String]) -> Result<()> {
    let base = arg(args, "--url")
        .unwrap_or_else(|| format!("http://127.0.0.1:{}", env_or("BRIDGE_PORT", "9000")));
    let dir = root().join("events/webhooks");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    // The won deal before its refund.
    files.sort_by_key(|p| (p.to_string_lossy().contains("refund"), p.clone()));
    let samples: Vec<(PathBuf, Value)> = files
        .into_iter()
        .filter_map(|p| {
            let v = std::fs::read_to_string(&p)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())?;
            Some((p, v))
        })
        .collect();
    let newest = samples.iter().map(|(_, v)| latest(v)).max().unwrap_or(0);
    let shift = bridge_core::timestamp::Timestamp::now()
        .minus_secs(3600)
        .unix_ms()
        - newest;
    let http = bridge_platforms::http::client().map_err(|e| e.to_string())?;
    for (path, mut v) in samples {
        freshen(&mut v, shift);
        if path.ends_with("hubspot-delivery.json") {
            record_hubspot_changes(&http, &base, &v).await;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let source = name.split('-').next().unwrap_or("generic").to_string();
        let body = v.to_string();
        let url = format!("{base}/webhooks/{source}");
        let mut req = http.post(&url).header("content-type", "application/json");
        if name == "hubspot-delivery.json" {
            let ts = bridge_core::timestamp::Timestamp::now()
                .unix_ms()
                .to_string();
            let sig = bridge_core::webhook::signature::hubspot_sign(
                b"local-hubspot-app-secret",
                "POST",
                &url,
                body.as_bytes(),
                &ts,
            );
            req = req
                .header("x-hubspot-signature-v3", sig)
                .header("x-hubspot-request-timestamp", ts);
        } else {
            let secret = SECRETS
                .iter()
                .find(|(s, _)| *s == source)
                .map_or("", |(_, x)| *x);
            let t = bridge_core::timestamp::Timestamp::now().unix_secs();
            let sig =
                bridge_core::webhook::signature::bridge_sign(secret.as_bytes(), t, body.as_bytes());
            req = req.header("x-bridge-signature", sig);
        }
        let resp = req
            .body(body)
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        println!("{name} -> {status}\n  {text}");
    }
    Ok(())
}

async fn show(args: &[String]) -> Result<()> {
    let id = args.get(2).ok_or("usage: bridge-local show <event_id>")?;
    let plan = Plan::load(&state_dir().join("plan.json"))?;
    let table = plan
        .functions
        .values()
        .find_map(|f| f.env.get("TABLE_NAME").cloned())
        .ok_or("the plan names no table")?;
    let aws = bridge_devstack::sdk_config().await;
    let store =
        bridge_aws::dynamodb::DynamoStore::new(bridge_aws::clients::dynamodb(&aws), &table, 400);
    match store.get(id).await.map_err(|e| e.to_string())? {
        Some(e) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&e).map_err(|e| e.to_string())?
            );
            Ok(())
        }
        None => Err(format!("no event {id} in {table}")),
    }
}

async fn redrive(args: &[String]) -> Result<()> {
    let which = args
        .get(2)
        .ok_or("usage: bridge-local redrive <meta|google>")?;
    let plan = Plan::load(&state_dir().join("plan.json"))?;
    let name = match which.as_str() {
        "meta" => "MetaQueue",
        "google" => "GoogleQueue",
        other => return Err(format!("unknown destination {other}: meta or google")),
    };
    let q = plan
        .queues
        .get(name)
        .ok_or(format!("no queue {name} in the plan"))?;
    let dlq = q.dlq_url.as_deref().ok_or(format!("{name} has no DLQ"))?;
    let aws = bridge_devstack::sdk_config().await;
    let moved = local::redrive(&bridge_aws::clients::sqs(&aws), dlq, &q.url).await?;
    println!("moved {moved} messages from {dlq} back to {}", q.url);
    Ok(())
}

async fn status() -> Result<()> {
    let plan = Plan::load(&state_dir().join("plan.json"))?;
    let aws = bridge_devstack::sdk_config().await;
    let sqs = bridge_aws::clients::sqs(&aws);
    for (name, q) in &plan.queues {
        println!("{name:<24} {} messages", local::depth(&sqs, &q.url).await);
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let r = match args.get(1).map(String::as_str) {
        Some("up") => up(&args).await,
        Some("post-samples") => post_samples(&args).await,
        Some("show") => show(&args).await,
        Some("redrive") => redrive(&args).await,
        Some("status") => status().await,
        _ => Err("usage: bridge-local up | post-samples | show <event_id> | redrive <meta|google> | status".into()),
    };
    if let Err(e) = r {
        eprintln!("bridge-local: {e}");
        std::process::exit(1);
    }
}
