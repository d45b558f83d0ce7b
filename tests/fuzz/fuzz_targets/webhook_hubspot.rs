//! Fuzz target: a HubSpot webhook delivery body: parsed, and each event classified and keyed
//! against the bundled mapping (what ingest does before reading the CRM).
#![no_main]

use bridge_core::mapping::Mapping;
use bridge_core::webhook::hubspot::{event_key, parse_delivery};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn mapping() -> &'static Mapping {
    static M: OnceLock<Mapping> = OnceLock::new();
    M.get_or_init(|| Mapping::bundled().unwrap_or_else(|e| panic!("bundled mapping: {e}")))
}

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
