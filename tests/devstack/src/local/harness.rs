//! One whole bridge per test: its own stack from the template (with the plan), its own SSM
//! secrets, the strict fakes as destinations, the functions' optimised binaries under the local runtime,
//! and helpers to post signed webhooks and wait until every event has settled.

use super::bridge::{Bridge, BridgeConfig, Destinations, Fakes, Secrets};
use crate::Stack;
use crate::fakes::google::FakeGoogle;
use crate::fakes::hubspot::FakeHubSpot;
use crate::fakes::meta::FakeMeta;
use bridge_aws::dynamodb::DynamoStore;
use bridge_core::delivery::Destination;
use bridge_core::event::CanonicalEvent;
use bridge_core::store::EventStore;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const META_TOKEN: &str = "e2e-meta-token";
/// The Meta app secret: the fake Meta then requires `appsecret_proof` on every request.
pub const META_APP_SECRET: &str = "e2e-meta-app-secret";
pub const HUBSPOT_TOKEN: &str = "e2e-hubspot-token";
pub const SECRET: &str = "e2e-signing-secret";
pub const HUBSPOT_APP_SECRET: &str = "e2e-hubspot-app-secret";

pub struct LocalBridge {
    /// The stack, its plan and the running functions: one `Bridge`, as `bridge-local up` runs it.
    pub bridge: Bridge,
    pub meta: FakeMeta,
    pub google: FakeGoogle,
    pub hubspot: FakeHubSpot,
    pub store: DynamoStore,
    pub sqs: aws_sdk_sqs::Client,
    pub url: String,
    /// Every line every function wrote (for the PII scan).
    pub logs: Arc<Mutex<Vec<String>>>,
    http: reqwest::Client,
}

impl std::ops::Deref for LocalBridge {
    type Target = Bridge;
    fn deref(&self) -> &Bridge {
        &self.bridge
    }
}

/// Where the functions' binaries are: `BRIDGE_BIN_DIR`, else `target/debug` (infra/local/build.sh).
pub fn bin_dir() -> PathBuf {
    std::env::var("BRIDGE_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| crate::repo_root().join("target/debug"))
}

impl LocalBridge {
    /// Starts everything; `params` are template parameters on top of the test defaults.
    pub async fn start(test: &str, params: &[(&str, &str)], instances: usize) -> LocalBridge {
        Self::start_with_env(test, params, instances, &[]).await
    }

    /// As `start`, with extra environment for every function (e.g. `MAPPING_PATH`, the
    /// mapping contract the functions load instead of the bundled one).
    pub async fn start_with_env(
        test: &str,
        params: &[(&str, &str)],
        instances: usize,
        extra_env: &[(&str, &str)],
    ) -> LocalBridge {
        let mut all: Vec<(String, String)> = [
            ("HubSpotPortalId", "62515"),
            ("MetaBatchingWindowSeconds", "1"),
            ("GoogleBatchingWindowSeconds", "1"),
            // The template's test value: queue visibility 60 s (six times it) and a 10 s lease
            // follow from it.
            ("SenderTimeoutSeconds", "10"),
            // Requests short enough to fit in that timeout with the senders' 5 s margin.
            ("MetaTimeoutSeconds", "3"),
            ("GoogleTimeoutSeconds", "3"),
            ("RetryBaseSeconds", "1"),
            ("RetryCapSeconds", "3"),
            ("RefundWaitSeconds", "2"),
            ("PublicBaseUrl", "http://bridge.test"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .to_vec();
        for (k, v) in params {
            all.retain(|(x, _)| x != k);
            all.push((k.to_string(), v.to_string()));
        }
        let dir = bin_dir();
        assert!(
            dir.join("bridge-ingest").exists(),
            "the functions' binaries are not in {} (infra/local/test.sh builds them with infra/local/build.sh)",
            dir.display()
        );
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink_logs = logs.clone();
        let mut webhooks: Vec<(String, String)> = ["generic", "hubspot", "salesforce"]
            .map(|s| (s.to_string(), SECRET.to_string()))
            .to_vec();
        webhooks.push(("hubspot-app-secret".into(), HUBSPOT_APP_SECRET.into()));
        let bridge = Bridge::start(BridgeConfig {
            stack: Stack::unique_name(test),
            reuse_stack: false,
            params: all,
            ssm_prefix: format!("/e2e/{test}-{}", std::process::id()),
            secrets: Secrets {
                meta_token: META_TOKEN.into(),
                meta_app_secret: Some(META_APP_SECRET.into()),
                hubspot_token: HUBSPOT_TOKEN.into(),
                webhooks,
            },
            destinations: Destinations::Fakes { base_port: None },
            plan_path: Stack::plan_path(test),
            env_file: None,
            bin_dir: dir,
            url_addr: "127.0.0.1:0".into(),
            instances,
            env: extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            schedules: false,
            sink: Arc::new(move |f: &str, l: &str| {
                if let Ok(mut v) = sink_logs.lock() {
                    v.push(format!("{f}: {l}"));
                }
            }),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let Some(Fakes {
            meta,
            google,
            hubspot,
        }) = bridge.fakes.clone()
        else {
            panic!("a test bridge sends to the fakes");
        };
        let url = bridge.running.url.clone().expect("function URL");
        let store = DynamoStore::new(
            bridge_aws::clients::dynamodb(&bridge.aws),
            bridge.stack.var("TABLE_NAME"),
            400,
        );
        let sqs = bridge_aws::clients::sqs(&bridge.aws);
        LocalBridge {
            bridge,
            meta,
            google,
            hubspot,
            store,
            sqs,
            url,
            logs,
            http: bridge_platforms::http::client().expect("HTTP client"),
        }
    }

    /// Deploys again with `extra_env` changed (a new `MAPPING_PATH`, say), as a stack update
    /// would: the functions stop, and new instances start on the same table, queues and fakes.
    pub async fn redeploy(&mut self, extra_env: &[(&str, &str)]) {
        self.bridge
            .redeploy(extra_env)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        self.url = self.bridge.running.url.clone().expect("function URL");
    }

    /// The environment the functions run with (what an operator's command is given too).
    pub fn function_env(&self) -> &BTreeMap<String, String> {
        &self.bridge.env
    }

    /// Runs the operator's `bridge-backfill` with `args` as an operator would (the reconcile
    /// function's own configuration), off the runtime's thread so this test's fakes keep
    /// serving; panics unless it succeeds, and returns the JSON it prints.
    pub async fn backfill(&self, args: &[&str]) -> Value {
        let mut cmd = std::process::Command::new(bin_dir().join("bridge-backfill"));
        cmd.args(args);
        cmd.envs(self.plan.functions["ReconcileFunction"].env.iter())
            .envs(self.function_env().iter());
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .expect("the command's thread")
            .expect("run bridge-backfill");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&stdout).expect("bridge-backfill prints JSON")
    }

    /// POSTs `body` to `/webhooks/{source}` with a valid `X-Bridge-Signature`.
    pub async fn post(&self, source: &str, body: &Value) -> (u16, Value) {
        let text = body.to_string();
        let t = bridge_core::timestamp::Timestamp::now().unix_secs();
        let sig =
            bridge_core::webhook::signature::bridge_sign(SECRET.as_bytes(), t, text.as_bytes());
        self.post_signed(source, text, &[("x-bridge-signature", sig)])
            .await
    }

    /// POSTs a HubSpot subscription delivery with HubSpot's v3 signature.
    pub async fn post_hubspot(&self, body: &Value) -> (u16, Value) {
        let text = body.to_string();
        let uri = "http://bridge.test/webhooks/hubspot";
        let ts = bridge_core::timestamp::Timestamp::now()
            .unix_ms()
            .to_string();
        let sig = bridge_core::webhook::signature::hubspot_sign(
            HUBSPOT_APP_SECRET.as_bytes(),
            "POST",
            uri,
            text.as_bytes(),
            &ts,
        );
        self.post_signed(
            "hubspot",
            text,
            &[
                ("x-hubspot-signature-v3", sig),
                ("x-hubspot-request-timestamp", ts),
            ],
        )
        .await
    }

    /// POSTs `text` to `source`'s webhook with the signature `headers`: the status and the
    /// JSON answer.
    async fn post_signed(
        &self,
        source: &str,
        text: String,
        headers: &[(&str, String)],
    ) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}/webhooks/{source}", self.url))
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let r = req.body(text).send().await.expect("post webhook");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// The stored events, by store key.
    pub async fn events(&self, keys: &[String]) -> BTreeMap<String, CanonicalEvent> {
        let mut out = BTreeMap::new();
        for chunk in keys.chunks(100) {
            for e in self.store.get_many(chunk).await.expect("get_many") {
                out.insert(e.key.clone(), e);
            }
        }
        out
    }

    /// Waits until no (event, destination) pair of `ids` is still open (pending, sending,
    /// retry) and the delivery queues are empty; returns the final events.
    pub async fn settle(
        &self,
        ids: &[String],
        limit: Duration,
    ) -> BTreeMap<String, CanonicalEvent> {
        let start = Instant::now();
        let mut shown = Instant::now();
        loop {
            let mut queued = 0;
            for q in ["MetaQueue", "GoogleQueue"] {
                queued += super::depth(&self.sqs, &self.plan.queues[q].url).await;
            }
            // Reading every event costs the emulator's serialized DynamoDB as much as the
            // senders' work; look only once the queues have drained.
            if queued > 0 && start.elapsed() < limit {
                if shown.elapsed() > Duration::from_secs(15) {
                    eprintln!(
                        "[{:>4.0} s] {queued} queued; {}",
                        start.elapsed().as_secs_f64(),
                        self.running.stats.line()
                    );
                    shown = Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(1000)).await;
                continue;
            }
            let events = self.events(ids).await;
            let open: Vec<String> = events
                .values()
                .flat_map(|e| {
                    e.destinations
                        .iter()
                        .filter(|(_, s)| s.status.is_open())
                        .map(move |(d, s)| format!("{} {d} {}", e.event_id, s.status.as_str()))
                })
                .collect();
            if open.is_empty() && queued == 0 && events.len() == ids.len() {
                return events;
            }
            if shown.elapsed() > Duration::from_secs(15) {
                eprintln!(
                    "[{:>4.0} s] {} open pairs, {queued} queued; {}",
                    start.elapsed().as_secs_f64(),
                    open.len(),
                    self.running.stats.line()
                );
                shown = Instant::now();
            }
            assert!(
                start.elapsed() < limit,
                "not settled after {limit:?}: {} open pairs (first: {:?}), {queued} queued, {}/{} stored; {}",
                open.len(),
                open.iter().take(5).collect::<Vec<_>>(),
                events.len(),
                ids.len(),
                self.running.stats.line()
            );
            tokio::time::sleep(Duration::from_millis(2000)).await;
        }
    }

    pub fn dlq_url(&self, d: Destination) -> String {
        let q = if d == Destination::Meta {
            "MetaQueue"
        } else {
            "GoogleQueue"
        };
        self.plan.queues[q].dlq_url.clone().expect("DLQ")
    }

    pub fn queue_url(&self, d: Destination) -> String {
        let q = if d == Destination::Meta {
            "MetaQueue"
        } else {
            "GoogleQueue"
        };
        self.plan.queues[q].url.clone()
    }

    /// Store keys of the messages in a destination's DLQ (read without removing them for good:
    /// they become visible again after a short timeout).
    pub async fn dlq_keys(&self, d: Destination) -> Vec<String> {
        let url = self.dlq_url(d);
        let mut ids = Vec::new();
        let mut empty = 0;
        while empty < 2 {
            let r = self
                .sqs
                .receive_message()
                .queue_url(&url)
                .max_number_of_messages(10)
                .visibility_timeout(2)
                .send()
                .await
                .expect("receive DLQ");
            let msgs = r.messages.unwrap_or_default();
            if msgs.is_empty() {
                empty += 1;
            }
            for m in msgs {
                if let Ok(dm) =
                    bridge_core::queue::DeliveryMessage::from_body(m.body().unwrap_or_default())
                {
                    ids.push(dm.key);
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        ids.sort();
        ids
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.logs.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Every secret this bridge was configured with, and every OAuth access token the fake
    /// Google issued to it.
    pub fn secrets(&self) -> Vec<String> {
        let mut all: Vec<String> = [
            META_TOKEN,
            META_APP_SECRET,
            HUBSPOT_TOKEN,
            SECRET,
            HUBSPOT_APP_SECRET,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        all.extend([
            self.google.client_secret.clone(),
            self.google.refresh_token.clone(),
            self.google.developer_token.clone(),
        ]);
        all.extend(
            self.google
                .with(|d| d.tokens.keys().cloned().collect::<Vec<_>>()),
        );
        all
    }

    /// Panics naming the place if a configured secret appears in a function's log line, a
    /// stored item, or a DLQ message (body or attributes): reqwest's error text carries the
    /// URL, so a token in a URL would surface in exactly these places after a network failure.
    pub async fn assert_no_secrets(&self) {
        assert_eq!(
            self.meta.secrets_in_url(),
            0,
            "the Meta token or proof went into a request URL"
        );
        let secrets = self.secrets();
        for l in self.log_lines() {
            for s in &secrets {
                assert!(!l.contains(s.as_str()), "a secret in a log line: {l}");
            }
        }
        let ddb = bridge_aws::clients::dynamodb(&crate::sdk_config().await);
        let mut start = None;
        loop {
            let page = ddb
                .scan()
                .table_name(self.stack.var("TABLE_NAME"))
                .set_exclusive_start_key(start)
                .send()
                .await
                .expect("scan the table");
            let dump = format!("{:?}", page.items());
            for s in &secrets {
                assert!(!dump.contains(s.as_str()), "a secret in a stored item");
            }
            start = page.last_evaluated_key().cloned();
            if start.is_none() {
                break;
            }
        }
        for d in [Destination::Meta, Destination::Google] {
            // Every message: those seen stay hidden until the queue answers empty (twice, as
            // moto may return fewer than are there), then all are made visible again at once,
            // so an operator's redrive right after this finds them.
            let mut handles = Vec::new();
            let mut empty = 0;
            while empty < 2 {
                let r = self
                    .sqs
                    .receive_message()
                    .queue_url(self.dlq_url(d))
                    .max_number_of_messages(10)
                    .message_attribute_names("All")
                    .visibility_timeout(30)
                    .send()
                    .await
                    .expect("receive DLQ");
                if r.messages().is_empty() {
                    empty += 1;
                }
                let dump = format!("{:?}", r.messages());
                for s in &secrets {
                    assert!(
                        !dump.contains(s.as_str()),
                        "a secret in a {d:?} DLQ message"
                    );
                }
                handles.extend(
                    r.messages()
                        .iter()
                        .filter_map(|m| m.receipt_handle().map(str::to_string)),
                );
            }
            for h in handles {
                let _ = self
                    .sqs
                    .change_message_visibility()
                    .queue_url(self.dlq_url(d))
                    .receipt_handle(h)
                    .visibility_timeout(0)
                    .send()
                    .await;
            }
        }
    }
}

/// The emulator's request counts by operation (from infra/local/moto_server.py).
pub async fn aws_request_counts() -> BTreeMap<String, u64> {
    let url = format!("{}/_bridge/requests", crate::endpoint());
    match reqwest::get(url).await {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => BTreeMap::new(),
    }
}
