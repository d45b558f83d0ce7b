//! Fuzz target: the signature headers an unauthenticated caller controls: `X-Bridge-Signature`
//! (parsed, bounded, compared), HubSpot's timestamp and signature, and HubSpot's URI decoding.
#![no_main]

use bridge_core::webhook::signature::{hubspot_uri, verify_bridge, verify_hubspot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // The header, then the body, split at the first newline.
    let (header, body) = text.split_once('\n').unwrap_or((&text, ""));
    let _ = verify_bridge(b"secret", Some(header), body.as_bytes(), 1_800_000_000);
    let (sig, ts) = header.split_once(' ').unwrap_or((header, header));
    let _ = verify_hubspot(
        b"secret",
        "POST",
        body,
        body.as_bytes(),
        Some(sig),
        Some(ts),
        1_800_000_000,
    );
    let _ = hubspot_uri(&text);
});
