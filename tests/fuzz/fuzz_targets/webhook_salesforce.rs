//! Fuzz target: a Salesforce webhook body: split into items, each read in the Salesforce shape
//! through the bundled mapping, then validated like any event.
#![no_main]

use bridge_core::event::{ValidationContext, validate};
use bridge_core::timestamp::Timestamp;
use bridge_core::webhook::{Incoming, salesforce, split_items};
use bridge_fuzz::mapping;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    let ctx = ValidationContext::for_tests(Timestamp::from_unix_secs(1_800_000_000));
    if let Ok((items, _)) = split_items(body, 500) {
        for item in items {
            if let Incoming::Event(input) = salesforce::parse_item(item, "salesforce", mapping()) {
                let _ = validate(&input, &ctx);
            }
        }
    }
});
