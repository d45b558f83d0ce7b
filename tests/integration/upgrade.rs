//! Upgrading a live stack: a table written by release 0 (`tests/fixtures/release-0`, captured
//! with that release's code: events delivered, refunds waiting, a won retrying, a caller's
//! Pixel id under the old unscoped key) is loaded into the template's table in the emulator,
//! then the current release runs over it: the same webhooks are replayed, the sweep re-enqueues
//! the open pairs, and the senders deliver against fresh strict fakes. Nothing delivered before
//! is sent again, and the waiting refunds find their won through the by-order-keys index.

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use base64::Engine;
use bridge_aws::dynamodb::DynamoStore;
use bridge_core::delivery::pipeline::PipelineConfig;
use bridge_core::delivery::{DeliveryStatus, Destination};
use bridge_core::event::parse_event_json;
use bridge_core::identity::parse_region;
use bridge_core::ingest::{IngestConfig, Intake, ItemStatus, ingest};
use bridge_core::mapping::{GoogleBackend, Mapping};
use bridge_core::queue::memory::MemoryQueue;
use bridge_core::reconcile::sweep;
use bridge_core::store::EventStore;
use bridge_core::timestamp::Timestamp;
use bridge_core::webhook::Incoming;
use bridge_platforms::google::{GoogleConfig, GoogleCredentials, GooglePlatform};
use bridge_platforms::meta::{MetaAccess, MetaConfig, MetaPlatform};
use bridge_tests::fakes::google::FakeGoogle;
use bridge_tests::fakes::meta::FakeMeta;
use bridge_tests::{Stack, invoke_sender, receive_records, sdk_config};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

/// An item in DynamoDB's JSON form as the SDK's attribute value.
fn attribute(v: &Value) -> AttributeValue {
    let (kind, inner) = v
        .as_object()
        .and_then(|o| o.iter().next())
        .expect("a typed attribute");
    match kind.as_str() {
        "S" => AttributeValue::S(inner.as_str().expect("S").to_string()),
        "N" => AttributeValue::N(inner.as_str().expect("N").to_string()),
        "B" => AttributeValue::B(Blob::new(
            base64::engine::general_purpose::STANDARD
                .decode(inner.as_str().expect("B"))
                .expect("base64"),
        )),
        "BOOL" => AttributeValue::Bool(inner.as_bool().expect("BOOL")),
        "NULL" => AttributeValue::Null(true),
        "L" => AttributeValue::L(inner.as_array().expect("L").iter().map(attribute).collect()),
        "M" => AttributeValue::M(
            inner
                .as_object()
                .expect("M")
                .iter()
                .map(|(k, v)| (k.clone(), attribute(v)))
                .collect(),
        ),
        other => panic!("attribute type {other} is not in the fixture's vocabulary"),
    }
}

/// Moves every canonical timestamp inside `s` (alone, or as the prefix of `time#...` keys) by
/// `delta_ms`, so the fixture's pairs are as due and as young as on the day it was captured.
fn shift(s: &str, delta_ms: i64) -> String {
    let mut out = String::new();
    let mut rest = s;
    while !rest.is_empty() {
        if let Some(head) = rest.get(..24)
            && head.as_bytes().get(4) == Some(&b'-')
            && head.ends_with('Z')
            && let Ok(t) = Timestamp::parse_rfc3339(head)
        {
            out.push_str(&Timestamp::from_unix_ms(t.unix_ms() + delta_ms).canonical());
            rest = &rest[24..];
            continue;
        }
        let mut chars = rest.chars();
        if let Some(c) = chars.next() {
            out.push(c);
        }
        rest = chars.as_str();
    }
    out
}

fn shift_item(v: &Value, delta_ms: i64) -> Value {
    match v {
        Value::String(s) => Value::String(shift(s, delta_ms)),
        Value::Array(a) => Value::Array(a.iter().map(|x| shift_item(x, delta_ms)).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| {
                    // Binary hashes are base64, never times.
                    if k == "B" {
                        (k.clone(), x.clone())
                    } else {
                        (k.clone(), shift_item(x, delta_ms))
                    }
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

#[tokio::test]
#[ignore = "needs the local AWS emulator: bash infra/local/test.sh starts it and runs this"]
async fn a_release_0_table_upgrades_without_a_resend_and_its_waiting_refunds_find_their_won() {
    let fixture: Value = serde_json::from_str(include_str!("../fixtures/release-0/table.json"))
        .expect("the fixture parses");
    let captured = Timestamp::parse_rfc3339(fixture["captured_at"].as_str().expect("captured_at"))
        .expect("a canonical time");
    let now = Timestamp::now();
    let delta = now.unix_ms() - captured.unix_ms();

    let stack = Stack::create("upgrade", &[]);
    let ddb = bridge_aws::clients::dynamodb(&sdk_config().await);
    let table = stack.var("TABLE_NAME");
    for item in fixture["items"].as_array().expect("items") {
        let mut shifted = shift_item(item, delta);
        // The expiry moves with the times, or a read after it would see no item at all.
        if let Some(ttl) = shifted["ttl"]["N"]
            .as_str()
            .and_then(|n| n.parse::<i64>().ok())
        {
            shifted["ttl"]["N"] = Value::String((ttl + delta / 1000).to_string());
        }
        let map: HashMap<String, AttributeValue> = shifted
            .as_object()
            .expect("an item")
            .iter()
            .map(|(k, v)| (k.clone(), attribute(v)))
            .collect();
        ddb.put_item()
            .table_name(&table)
            .set_item(Some(map))
            .send()
            .await
            .expect("load a release-0 item");
    }
    let store = DynamoStore::new(ddb, table, 400);
    let queue = MemoryQueue::new(100, Duration::from_secs(30));
    let mut mapping = Mapping::bundled().expect("the bundled mapping");
    if let Some(g) = mapping.google.as_mut() {
        g.backend = GoogleBackend::AdsApi;
    }
    let cfg = IngestConfig {
        default_region: parse_region("US").expect("US"),
        max_future_skew_secs: 300,
    };

    // The CRM retries every webhook after the upgrade: each is a duplicate of what release 0
    // stored (the Pixel id too, though it is now stored under its source), and none enqueues.
    for w in fixture["webhooks"].as_array().expect("webhooks") {
        let source = w["source"].as_str().expect("source");
        let input = parse_event_json(&w["event"].to_string()).expect("a release-0 webhook");
        let to = Intake::new(&mapping, &cfg, &store, &queue);
        let r = ingest(vec![Incoming::Event(Box::new(input))], source, to, now).await;
        assert_eq!(r.results.len(), 1);
        assert_eq!(
            r.results[0].status,
            ItemStatus::Duplicate,
            "{source} {}: {:?}",
            w["event"]["entity_id"],
            r.results[0]
        );
    }
    assert_eq!(
        queue.depth(Destination::Meta),
        0,
        "a replay enqueues nothing"
    );
    assert_eq!(
        queue.depth(Destination::Google),
        0,
        "a replay enqueues nothing"
    );

    // The sweep finds the open pairs (their SQS messages are the old stack's) and the senders
    // run over them against fresh fakes: whatever reaches a fake was sent after the upgrade.
    let fake_meta = FakeMeta::start("upgrade-token").await;
    let fake_google = FakeGoogle::start().await;
    let meta = MetaPlatform::new(
        bridge_platforms::http::client().expect("HTTP client"),
        MetaConfig {
            base_url: fake_meta.base_url.clone(),
            api_version: "v26.0".into(),
            pixel_id: "1234567890".into(),
            test_event_code: None,
            timeout: Duration::from_secs(10),
        },
        mapping.clone(),
        MetaAccess::new("upgrade-token".into(), None),
    );
    let google = GooglePlatform::new(
        bridge_platforms::http::client().expect("HTTP client"),
        GoogleConfig {
            ads_base_url: fake_google.base_url.clone(),
            ads_api_version: "v26".into(),
            datamanager_base_url: fake_google.base_url.clone(),
            token_url: fake_google.token_url(),
            credentials: GoogleCredentials::from_json(&fake_google.credentials_json())
                .expect("credentials")
                .into(),
            validate_only: false,
            timeout: Duration::from_secs(10),
            terms_ttl: Duration::from_secs(3600),
        },
        mapping.clone(),
    );
    let pcfg = PipelineConfig {
        refund_wait: Duration::from_secs(10),
        wait_deadline: Duration::from_secs(6 * 3600),
        ..bridge_tests::pipeline(8, Duration::from_secs(1), Duration::from_secs(5))
    };
    let mut t = now.plus_secs(3600);
    for _ in 0..60 {
        queue.set_now(t);
        for d in [Destination::Meta, Destination::Google] {
            sweep(&store, &queue, d, t, 100).await.expect("sweep");
            let records = receive_records(&queue, d, 100);
            if records.is_empty() {
                continue;
            }
            match d {
                Destination::Meta => {
                    invoke_sender(records, &meta, &store, &queue, &pcfg, t, None).await
                }
                Destination::Google => {
                    invoke_sender(records, &google, &store, &queue, &pcfg, t, None).await
                }
            }
        }
        t = t.plus_secs(60);
    }

    // Every pair ended delivered.
    let ids: Vec<String> = fixture["event_ids"]
        .as_array()
        .expect("event_ids")
        .iter()
        .map(|v| v.as_str().expect("an id").to_string())
        .collect();
    for id in &ids {
        let e = store
            .get(id)
            .await
            .expect("read")
            .unwrap_or_else(|| panic!("{id} is still in the table"));
        for (d, s) in &e.destinations {
            assert_eq!(
                s.status,
                DeliveryStatus::Delivered,
                "{id} {d}: {:?}",
                s.last_error
            );
        }
    }

    // Meta received only the two refunds that were waiting: no won, lead or SQL again.
    let refunds: BTreeSet<&str> = [
        "7bb9932b63f1db0025f8a0aa0c50f91e6a48df7e5a2e4e27f8f8f9bac0f77699",
        "df1595bb82485bae79269a563a63a9d8081dd6ba0094272b1b2c2894c673a082",
    ]
    .into_iter()
    .collect();
    let meta_ids: BTreeSet<String> = fake_meta
        .received()
        .iter()
        .map(|r| r.event["event_id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        meta_ids,
        refunds
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>(),
        "Meta after the upgrade"
    );
    // Google received O-UP-2's won (it was retrying) and then its refund as a restatement;
    // O-UP-1 and the SQL were delivered by release 0 and are not uploaded again.
    let google: BTreeMap<String, _> = fake_google.conversions();
    assert_eq!(
        google.keys().cloned().collect::<Vec<_>>(),
        ["O-UP-2".to_string()]
    );
    let c = &google["O-UP-2"];
    assert!(!c.retracted);
    assert!(
        (c.value - 200.0).abs() < 1e-9,
        "250 won, 50 refunded: {}",
        c.value
    );
}
