//! Destination platforms: each says how to build its request items, send them, and read the
//! answer into per-event outcomes; `delivery::pipeline` does the rest.

pub mod google;
pub mod meta;
