//! Fuzz target: an SQS message body as a sender receives it (delivery messages, including the
//! previous release's shape and dead-letter tokens).
#![no_main]

use bridge_core::queue::DeliveryMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = std::str::from_utf8(data)
        && let Ok(m) = DeliveryMessage::from_body(body)
    {
        let _ = DeliveryMessage::from_body(&m.to_body());
    }
});
