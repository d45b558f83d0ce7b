//! The core of the CRM-to-ads conversion bridge: canonical events, identity hashing, consent,
//! the mapping contract, delivery rules, and the store and queue ports with their adapters.
//!
//! Domain modules (`event`, `identity`, `consent`, `mapping`, `destination`, `delivery`) are
//! plain functions and types; AWS appears only in the adapters (`store::dynamodb`,
//! `queue::sqs`, `aws`).

pub mod aws;
pub mod backfill;
pub mod config;
pub mod consent;
pub mod delivery;
pub mod destination;
pub mod destinations;
pub mod event;
pub mod hashing;
pub mod identity;
pub mod ingest;
pub mod lambda;
pub mod mapping;
pub mod metrics;
pub mod money;
pub mod queue;
pub mod reconcile;
pub mod store;
pub mod telemetry;
pub mod timestamp;
pub mod webhook;
