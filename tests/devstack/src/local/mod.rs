//! The bridge on one machine: what AWS provides around the functions, reproduced faithfully
//! from `infra/template.yaml` (through the plan `infra/local/deploy.py --plan` writes): the
//! Lambda runtime, SQS event source mappings, the reconcile schedule, the function URL, and
//! the console's DLQ redrive.

pub mod bridge;
pub mod harness;
pub mod runtime;

use aws_sdk_sqs::Client as Sqs;
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use runtime::{Function, InvokeError};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Deserialize)]
pub struct PlanFunction {
    pub binary: String,
    pub env: BTreeMap<String, String>,
    pub timeout: u64,
    pub memory: u32,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PlanSqs {
    pub function: String,
    pub queue: String,
    pub queue_url: String,
    pub queue_arn: String,
    pub batch_size: usize,
    pub window_secs: u64,
    pub report_batch_item_failures: bool,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PlanSchedule {
    pub function: String,
    pub expression: String,
    /// The target's fixed `Input`, sent instead of the scheduled event when set.
    #[serde(default)]
    pub input: Option<Value>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PlanUrl {
    pub function: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PlanQueue {
    pub url: String,
    pub arn: String,
    pub dlq: Option<String>,
    pub dlq_url: Option<String>,
    pub max_receive_count: Option<u32>,
}

/// What `deploy.py --plan` resolved from the template.
#[derive(Clone, Debug, Deserialize)]
pub struct Plan {
    pub stack: String,
    pub functions: BTreeMap<String, PlanFunction>,
    pub sqs: Vec<PlanSqs>,
    pub schedules: Vec<PlanSchedule>,
    pub urls: Vec<PlanUrl>,
    pub queues: BTreeMap<String, PlanQueue>,
}

impl Plan {
    pub fn load(path: &std::path::Path) -> Result<Plan, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Counters the progress line shows, fed by the function URL and the senders' EMF lines.
#[derive(Default)]
pub struct Stats {
    pub received: AtomicU64,
    pub invalid: AtomicU64,
    pub invocations: AtomicU64,
    pub failed_invocations: AtomicU64,
    /// destination -> metric -> sum, from EMF lines.
    pub metrics: Mutex<BTreeMap<String, BTreeMap<String, f64>>>,
}

impl Stats {
    /// Folds a CloudWatch EMF line (if `line` is one) into the counters.
    pub fn observe(&self, line: &str) {
        if !line.starts_with('{') || !line.contains("\"_aws\"") {
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            return;
        };
        let dest = v["destination"].as_str().unwrap_or("all").to_string();
        let names: Vec<String> = v["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["Name"].as_str().map(str::to_string))
            .collect();
        if let Ok(mut m) = self.metrics.lock() {
            let d = m.entry(dest).or_default();
            for n in names {
                if let Some(x) = v[&n].as_f64() {
                    *d.entry(n).or_insert(0.0) += x;
                }
            }
        }
    }

    pub fn metric(&self, dest: &str, name: &str) -> f64 {
        self.metrics
            .lock()
            .ok()
            .and_then(|m| m.get(dest).and_then(|d| d.get(name)).copied())
            .unwrap_or(0.0)
    }

    pub fn line(&self) -> String {
        let mut out = format!(
            "received {} (invalid {})",
            self.received.load(Ordering::Relaxed),
            self.invalid.load(Ordering::Relaxed)
        );
        for d in ["meta", "google"] {
            out.push_str(&format!(
                " | {d}: delivered {} retrying {} dead-lettered {} rejected {}",
                self.metric(d, "delivered"),
                self.metric(d, "retry"),
                self.metric(d, "dead_letter"),
                self.metric(d, "rejected")
            ));
        }
        out
    }
}

fn attribute(m: &aws_sdk_sqs::types::Message, k: MessageSystemAttributeName) -> Value {
    m.attributes()
        .and_then(|a| a.get(&k))
        .map_or(Value::Null, |v| json!(v))
}

/// An SQS event exactly as Lambda's event source mapping delivers it.
pub fn sqs_event(messages: &[aws_sdk_sqs::types::Message], queue_arn: &str) -> Value {
    let records: Vec<Value> = messages
        .iter()
        .map(|m| {
            let mut attrs = serde_json::Map::new();
            for (k, name) in [
                (MessageSystemAttributeName::ApproximateReceiveCount, "ApproximateReceiveCount"),
                (MessageSystemAttributeName::SentTimestamp, "SentTimestamp"),
                (MessageSystemAttributeName::SenderId, "SenderId"),
                (
                    MessageSystemAttributeName::ApproximateFirstReceiveTimestamp,
                    "ApproximateFirstReceiveTimestamp",
                ),
            ] {
                let v = attribute(m, k);
                attrs.insert(name.into(), if v.is_null() { json!("0") } else { v });
            }
            let mut mattrs = serde_json::Map::new();
            for (k, v) in m.message_attributes().into_iter().flatten() {
                mattrs.insert(
                    k.clone(),
                    json!({"stringValue": v.string_value(), "stringListValues": [], "binaryListValues": [], "dataType": v.data_type()}),
                );
            }
            json!({
                "messageId": m.message_id(),
                "receiptHandle": m.receipt_handle(),
                "body": m.body(),
                "attributes": attrs,
                "messageAttributes": mattrs,
                "md5OfBody": m.md5_of_body(),
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": "us-east-1",
            })
        })
        .collect();
    json!({ "Records": records })
}

/// The message ids a sender's response keeps on the queue. `None` means the whole batch
/// failed (an invalid response, as Lambda treats it).
pub fn failed_ids(response: &Value, batch: &[String]) -> Option<Vec<String>> {
    let Some(list) = response.get("batchItemFailures") else {
        return Some(Vec::new());
    };
    let mut out = Vec::new();
    for f in list.as_array()? {
        let id = f["itemIdentifier"].as_str()?;
        if id.is_empty() || !batch.iter().any(|b| b == id) {
            return None;
        }
        out.push(id.to_string());
    }
    Some(out)
}

/// Lambda's SQS poller for one mapping: long-poll, gather up to BatchSize within the batching
/// window, invoke, delete what succeeded; the rest reappear after their visibility timeout (so
/// the queue's RedrivePolicy applies, as in AWS).
pub async fn run_mapping(
    sqs: Sqs,
    m: PlanSqs,
    f: Function,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let mut batch: Vec<aws_sdk_sqs::types::Message> = Vec::new();
        let mut first: Option<Instant> = None;
        loop {
            let window = Duration::from_secs(m.window_secs);
            let wait = match first {
                None => 1,
                Some(t) => {
                    let left = window.saturating_sub(t.elapsed());
                    if left.is_zero() {
                        break;
                    }
                    left.as_secs().clamp(0, 20) as i32
                }
            };
            let want = (m.batch_size - batch.len()).min(10) as i32;
            let got = sqs
                .receive_message()
                .queue_url(&m.queue_url)
                .max_number_of_messages(want)
                .wait_time_seconds(wait)
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .message_attribute_names("All")
                .send()
                .await;
            let msgs = match got {
                Ok(r) => r.messages.unwrap_or_default(),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    Vec::new()
                }
            };
            if !msgs.is_empty() && first.is_none() {
                first = Some(Instant::now());
            }
            let empty = msgs.is_empty();
            batch.extend(msgs);
            if batch.len() >= m.batch_size || stop.load(Ordering::Relaxed) {
                break;
            }
            if batch.is_empty() {
                continue;
            }
            // Without a window Lambda invokes with what one poll returned.
            if m.window_secs == 0 || (empty && first.is_some_and(|t| t.elapsed() >= window)) {
                break;
            }
        }
        if batch.is_empty() {
            continue;
        }
        let ids: Vec<String> = batch
            .iter()
            .filter_map(|x| x.message_id().map(str::to_string))
            .collect();
        stats.invocations.fetch_add(1, Ordering::Relaxed);
        let result = f.invoke(sqs_event(&batch, &m.queue_arn)).await;
        let keep: Vec<String> = match &result {
            Ok(resp) if m.report_batch_item_failures => {
                failed_ids(resp, &ids).unwrap_or_else(|| ids.clone())
            }
            Ok(_) => Vec::new(),
            Err(_) => {
                stats.failed_invocations.fetch_add(1, Ordering::Relaxed);
                ids.clone()
            }
        };
        let done: Vec<&aws_sdk_sqs::types::Message> = batch
            .iter()
            .filter(|x| {
                x.message_id()
                    .is_some_and(|id| !keep.iter().any(|k| k == id))
            })
            .collect();
        for chunk in done.chunks(10) {
            let mut req = sqs.delete_message_batch().queue_url(&m.queue_url);
            for (i, x) in chunk.iter().enumerate() {
                if let Ok(e) = aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(x.receipt_handle().unwrap_or_default())
                    .build()
                {
                    req = req.entries(e);
                }
            }
            let _ = req.send().await;
        }
    }
}

/// `rate(5 minutes)` as a period.
pub fn parse_rate(expr: &str) -> Option<Duration> {
    let inner = expr.trim().strip_prefix("rate(")?.strip_suffix(')')?;
    let (n, unit) = inner.trim().split_once(' ')?;
    let n: u64 = n.parse().ok()?;
    let secs = match unit.trim() {
        "minute" | "minutes" => 60,
        "hour" | "hours" => 3600,
        "day" | "days" => 86_400,
        _ => return None,
    };
    Some(Duration::from_secs(n * secs))
}

/// The EventBridge scheduled event the reconcile function receives.
pub fn scheduled_event(rule: &str) -> Value {
    json!({
        "version": "0",
        "id": format!("local-{}", bridge_core::timestamp::Timestamp::now().unix_ms()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": bridge_core::timestamp::Timestamp::now().canonical().replace(".000Z", "Z"),
        "region": "us-east-1",
        "resources": [format!("arn:aws:events:us-east-1:123456789012:rule/{rule}")],
        "detail": {}
    })
}

/// Fires `f` every `period` (first after one period), as the template's schedule does, with
/// the target's fixed input when it has one (EventBridge then sends it instead of the event).
pub async fn run_schedule(
    f: Function,
    rule: String,
    period: Duration,
    input: Option<Value>,
    stop: Arc<AtomicBool>,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let payload = input.clone().unwrap_or_else(|| scheduled_event(&rule));
        let _ = f.invoke(payload).await;
    }
}

/// What the console's "Start DLQ redrive" does (SQS StartMessageMoveTask, which moto lacks):
/// every message in `dlq_url` is moved back to `source_url` with its body and attributes.
pub async fn redrive(sqs: &Sqs, dlq_url: &str, source_url: &str) -> Result<usize, String> {
    let mut moved = 0;
    let mut empty_polls = 0;
    while empty_polls < 2 {
        let r = sqs
            .receive_message()
            .queue_url(dlq_url)
            .max_number_of_messages(10)
            .visibility_timeout(60)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| format!("receive from {dlq_url}: {e}"))?;
        let msgs = r.messages.unwrap_or_default();
        if msgs.is_empty() {
            empty_polls += 1;
            continue;
        }
        let mut send = sqs.send_message_batch().queue_url(source_url);
        for (i, m) in msgs.iter().enumerate() {
            let mut e = aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(m.body().unwrap_or_default());
            for (k, v) in m.message_attributes().into_iter().flatten() {
                e = e.message_attributes(k, v.clone());
            }
            send = send.entries(e.build().map_err(|e| e.to_string())?);
        }
        let out = send
            .send()
            .await
            .map_err(|e| format!("send to {source_url}: {e}"))?;
        let ok: Vec<usize> = out
            .successful()
            .iter()
            .filter_map(|s| s.id().parse().ok())
            .collect();
        let mut del = sqs.delete_message_batch().queue_url(dlq_url);
        for &i in &ok {
            del = del.entries(
                aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(msgs[i].receipt_handle().unwrap_or_default())
                    .build()
                    .map_err(|e| e.to_string())?,
            );
        }
        if !ok.is_empty() {
            del.send()
                .await
                .map_err(|e| format!("delete from {dlq_url}: {e}"))?;
        }
        moved += ok.len();
    }
    Ok(moved)
}

/// Approximate visible + in-flight messages of a queue.
pub async fn depth(sqs: &Sqs, url: &str) -> u64 {
    let r = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await;
    let Ok(r) = r else { return 0 };
    let a = r.attributes().cloned().unwrap_or_default();
    let get = |k: QueueAttributeName| a.get(&k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(QueueAttributeName::ApproximateNumberOfMessages)
        + get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
}

/// The event a function URL hands its function (payload format 2.0).
pub fn url_event(
    method: &str,
    path: &str,
    query: &str,
    headers: serde_json::Map<String, Value>,
    user_agent: &str,
    body: Value,
    is_base64: bool,
) -> Value {
    let now = bridge_core::timestamp::Timestamp::now();
    json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": headers,
        "requestContext": {
            "accountId": "anonymous", "apiId": "local", "domainName": "127.0.0.1", "domainPrefix": "local",
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1",
                     "userAgent": user_agent},
            "requestId": format!("local-{}", now.unix_ms()), "routeKey": "$default", "stage": "$default",
            "time": "01/Jan/2026:00:00:00 +0000", "timeEpoch": now.unix_ms()
        },
        "body": body,
        "isBase64Encoded": is_base64,
    })
}

/// A Lambda function URL in front of `f`: HTTP requests in, payload format 2.0 events to the
/// function, its response back as HTTP.
pub async fn serve_url(addr: &str, f: Function, stats: Arc<Stats>) -> std::io::Result<String> {
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, Method, StatusCode, Uri};
    use axum::response::{IntoResponse, Response};

    #[derive(Clone)]
    struct S {
        f: Function,
        stats: Arc<Stats>,
    }

    async fn handle(
        State(s): State<S>,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let mut h = serde_json::Map::new();
        for (k, v) in &headers {
            if let Ok(v) = v.to_str() {
                h.insert(k.as_str().to_string(), json!(v));
            }
        }
        let text = String::from_utf8(body.to_vec());
        let (body, b64) = match &text {
            Ok(t) => (json!(t), false),
            Err(_) => {
                use base64::Engine;
                (
                    json!(base64::engine::general_purpose::STANDARD.encode(&body)),
                    true,
                )
            }
        };
        let ua = headers
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let event = url_event(
            method.as_str(),
            uri.path(),
            uri.query().unwrap_or(""),
            h,
            ua,
            body,
            b64,
        );
        match s.f.invoke(event).await {
            Ok(r) => {
                let status = r["statusCode"].as_u64().unwrap_or(200) as u16;
                let mut body = r["body"].as_str().unwrap_or("").to_string();
                if r["isBase64Encoded"].as_bool() == Some(true) {
                    use base64::Engine;
                    body = base64::engine::general_purpose::STANDARD
                        .decode(body.as_bytes())
                        .ok()
                        .and_then(|b| String::from_utf8(b).ok())
                        .unwrap_or_default();
                }
                if let Ok(v) = serde_json::from_str::<Value>(&body) {
                    // A batch answers `{"results": [...]}`, a single event the item itself.
                    let items = match v["results"].as_array() {
                        Some(a) => a.clone(),
                        None => vec![v.clone()],
                    };
                    for item in &items {
                        match item["status"].as_str() {
                            Some("accepted") => s.stats.received.fetch_add(1, Ordering::Relaxed),
                            Some("invalid") => s.stats.invalid.fetch_add(1, Ordering::Relaxed),
                            _ => 0,
                        };
                    }
                }
                let mut resp =
                    (StatusCode::from_u16(status).unwrap_or(StatusCode::OK), body).into_response();
                for (k, v) in r["headers"].as_object().into_iter().flatten() {
                    if let (Ok(k), Some(Ok(v))) = (
                        axum::http::HeaderName::from_bytes(k.as_bytes()),
                        v.as_str().map(axum::http::HeaderValue::from_str),
                    ) {
                        resp.headers_mut().insert(k, v);
                    }
                }
                resp
            }
            // Lambda answers a function URL whose function failed with 502.
            Err(
                e @ (InvokeError::Crashed
                | InvokeError::Function(_)
                | InvokeError::Timeout
                | InvokeError::Stopped),
            ) => (
                StatusCode::BAD_GATEWAY,
                axum::Json(json!({"Message": e.to_string()})),
            )
                .into_response(),
        }
    }

    let app = axum::Router::new()
        .fallback(handle)
        .with_state(S { f, stats });
    Ok(crate::fakes::serve_on(addr, app).await)
}

/// Every function of the plan started, with its mappings, schedules and URL.
pub struct Running {
    pub functions: HashMap<String, Function>,
    pub url: Option<String>,
    pub stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
}

pub struct Options {
    /// Directory holding the functions' binaries (e.g. target/debug).
    pub bin_dir: std::path::PathBuf,
    /// Where the function URL listens (`127.0.0.1:9000`).
    pub url_addr: String,
    /// Instances per function (Lambda's concurrency, kept small locally).
    pub instances: usize,
    /// Extra environment for every function (the AWS endpoint and credentials).
    pub env: BTreeMap<String, String>,
    /// Run schedules at the template's rate; tests invoke the function themselves instead.
    pub schedules: bool,
    pub sink: runtime::LineSink,
}

impl Running {
    pub async fn start(plan: &Plan, sqs: Sqs, opts: Options) -> Result<Running, String> {
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut functions = HashMap::new();
        for (name, f) in &plan.functions {
            let binary = opts.bin_dir.join(&f.binary);
            if !binary.exists() {
                return Err(format!(
                    "{} is not built (bash infra/local/build.sh)",
                    binary.display()
                ));
            }
            let mut env = f.env.clone();
            env.extend(opts.env.clone());
            let (st, sink) = (stats.clone(), opts.sink.clone());
            let spec = runtime::FunctionSpec {
                name: name.clone(),
                binary,
                env,
                timeout: Duration::from_secs(f.timeout),
                memory_mb: f.memory,
                instances: opts.instances,
            };
            let line_sink: runtime::LineSink = Arc::new(move |n: &str, l: &str| {
                st.observe(l);
                sink(n, l);
            });
            let func = Function::start(spec, line_sink)
                .await
                .map_err(|e| e.to_string())?;
            functions.insert(name.clone(), func);
        }
        for m in &plan.sqs {
            let f = functions
                .get(&m.function)
                .ok_or(format!("no function {}", m.function))?
                .clone();
            for _ in 0..opts.instances.max(1) {
                tokio::spawn(run_mapping(
                    sqs.clone(),
                    m.clone(),
                    f.clone(),
                    stats.clone(),
                    stop.clone(),
                ));
            }
        }
        if opts.schedules {
            for s in &plan.schedules {
                let f = functions
                    .get(&s.function)
                    .ok_or(format!("no function {}", s.function))?
                    .clone();
                let period = parse_rate(&s.expression)
                    .ok_or(format!("unsupported schedule {}", s.expression))?;
                tokio::spawn(run_schedule(
                    f,
                    format!("{}-schedule", s.function),
                    period,
                    s.input.clone(),
                    stop.clone(),
                ));
            }
        }
        let mut url = None;
        if let Some(u) = plan.urls.first() {
            let f = functions
                .get(&u.function)
                .ok_or(format!("no function {}", u.function))?
                .clone();
            url = Some(
                serve_url(&opts.url_addr, f, stats.clone())
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        Ok(Running {
            functions,
            url,
            stats,
            stop,
        })
    }

    pub fn function(&self, name: &str) -> &Function {
        &self.functions[name]
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for f in self.functions.values() {
            f.stop();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_item_failures_follow_lambda_rules() {
        let batch = vec!["a".to_string(), "b".to_string()];
        assert_eq!(failed_ids(&json!({}), &batch), Some(vec![]));
        assert_eq!(
            failed_ids(&json!({"batchItemFailures": []}), &batch),
            Some(vec![])
        );
        assert_eq!(
            failed_ids(
                &json!({"batchItemFailures": [{"itemIdentifier": "b"}]}),
                &batch
            ),
            Some(vec!["b".to_string()])
        );
        assert_eq!(
            failed_ids(
                &json!({"batchItemFailures": [{"itemIdentifier": ""}]}),
                &batch
            ),
            None,
            "invalid: all failed"
        );
        assert_eq!(
            failed_ids(
                &json!({"batchItemFailures": [{"itemIdentifier": "zz"}]}),
                &batch
            ),
            None
        );
    }

    #[test]
    fn schedule_rates() {
        assert_eq!(
            parse_rate("rate(15 minutes)"),
            Some(Duration::from_secs(900))
        );
        assert_eq!(parse_rate("rate(1 hour)"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_rate("cron(0 * * * ? *)"), None);
    }

    #[test]
    fn emf_lines_feed_the_progress_counters() {
        let s = Stats::default();
        s.observe(&bridge_core::metrics::emf_line(
            1,
            &[("destination", "meta")],
            &[("delivered", 3.0), ("retry", 1.0)],
        ));
        s.observe(&bridge_core::metrics::emf_line(
            2,
            &[("destination", "meta")],
            &[("delivered", 2.0)],
        ));
        s.observe("{\"level\":\"INFO\"}");
        assert_eq!(s.metric("meta", "delivered"), 5.0);
        assert!(
            s.line().contains("meta: delivered 5 retrying 1"),
            "{}",
            s.line()
        );
    }
}
