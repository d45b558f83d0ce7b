//! The ingest handler's CPU cost per event on signed 100-event batches: signature check,
//! parse, validate, normalize + hash, event_id, store write and enqueue, with in-memory store
//! and queue so no network time is counted. Prints µs per event.
//!
//! Run: `cargo bench -p ingest --bench handler`

use bridge_aws::config::Settings;
use bridge_core::queue::memory::MemoryQueue;
use bridge_core::store::memory::MemoryStore;
use bridge_core::timestamp::Timestamp;
use bridge_core::webhook::signature::bridge_sign;
use ingest::App;
use lambda_http::Body;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn batch(b: usize, at: &str) -> String {
    let items: Vec<_> = (0..100)
        .map(|i| {
            json!({"event_name": "won", "occurred_at": at, "entity_type": "opportunity",
                "entity_id": format!("D-{b}-{i}"), "order_id": format!("O-{b}-{i}"), "value": 1234.56, "currency": "USD",
                "identity": {"email": format!("buyer{i}@example.com"), "phone": "(650) 555-1234", "first_name": "Ada",
                             "last_name": "Lovelace", "country": "US", "gclid": "Cj0KCQiA-test", "fbclid": "IwAR2abc"},
                "consent": {"status": "granted", "basis": "consent"}})
        })
        .collect();
    serde_json::Value::Array(items).to_string()
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    bridge_core::identity::warm_up();
    let env: HashMap<&str, &str> = HashMap::from([
        ("TABLE_NAME", "bench"),
        ("META_QUEUE_URL", "q"),
        ("GOOGLE_QUEUE_URL", "q"),
    ]);
    let settings = Settings::from_lookup(|k| env.get(k).map(|v| v.to_string())).expect("settings");
    let app = App {
        settings,
        store: Arc::new(MemoryStore::new()),
        queue: Arc::new(MemoryQueue::new(5, Duration::from_secs(30))),
        secrets: HashMap::from([("hubspot".to_string(), "secret".to_string())]),
        hubspot: None,
        max_body_bytes: 1 << 20,
        public_base_url: None,
        hubspot_options: Default::default(),
    };
    let at = Timestamp::now().minus_secs(600).canonical();
    let batches = 60;
    let bodies: Vec<String> = (0..batches).map(|b| batch(b, &at)).collect();
    let now = Timestamp::now().unix_secs();
    let requests: Vec<_> = bodies
        .iter()
        .map(|body| {
            lambda_http::http::Request::builder()
                .method("POST")
                .uri("https://bench/webhooks/hubspot")
                .header(
                    "x-bridge-signature",
                    bridge_sign(b"secret", now, body.as_bytes()),
                )
                .body(Body::from(body.clone()))
                .expect("request")
        })
        .collect();
    let mut requests = requests.into_iter();
    // Warm-up on the first 10 batches, measure the rest (all new events, no duplicates).
    for req in requests.by_ref().take(10) {
        let r = rt.block_on(app.handle(req));
        assert_eq!(r.status(), 202);
    }
    let measured = batches - 10;
    let start = Instant::now();
    for req in requests {
        let r = rt.block_on(app.handle(req));
        assert_eq!(r.status(), 202);
    }
    let per_event = start.elapsed().as_secs_f64() * 1e6 / (measured * 100) as f64;
    println!(
        "ingest handler, signed 100-event batches, in-memory store and queue ({measured} batches):"
    );
    println!(
        "  {per_event:.2} µs per event (auth, parse, validate, hash, event_id, store write, enqueue, response)"
    );
}
