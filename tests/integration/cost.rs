//! What a lifecycle event costs to run, measured on the release path: a CRM funnel (lead, MQL,
//! SQL, closed-won, some refunds) through ingest and both senders' binaries, with the
//! DynamoDB write units billed by DynamoDB's documented rules (infra/local/moto_server.py) and
//! the SQS requests and Lambda invocations counted; printed per lifecycle event and per
//! delivered conversion, with the cost per million lifecycle events at list prices, and held
//! to a budget so a change that grows the bill fails here.

use bridge_core::delivery::DeliveryStatus;
use bridge_core::timestamp::Timestamp;
use bridge_tests::local::harness::{LocalBridge, aws_request_counts};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

/// Deals in the funnel; every fourth is refunded in part.
const DEALS: usize = 24;

/// Write units per lifecycle event (table and indexes) the store may cost at most.
const WRITE_UNIT_BUDGET: f64 = 12.0;

/// AWS list prices, us-east-1, on-demand, arm64 (checked 2026-11): DynamoDB $0.625 per
/// million write request units and $0.125 per million read request units; SQS $0.40 per
/// million requests; Lambda $0.20 per million requests and $0.0000133334 per GB-second.
const USD_PER_WRITE_UNIT: f64 = 0.625e-6;
const USD_PER_SQS_REQUEST: f64 = 0.40e-6;
const USD_PER_LAMBDA_REQUEST: f64 = 0.20e-6;

fn ago(mins: i64) -> String {
    Timestamp::now().minus_secs(mins * 60).canonical()
}

fn accepted(r: &Value) -> Vec<String> {
    let items = match r["results"].as_array() {
        Some(a) => a.clone(),
        None => vec![r.clone()],
    };
    items
        .iter()
        .filter(|i| i["status"] == "accepted")
        .filter_map(|i| i["event_id"].as_str().map(str::to_string))
        .collect()
}

/// A full CRM profile: every identifier both platforms match on, and both click ids.
fn identity(i: usize) -> Value {
    json!({"email": format!("buyer{i}@example.com"), "phone": format!("+1 650 555 {:04}", 1000 + i),
        "first_name": "Ada", "last_name": "Lovelace", "city": "Menlo Park", "state": "CA", "zip": "94025", "country": "US",
        "external_id": format!("crm-{i}"), "fbc": format!("fb.1.1700000000000.click{i}"), "gclid": format!("Cj0-cost-{i}")})
}

async fn write_units(table: &str) -> Value {
    let url = format!("{}/_bridge/write-units", bridge_tests::endpoint());
    let all: Value = reqwest::get(url)
        .await
        .expect("the emulator's meter answers")
        .json()
        .await
        .expect("meter JSON");
    all[table].clone()
}

#[tokio::test]
async fn write_units_and_requests_per_lifecycle_event() {
    let legacy = std::env::var("COST_LEGACY").is_ok();
    let b = LocalBridge::start(
        "cost",
        if legacy {
            &[("KeepLegacyOrderIndex", "true")]
        } else {
            &[]
        },
        1,
    )
    .await;
    let table = b.stack.var("TABLE_NAME");
    let requests_before = aws_request_counts().await;
    let mut ids = Vec::new();
    let mut posts = 0u64;
    for i in 0..DEALS {
        let identity = identity(i);
        for (n, stage) in ["lead", "mql", "sql"].iter().enumerate() {
            let e = json!({"event_name": stage, "occurred_at": ago(60 - n as i64 * 10), "entity_type": "contact",
                "entity_id": format!("C-{i}"), "identity": identity, "consent": {"status": "granted"}});
            let (status, r) = b.post("hubspot", &e).await;
            posts += 1;
            assert_eq!(status, 202, "{r}");
            ids.extend(accepted(&r));
        }
        let won = json!({"event_name": "won", "occurred_at": ago(25), "entity_type": "opportunity", "entity_id": format!("D-{i}"),
            "order_id": format!("O-{i}"), "value": 1000.0 + i as f64, "currency": "USD", "identity": identity, "consent": {"status": "granted"}});
        let (status, r) = b.post("hubspot", &won).await;
        posts += 1;
        assert_eq!(status, 202, "{r}");
        ids.extend(accepted(&r));
    }
    // Refunds come days after the sale in real life: after the wons are delivered, so no
    // refund waits for its won (a wait costs a claim and a result of its own, and would make
    // the figures depend on timing).
    b.settle(&ids, Duration::from_secs(300)).await;
    for i in (0..DEALS).step_by(4) {
        let identity = identity(i);
        let refund = json!({"event_name": "refund", "occurred_at": ago(5), "entity_type": "order", "entity_id": format!("R-{i}"),
            "order_id": format!("O-{i}"), "value": 100.0, "currency": "USD", "identity": identity, "consent": {"status": "granted"}});
        let (status, r) = b.post("hubspot", &refund).await;
        posts += 1;
        assert_eq!(status, 202, "{r}");
        ids.extend(accepted(&r));
    }
    let events = b.settle(&ids, Duration::from_secs(300)).await;
    let lifecycle = events.len() as f64;
    assert_eq!(events.len(), DEALS * 4 + DEALS.div_ceil(4));
    let delivered = events
        .values()
        .flat_map(|e| e.destinations.values())
        .filter(|s| s.status == DeliveryStatus::Delivered)
        .count() as f64;
    let pairs = events.values().map(|e| e.destinations.len()).sum::<usize>() as f64;

    let units = write_units(&table).await;
    let table_units = units["table"].as_f64().unwrap_or(0.0);
    let indexes: BTreeMap<String, f64> = units["indexes"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(0.0)))
        .collect();
    let index_units: f64 = indexes.values().sum();
    let total = table_units + index_units;
    let after = aws_request_counts().await;
    let delta = |op: &str| {
        after.get(op).copied().unwrap_or(0) as f64
            - requests_before.get(op).copied().unwrap_or(0) as f64
    };
    let sqs: f64 = after
        .keys()
        .filter(|k| {
            k.starts_with("AmazonSQS.")
                || matches!(
                    k.as_str(),
                    "SendMessage"
                        | "SendMessageBatch"
                        | "ReceiveMessage"
                        | "DeleteMessage"
                        | "DeleteMessageBatch"
                        | "ChangeMessageVisibility"
                        | "ChangeMessageVisibilityBatch"
                )
        })
        .map(|k| delta(k))
        .sum();
    // Ingest runs once per webhook; the senders once per batch the SQS mappings hand them.
    let invocations = posts
        + b.running
            .stats
            .invocations
            .load(std::sync::atomic::Ordering::Relaxed);
    let per_event = total / lifecycle;
    let usd_per_million = 1e6
        * (total * USD_PER_WRITE_UNIT
            + sqs * USD_PER_SQS_REQUEST
            + invocations as f64 * USD_PER_LAMBDA_REQUEST)
        / lifecycle;
    println!(
        "cost: {lifecycle} lifecycle events, {pairs} (event, destination) pairs, {delivered} delivered; \
         DynamoDB write units {total} = {per_event:.2} per lifecycle event ({:.2} per delivered conversion): \
         table {table_units} in {} writes ({} failed conditions, largest item {} bytes), indexes {indexes:?}; \
         SQS requests {sqs} ({:.2} per event); Lambda invocations {invocations} ({:.2} per event); \
         writes + requests at list prices: ${usd_per_million:.2} per million lifecycle events; \
         budget {WRITE_UNIT_BUDGET} write units per event ({:.2}x used)",
        total / delivered.max(1.0),
        units["writes"],
        units["failed_conditions"],
        units["max_item_bytes"],
        sqs / lifecycle,
        invocations as f64 / lifecycle,
        per_event / WRITE_UNIT_BUDGET,
    );
    assert!(
        per_event <= WRITE_UNIT_BUDGET,
        "{per_event:.2} write units per lifecycle event, over the budget of {WRITE_UNIT_BUDGET}"
    );
    b.running.stop();
}
