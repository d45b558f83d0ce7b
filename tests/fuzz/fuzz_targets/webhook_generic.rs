//! Fuzz target: a generic webhook body through the whole event path the ingest function runs
//! before any store: split into items, each parsed (fast path and field reader), validated and
//! its identity normalized and hashed.
#![no_main]

use bridge_core::event::{ValidationContext, parse_event_json, validate};
use bridge_core::timestamp::Timestamp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    let ctx = ValidationContext::for_tests(Timestamp::from_unix_secs(1_800_000_000));
    if let Ok((items, _)) = bridge_core::webhook::split_items(body, 500) {
        for item in items {
            if let Ok(input) = parse_event_json(item) {
                let _ = validate(&input, &ctx);
            }
        }
    }
});
