//! Helpers the integration, end-to-end, chaos and property tests share; the local stack itself
//! (stacks from the template, the runtime emulator, the fakes) is `bridge-devstack`,
//! re-exported here.

use bridge_core::consent::ConsentStatus;
use bridge_core::delivery::{DeliveryStatus, Destination, DestinationState};
use bridge_core::event::{CanonicalEvent, ValidationContext, parse_event, validate};
use bridge_core::timestamp::Timestamp;
pub use bridge_devstack::{Stack, browser, endpoint, fakes, local, repo_root, sdk_config};

/// The tests' delivery configuration: a 30 s lease, `max_attempts` attempts, and retries
/// backing off from `base` (also the floor) up to `cap`; the waits are the deploy defaults.
pub fn pipeline(
    max_attempts: u32,
    base: std::time::Duration,
    cap: std::time::Duration,
) -> bridge_core::delivery::pipeline::PipelineConfig {
    bridge_core::delivery::pipeline::PipelineConfig::new(
        30,
        max_attempts,
        bridge_core::delivery::Backoff {
            base,
            cap,
            floor: base,
        },
    )
}

/// The business time `mins` minutes ago, as a webhook carries it.
pub fn minutes_ago(mins: i64) -> String {
    Timestamp::now().minus_secs(mins * 60).canonical()
}

/// The event ids an ingest response accepted (a batch's `results`, or a single item's answer).
pub fn accepted_ids(resp: &serde_json::Value) -> Vec<String> {
    let items = match resp["results"].as_array() {
        Some(a) => a.clone(),
        None => vec![resp.clone()],
    };
    items
        .iter()
        .filter(|i| i["status"] == "accepted")
        .filter_map(|i| i["event_id"].as_str().map(str::to_string))
        .collect()
}

/// A valid event built through the real validation path, with every destination pending.
pub fn sample_event(
    entity: &str,
    event_name: &str,
    order_id: Option<&str>,
    value: Option<f64>,
    at: &str,
) -> CanonicalEvent {
    let mut v = serde_json::json!({
        "source": "hubspot", "event_name": event_name, "occurred_at": at,
        "entity_type": if order_id.is_some() { "opportunity" } else { "contact" },
        "entity_id": entity,
        "identity": {"email": format!("{entity}@example.com"), "phone": "+1 650 555 1234", "first_name": "Ada", "gclid": "Cj0-test"},
        "consent": {"status": "granted", "basis": "consent"}
    });
    if let Some(o) = order_id {
        v["order_id"] = o.into();
        v["currency"] = "USD".into();
    }
    if let Some(x) = value {
        v["value"] = x.into();
    }
    let ctx = ValidationContext {
        now: Timestamp::now(),
        max_future_skew_secs: 300,
        default_region: phonenumber_us(),
        mapping_version: "it-1".into(),
        default_consent: ConsentStatus::Unknown,
    };
    let mut e = validate(&parse_event(&v).expect("sample parses"), &ctx).expect("sample validates");
    for d in Destination::ALL {
        e.destinations.insert(
            d,
            DestinationState::new(DeliveryStatus::Pending, e.received_at),
        );
    }
    e
}

fn phonenumber_us() -> bridge_core::identity::Region {
    bridge_core::identity::parse_region("US").expect("US is a region")
}

/// What the SQS event source mapping hands a sender from the in-memory queue: up to `max`
/// visible messages of `d` as SQS records (the receipt doubles as the message id).
pub fn receive_records(
    queue: &bridge_core::queue::memory::MemoryQueue,
    d: Destination,
    max: usize,
) -> Vec<bridge_core::delivery::pipeline::Record> {
    queue
        .receive(d, max)
        .into_iter()
        .map(|m| bridge_core::delivery::pipeline::Record {
            message_id: m.receipt.clone(),
            receipt: m.receipt,
            body: m.message.to_body(),
            attributes: Default::default(),
        })
        .collect()
}

/// One sender invocation on the in-memory queue, as the event source mapping runs it: the
/// batch is processed and the messages not listed as failures are deleted. With `crash_after`
/// the invocation is dropped after that long (a sender killed between its send and its status
/// write), and every message stays for redelivery.
pub async fn invoke_sender<P: bridge_core::delivery::pipeline::Platform>(
    records: Vec<bridge_core::delivery::pipeline::Record>,
    platform: &P,
    store: &dyn bridge_core::store::EventStore,
    queue: &bridge_core::queue::memory::MemoryQueue,
    cfg: &bridge_core::delivery::pipeline::PipelineConfig,
    now: Timestamp,
    crash_after: Option<std::time::Duration>,
) {
    let d = platform.destination();
    let receipts: Vec<String> = records.iter().map(|r| r.receipt.clone()).collect();
    let run =
        bridge_core::delivery::pipeline::process_batch(records, platform, store, queue, cfg, now);
    let report = match crash_after {
        Some(after) => tokio::time::timeout(after, run).await.ok(),
        None => Some(run.await),
    };
    if let Some(report) = report {
        for r in receipts {
            if !report.failures.contains(&r) {
                queue.delete(d, &r);
            }
        }
    }
}

/// A stack of its own from the template in the emulator (with template `params`), and the
/// event store, SQS client and delivery queues over it, as the senders build them.
pub async fn emulated(
    name: &str,
    params: &[(&str, &str)],
) -> (
    Stack,
    bridge_aws::dynamodb::DynamoStore,
    aws_sdk_sqs::Client,
    bridge_aws::sqs::SqsQueue,
) {
    let stack = Stack::create(name, params);
    let aws = sdk_config().await;
    let store = bridge_aws::dynamodb::DynamoStore::new(
        bridge_aws::clients::dynamodb(&aws),
        stack.var("TABLE_NAME"),
        400,
    );
    let sqs = bridge_aws::clients::sqs(&aws);
    let vars = stack.env.clone();
    let settings = bridge_aws::config::Settings::from_lookup(|k| vars.get(k).cloned())
        .unwrap_or_else(|e| panic!("the stack's settings: {e}"));
    let queue = bridge_aws::sqs::SqsQueue::new(sqs.clone(), settings.queues.clone());
    (stack, store, sqs, queue)
}
