//! Benchmark of the ingest hot path per event (parse, validate, normalize + hash identity,
//! derive the event_id, serialize) beside a minimal program doing the same kind of work on
//! the same bodies in the same run; prints both and their ratio (target: <= 2x the minimal).
//!
//! Run: `cargo bench -p bridge-core --bench hot_path`

use bridge_core::consent::ConsentStatus;
use bridge_core::event::{CanonicalEvent, ValidationContext, parse_event_json, validate};
use bridge_core::identity::{self, IdentityContext};
use bridge_core::timestamp::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
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

/// The minimal baseline: what any hand-written Rust webhook-to-conversion program must do at
/// least. Typed serde parse, trim and lowercase, digits-only phone with a +1 default, RFC 3339
/// parse, SHA-256 hex of each identifier, an event id from the entity and time, serialize. No
/// validation messages, consent, per-platform forms or phone metadata: the gap between this
/// and the real path is what those cost.
mod minimal {
    use super::*;

    #[derive(Deserialize)]
    pub struct Identity {
        email: Option<String>,
        phone: Option<String>,
        first_name: Option<String>,
        last_name: Option<String>,
        city: Option<String>,
        state: Option<String>,
        zip: Option<String>,
        country: Option<String>,
        external_id: Option<String>,
        client_ip_address: Option<String>,
        client_user_agent: Option<String>,
        gclid: Option<String>,
        fbp: Option<String>,
        fbclid: Option<String>,
    }

    #[derive(Deserialize)]
    pub struct Input {
        source: String,
        event_name: String,
        occurred_at: String,
        entity_type: String,
        entity_id: String,
        order_id: Option<String>,
        value: Option<f64>,
        currency: Option<String>,
        identity: Identity,
        consent: Option<serde_json::Value>,
    }

    #[derive(Serialize)]
    pub struct Output {
        event_id: String,
        source: String,
        event_name: String,
        occurred_at_ms: i128,
        order_id: Option<String>,
        value: Option<f64>,
        currency: Option<String>,
        em: Option<String>,
        ph: Option<String>,
        fn_: Option<String>,
        ln: Option<String>,
        ct: Option<String>,
        st: Option<String>,
        zp: Option<String>,
        country: Option<String>,
        external_id: Option<String>,
        client_ip_address: Option<String>,
        client_user_agent: Option<String>,
        gclid: Option<String>,
        fbp: Option<String>,
        fbclid: Option<String>,
        consent: Option<serde_json::Value>,
    }

    fn hash(s: &str) -> String {
        let digest = Sha256::digest(s.as_bytes());
        let mut out = String::with_capacity(64);
        for b in digest {
            out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
        }
        out
    }

    fn lower_hash(s: &Option<String>) -> Option<String> {
        s.as_deref()
            .map(|v| v.trim().to_lowercase())
            .filter(|v| !v.is_empty())
            .map(|v| hash(&v))
    }

    fn phone(s: &Option<String>) -> Option<String> {
        let digits: String = s.as_deref()?.chars().filter(char::is_ascii_digit).collect();
        match digits.len() {
            10 => Some(hash(&format!("1{digits}"))),
            0 => None,
            _ => Some(hash(&digits)),
        }
    }

    pub fn run(body: &str) -> Option<Vec<u8>> {
        let x: Input = serde_json::from_str(body).ok()?;
        let at = time::OffsetDateTime::parse(
            &x.occurred_at,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()?;
        let occurred_at_ms = at.unix_timestamp_nanos() / 1_000_000;
        let event_id = hash(&format!(
            "{}|{}|{}|{}|{}",
            x.source, x.entity_type, x.entity_id, x.event_name, occurred_at_ms
        ));
        let i = &x.identity;
        let out = Output {
            event_id,
            occurred_at_ms,
            em: lower_hash(&i.email),
            ph: phone(&i.phone),
            fn_: lower_hash(&i.first_name),
            ln: lower_hash(&i.last_name),
            ct: lower_hash(&i.city),
            st: lower_hash(&i.state),
            zp: lower_hash(&i.zip),
            country: lower_hash(&i.country),
            external_id: i.external_id.as_deref().map(hash),
            client_ip_address: i.client_ip_address.clone(),
            client_user_agent: i.client_user_agent.clone(),
            gclid: i.gclid.clone(),
            fbp: i.fbp.clone(),
            fbclid: i.fbclid.clone(),
            source: x.source,
            event_name: x.event_name,
            order_id: x.order_id,
            value: x.value,
            currency: x.currency.map(|c| c.to_uppercase()),
            consent: x.consent,
        };
        serde_json::to_vec(&out).ok()
    }
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

    per_event(5_000, |i| {
        black_box(minimal::run(&bodies[i % 1000]));
    });

    // Interleaved rounds, best of each, so a noisy neighbour slows both sides alike.
    let mut full = f64::MAX;
    let mut base = f64::MAX;
    for _ in 0..10 {
        full = full.min(per_event(n / 10, |i| {
            let input = parse_event_json(&bodies[i % 1000]).ok();
            let event: Option<CanonicalEvent> = input.and_then(|x| validate(&x, &ctx).ok());
            black_box(serde_json::to_vec(&event).unwrap_or_default());
        }));
        base = base.min(per_event(n / 10, |i| {
            black_box(minimal::run(&bodies[i % 1000]));
        }));
    }
    let ratio = full / base;

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
        "  minimal baseline (serde parse + trim/lowercase + SHA-256 + serialize): {base:.2} µs/event"
    );
    println!(
        "  ratio: {ratio:.2}x the minimal baseline (target <= 2.0x) -> {}",
        if ratio <= 2.0 { "met" } else { "NOT met" }
    );
}
