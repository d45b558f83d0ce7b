//! The domain core of the CRM-to-ads conversion bridge, with no AWS, HTTP or Lambda in it:
//! canonical events, identity hashing, consent, the mapping contract, money and time, the
//! delivery state machine and pipeline, the ingest, reconcile and backfill use cases, and the
//! ports (`store`, `queue`) with their in-memory implementations.
//!
//! The compiler keeps the layers: this crate's manifest has no AWS SDK, reqwest or Lambda
//! runtime dependency. The AWS side of the ports is `bridge-aws`; the platforms (Meta, Google,
//! the CRM APIs) are `bridge-platforms`.
//!
//! No unsafe code: everything an outside party controls is parsed here, and the fuzz targets
//! (tests/fuzz) run without AddressSanitizer on that promise.

#![forbid(unsafe_code)]

pub mod backfill;
pub mod consent;
pub mod correction;
pub mod crm_check;
pub mod delivery;
pub mod event;
pub mod hashing;
pub mod identity;
pub mod ingest;
pub mod mapping;
pub mod metrics;
pub mod money;
pub mod privacy;
pub mod queue;
pub mod reconcile;
pub mod store;
pub mod timestamp;
pub mod webhook;
