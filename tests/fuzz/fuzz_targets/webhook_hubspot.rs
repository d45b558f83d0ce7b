//! Fuzz target: a HubSpot webhook delivery body: parsed, and each event classified and keyed
//! against the bundled mapping (what ingest does before reading the CRM).
#![no_main]

use bridge_core::webhook::hubspot::{event_key, parse_delivery};
use bridge_fuzz::mapping;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(events) = parse_delivery(body, 500) {
        for e in &events {
            let _ = event_key(e, mapping());
        }
    }
});
