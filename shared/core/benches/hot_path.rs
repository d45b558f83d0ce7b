//! Benchmark of the ingest hot path per event: parse, validate, normalize + hash identity,
//! derive the event_id, serialize. Prints microseconds per event (target: 10 µs).
//!
//! Run: `cargo bench -p bridge-core --bench hot_path`

use bridge_core::consent::ConsentStatus;
use bridge_core::event::{CanonicalEvent, ValidationContext, parse_event_json, validate};
use bridge_core::identity::{self, IdentityContext};
use bridge_core::timestamp::Timestamp;
use serde_json::json;
use std::hint::black_box;
use std::time::Instant;

fn body(i: usize) -> String {
    serde_json::to_string(&json!({
        "source": "hubspot", "event_name": "won", "occurred_at": "2026-11-27T10:00:00.250-05:00",
        "entity_type": "opportunity", "entity_id": format!("D-{i}"), "order_id": format!("ORD-{i}"),
        "value": 1234.56, "currency": "usd",
        "identity": {
            "email": " First.Last+promo@GMAIL.com ", "phone": "(650) 555-1234",
            "first_name": "Ada", "last_name": "Lovelace", "city": "San Francisco", "state": "CA",
            "zip": "94105-1234", "country": "US", "external_id": format!("crm-{i}"),
            "client_ip_address": "203.0.113.7", "client_user_agent": "Mozilla/5.0 (X11; Linux x86_64)",
            "gclid": "Cj0KCQiA-test-gclid_123", "fbp": "fb.1.1700000000000.123456789", "fbclid": "IwAR2abc"
        },
        "consent": {"status": "granted", "basis": "consent", "captured_at": "2026-11-01T00:00:00Z",
                    "ad_user_data": "granted", "ad_personalization": "denied"}
    }))
    .unwrap_or_default()
}

fn per_event<F: FnMut(usize)>(n: usize, mut f: F) -> f64 {
    let start = Instant::now();
    for i in 0..n {
        f(i);
    }
    start.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn main() {
    identity::warm_up();
    let ctx = ValidationContext {
        now: Timestamp::now(),
        max_future_skew_secs: 300,
        default_region: identity::parse_region("US").unwrap_or(phonenumber::country::Id::US),
        mapping_version: "bench".into(),
        default_consent: ConsentStatus::Unknown,
    };
    let bodies: Vec<String> = (0..1000).map(body).collect();
    let n = 50_000;

    // Warm caches and the allocator.
    per_event(5_000, |i| {
        black_box(
            parse_event_json(&bodies[i % 1000])
                .ok()
                .and_then(|x| validate(&x, &ctx).ok()),
        );
    });

    let full = per_event(n, |i| {
        let input = parse_event_json(&bodies[i % 1000]).ok();
        let event: Option<CanonicalEvent> = input.and_then(|x| validate(&x, &ctx).ok());
        black_box(serde_json::to_vec(&event).unwrap_or_default());
    });

    let input = parse_event_json(&bodies[0]).unwrap_or_default();
    let parse = per_event(n, |i| {
        black_box(parse_event_json(&bodies[i % 1000]).ok());
    });
    let id_ctx = IdentityContext {
        default_region: ctx.default_region,
        occurred_at_ms: 1_764_255_600_250,
    };
    let ident = per_event(n, |_| {
        black_box(identity::normalize(&input.identity, &id_ctx));
    });
    let phone_only = per_event(n, |_| {
        black_box(identity::normalize_phone_e164(
            "(650) 555-1234",
            ctx.default_region,
        ));
    });
    let event = validate(&input, &ctx).ok();
    let ser = per_event(n, |_| {
        black_box(serde_json::to_vec(&event).unwrap_or_default());
    });

    println!("ingest hot path, one fully populated won event ({n} iterations, one thread):");
    println!(
        "  total (parse + validate + normalize + hash + event_id + serialize): {full:.2} µs/event"
    );
    println!(
        "  of which: JSON parse + field extraction {parse:.2} µs, identity normalize + hash {ident:.2} µs"
    );
    println!("            (phone parse alone {phone_only:.2} µs), serialize {ser:.2} µs");
    println!(
        "  target: <= 10 µs/event -> {}",
        if full <= 10.0 { "met" } else { "NOT met" }
    );
}
