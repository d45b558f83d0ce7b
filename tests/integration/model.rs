//! Model-based property test: generated CRM histories (leads through won, re-won deals, partial
//! and full refunds in and out of order, duplicate webhooks, the same order from a second
//! source, consent denied) with platform faults (server errors, answers that time out after the
//! platform accepted, senders killed between their send and their status write) run through the
//! real ingest and delivery pipeline with the in-memory store and queue, against the strict fake
//! Meta and Google (its Ads API, or for about a third of the cases its Data Manager API, which
//! processes asynchronously and overwrites by transactionId). Scored on what the fakes count,
//! never on our own state:
//! - every order that reached a platform is counted there once, under one event id;
//! - Meta's Purchase value is the won; Google's counted value is the won minus every refund
//!   (through Data Manager, once Google has processed every request; a full refund leaves the
//!   conversion at 0, as Data Manager cannot retract);
//! - an order the system of record did not grant consent for, or another source's won, reaches
//!   no platform, and its pairs say why;
//! - every pair ends in a terminal state.
//!
//! Cases: `MODEL_CASES` (default 500); seed: `MODEL_SEED` (printed on every run, so a failure
//! replays the same generated histories; fault timing is wall-clock, so a replay may differ). Failing cases are saved to `integration/model.proptest-regressions`.
//!   MODEL_CASES=10000 cargo test -p bridge-tests --test model -- --nocapture

use bridge_core::delivery::pipeline::PipelineConfig;
use bridge_core::delivery::{DeliveryStatus, Destination};
use bridge_core::event::{CanonicalEvent, parse_event_json};
use bridge_core::identity::parse_region;
use bridge_core::ingest::{IngestConfig, Intake, ingest};
use bridge_core::mapping::{GoogleBackend, Mapping};
use bridge_core::queue::memory::MemoryQueue;
use bridge_core::store::memory::MemoryStore;
use bridge_core::timestamp::Timestamp;
use bridge_core::webhook::Incoming;
use bridge_platforms::google::{GoogleConfig, GoogleCredentials, GooglePlatform};
use bridge_platforms::meta::{MetaAccess, MetaConfig, MetaPlatform};
use bridge_tests::fakes::Fault;
use bridge_tests::fakes::google::FakeGoogle;
use bridge_tests::fakes::meta::FakeMeta;
use bridge_tests::{invoke_sender, receive_records};
use proptest::prelude::*;
use proptest::test_runner::{
    Config, FileFailurePersistence, RngAlgorithm, TestCaseError, TestRng, TestRunner,
};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// One deal's history in the CRM.
#[derive(Clone, Debug)]
struct Deal {
    value: u32,
    currency: &'static str,
    consent: bool,
    /// Reopened and won again (a second won event, same order and value, a later time).
    rewon: bool,
    /// Refunds as shares of the won value, in percent; their sum is at most 100.
    refunds: Vec<u32>,
    /// Refunds are posted before the won.
    refunds_first: bool,
    /// Every webhook of this deal is delivered twice.
    duplicated: bool,
    /// The billing system posts the same order as won too (not the system of record).
    second_source: bool,
}

#[derive(Clone, Debug)]
enum FaultKind {
    ServerError,
    AcceptThenTimeout,
    /// The sender dies between its send and its status write.
    Crash,
}

#[derive(Clone, Debug)]
struct History {
    deals: Vec<Deal>,
    /// Webhook deliveries the events are split into (delivery runs between them).
    batches: usize,
    /// Faults per delivery round, for (Meta, Google).
    faults: Vec<(Option<FaultKind>, Option<FaultKind>)>,
    /// Google through the Data Manager API (transactionId overwrites, asynchronous
    /// processing, refunds held until the won's request is confirmed) instead of the Ads API.
    data_manager: bool,
}

fn deal() -> impl Strategy<Value = Deal> {
    (
        1u32..5_000,
        prop::sample::select(vec!["USD", "EUR"]),
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.3),
        prop::collection::vec(1u32..=100, 0..3),
        any::<bool>(),
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(value, currency, consent, rewon, mut refunds, refunds_first, duplicated, second)| {
                // Keep the refunds' sum within the won (a full refund is exactly 100).
                let mut left = 100;
                refunds.retain_mut(|r| {
                    *r = (*r).min(left);
                    left -= *r;
                    *r > 0
                });
                Deal {
                    value,
                    currency,
                    consent,
                    rewon,
                    refunds,
                    refunds_first,
                    duplicated,
                    second_source: second,
                }
            },
        )
}

fn fault() -> impl Strategy<Value = Option<FaultKind>> {
    prop_oneof![
        6 => Just(None),
        1 => Just(Some(FaultKind::ServerError)),
        1 => Just(Some(FaultKind::AcceptThenTimeout)),
        1 => Just(Some(FaultKind::Crash)),
    ]
}

fn history() -> impl Strategy<Value = History> {
    (
        prop::collection::vec(deal(), 1..5),
        1usize..4,
        prop::collection::vec((fault(), fault()), 0..4),
        prop::bool::weighted(0.35),
    )
        .prop_map(|(deals, batches, faults, data_manager)| History {
            deals,
            batches,
            faults,
            data_manager,
        })
}

/// A refund's value in the deal's currency, in cents so sums are exact.
fn refund_cents(d: &Deal, pct: u32) -> u64 {
    u64::from(d.value) * 100 * u64::from(pct) / 100
}

/// The bridge's whole world for one case. Fakes are shared by every case (orders carry the
/// case number, so each case reads only its own share of what the fakes counted).
struct World {
    meta: FakeMeta,
    google: FakeGoogle,
    mapping: Mapping,
    /// The same mapping with Google through Data Manager.
    mapping_dm: Mapping,
    rt: tokio::runtime::Runtime,
    case: AtomicUsize,
    /// What the cases exercised, printed at the end (so a run shows it tested something).
    stats: std::sync::Mutex<BTreeMap<&'static str, usize>>,
}

const PLATFORM_TIMEOUT: Duration = Duration::from_millis(250);
/// How long an accepted request's answer is held: past the platform timeout.
const HOLD: Duration = Duration::from_millis(400);
/// A crashed sender is dropped this long after it started its batch: after the fake accepted.
const CRASH_AFTER: Duration = Duration::from_millis(150);

fn pipeline() -> PipelineConfig {
    PipelineConfig {
        refund_wait: Duration::from_secs(10),
        wait_deadline: Duration::from_secs(6 * 3600),
        ..bridge_tests::pipeline(8, Duration::from_secs(1), Duration::from_secs(5))
    }
}

fn server_error(d: Destination) -> Fault {
    match d {
        // Meta's transient error shape (code 2, is_transient).
        Destination::Meta => Fault::Respond(
            500,
            json!({"error": {"message": "An unexpected error has occurred.", "type": "OAuthException", "code": 2, "is_transient": true, "fbtrace_id": "model"}}),
        ),
        Destination::Google => Fault::Respond(
            500,
            json!({"error": {"code": 500, "message": "Internal error encountered.", "status": "INTERNAL"}}),
        ),
    }
}

impl World {
    fn new() -> World {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let (meta, google) = rt.block_on(async {
            let meta = FakeMeta::start("model-token").await;
            let google = FakeGoogle::start().await;
            (meta, google)
        });
        let mut mapping = Mapping::bundled().expect("the bundled mapping");
        if let Some(g) = mapping.google.as_mut() {
            g.backend = GoogleBackend::AdsApi;
        }
        let mut mapping_dm = mapping.clone();
        if let Some(g) = mapping_dm.google.as_mut() {
            g.backend = GoogleBackend::DataManager;
        }
        World {
            meta,
            google,
            mapping,
            mapping_dm,
            rt,
            case: AtomicUsize::new(0),
            stats: Default::default(),
        }
    }

    fn meta_platform(&self) -> MetaPlatform {
        let cfg = MetaConfig {
            base_url: self.meta.base_url.clone(),
            api_version: "v26.0".into(),
            pixel_id: "1234567890".into(),
            test_event_code: None,
            timeout: PLATFORM_TIMEOUT,
        };
        MetaPlatform::new(
            bridge_platforms::http::client().expect("HTTP client"),
            cfg,
            self.mapping.clone(),
            MetaAccess::new("model-token".into(), None),
        )
    }

    fn google_platform(&self, mapping: &Mapping) -> Result<GooglePlatform, TestCaseError> {
        let cfg = GoogleConfig {
            ads_base_url: self.google.base_url.clone(),
            ads_api_version: "v26".into(),
            datamanager_base_url: self.google.base_url.clone(),
            token_url: self.google.token_url(),
            credentials: GoogleCredentials::from_json(&self.google.credentials_json())
                .map_err(|e| TestCaseError::fail(format!("credentials: {e}")))?
                .into(),
            validate_only: false,
            timeout: PLATFORM_TIMEOUT,
            terms_ttl: Duration::from_secs(3600),
        };
        Ok(GooglePlatform::new(
            bridge_platforms::http::client().expect("HTTP client"),
            cfg,
            mapping.clone(),
        ))
    }

    /// The webhooks of a history, in delivery order, each with its source.
    fn webhooks(&self, case: usize, h: &History, start: Timestamp) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        for (k, d) in h.deals.iter().enumerate() {
            let order = format!("c{case}-o{k}");
            let at = |mins: i64| start.plus_secs(mins * 60).canonical();
            let identity = json!({"email": format!("c{case}-{k}@example.com"), "gclid": format!("Cj0-c{case}-{k}")});
            let consent =
                json!({"status": if d.consent { "granted" } else { "denied" }, "basis": "consent"});
            let won = |mins: i64| {
                json!({"event_name": "won", "occurred_at": at(mins), "entity_type": "opportunity",
                    "entity_id": format!("c{case}-d{k}"), "order_id": order, "value": d.value,
                    "currency": d.currency, "identity": identity, "consent": consent})
            };
            let lead = json!({"event_name": "lead", "occurred_at": at(0), "entity_type": "contact",
                "entity_id": format!("c{case}-p{k}"), "identity": identity, "consent": consent});
            let refunds: Vec<Value> = d
                .refunds
                .iter()
                .enumerate()
                .map(|(i, pct)| {
                    let cents = refund_cents(d, *pct);
                    json!({"event_name": "refund", "occurred_at": at(20 + i as i64), "entity_type": "order",
                        "entity_id": format!("c{case}-d{k}-r{i}"), "order_id": order,
                        "value": cents as f64 / 100.0, "currency": d.currency,
                        "identity": identity, "consent": consent})
                })
                .collect();
            let mut deal_hooks = vec![("hubspot", lead)];
            if d.refunds_first {
                deal_hooks.extend(refunds.iter().cloned().map(|r| ("hubspot", r)));
            }
            deal_hooks.push(("hubspot", won(10)));
            if d.rewon {
                deal_hooks.push(("hubspot", won(15)));
            }
            if !d.refunds_first {
                deal_hooks.extend(refunds.iter().cloned().map(|r| ("hubspot", r)));
            }
            if d.second_source {
                deal_hooks.push(("generic", won(11)));
            }
            if d.duplicated {
                let again = deal_hooks.clone();
                deal_hooks.extend(again);
            }
            out.extend(deal_hooks);
        }
        out
    }

    fn run(&self, h: History) -> Result<(), TestCaseError> {
        let case = self.case.fetch_add(1, Ordering::SeqCst);
        self.rt.block_on(self.run_case(case, h))
    }

    async fn run_case(&self, case: usize, h: History) -> Result<(), TestCaseError> {
        let fail = |m: String| TestCaseError::fail(m);
        let store = MemoryStore::new();
        let queue = MemoryQueue::new(100, Duration::from_secs(30));
        let cfg = IngestConfig {
            default_region: parse_region("US").ok_or_else(|| fail("US".into()))?,
            max_future_skew_secs: 300,
        };
        let mapping = if h.data_manager {
            &self.mapping_dm
        } else {
            &self.mapping
        };
        let meta = self.meta_platform();
        let google = self.google_platform(mapping)?;
        let pcfg = pipeline();
        // The CRM history happened over the last two days; the bridge's clock starts now.
        let start = Timestamp::now().minus_secs(48 * 3600);
        let mut now = Timestamp::now();
        let hooks = self.webhooks(case, &h, start);
        let per_batch = hooks.len().div_ceil(h.batches.max(1)).max(1);
        let mut round = 0usize;
        let deliver = |now: Timestamp, round: usize| {
            let faults = h.faults.get(round).cloned().unwrap_or((None, None));
            let (meta, google, store, queue, pcfg) = (&meta, &google, &store, &queue, &pcfg);
            async move {
                queue.set_now(now);
                for (d, f) in [
                    (Destination::Meta, faults.0),
                    (Destination::Google, faults.1),
                ] {
                    let records = receive_records(queue, d, 1000);
                    if records.is_empty() {
                        continue;
                    }
                    let fake_fault = match &f {
                        None => None,
                        Some(FaultKind::ServerError) => Some(server_error(d)),
                        Some(FaultKind::AcceptThenTimeout) | Some(FaultKind::Crash) => {
                            Some(Fault::AcceptThenTimeout(HOLD))
                        }
                    };
                    if let Some(ff) = fake_fault {
                        match d {
                            Destination::Meta => self.meta.inject(ff),
                            Destination::Google => self.google.inject(ff),
                        }
                    }
                    let crash_after = matches!(f, Some(FaultKind::Crash)).then_some(CRASH_AFTER);
                    match d {
                        Destination::Meta => {
                            invoke_sender(records, meta, store, queue, pcfg, now, crash_after).await
                        }
                        Destination::Google => {
                            invoke_sender(records, google, store, queue, pcfg, now, crash_after)
                                .await
                        }
                    }
                }
            }
        };
        for chunk in hooks.chunks(per_batch) {
            let mut by_source: BTreeMap<&str, Vec<Incoming>> = BTreeMap::new();
            for (source, body) in chunk {
                let item = match parse_event_json(&body.to_string()) {
                    Ok(e) => Incoming::Event(Box::new(e)),
                    Err(errors) => Incoming::Invalid(errors),
                };
                by_source.entry(source).or_default().push(item);
            }
            for (source, items) in by_source {
                let to = Intake::new(mapping, &cfg, &store, &queue);
                let r = ingest(items, source, to, now).await;
                for item in &r.results {
                    prop_assert!(item.errors.is_empty(), "ingest refused an item: {item:?}");
                }
            }
            deliver(now, round).await;
            round += 1;
            now = now.plus_secs(60);
        }
        // Deliver until nothing is left (or clearly stuck).
        for _ in 0..400 {
            if queue.depth(Destination::Meta) == 0 && queue.depth(Destination::Google) == 0 {
                break;
            }
            deliver(now, round).await;
            round += 1;
            now = now.plus_secs(60);
        }
        // Faults queued for a round that sent nothing must not leak into the next case.
        self.meta.with(|d| d.controls.faults.clear());
        self.google.with(|d| d.controls.faults.clear());
        // Held answers of this case finish before the next case reads the fakes.
        tokio::time::sleep(if h.faults.is_empty() {
            Duration::ZERO
        } else {
            HOLD
        })
        .await;
        self.check(case, &h, &store.all())
    }

    fn check(
        &self,
        case: usize,
        h: &History,
        events: &[CanonicalEvent],
    ) -> Result<(), TestCaseError> {
        let mut terminal = vec![
            DeliveryStatus::Delivered,
            DeliveryStatus::BlockedConsent,
            DeliveryStatus::RejectedNotSystemOfRecord,
            DeliveryStatus::DuplicateOrder,
        ];
        if h.data_manager {
            // A full refund restated to 0 (Data Manager cannot retract).
            terminal.push(DeliveryStatus::RetractionUnsupported);
        }
        for e in events {
            for (d, s) in &e.destinations {
                prop_assert!(
                    terminal.contains(&s.status),
                    "case {case}: {} {:?} ended {:?} ({:?})",
                    e.key,
                    d,
                    s.status,
                    s.last_error
                );
                if e.source == "generic" && e.event_name == bridge_core::event::EventName::Won {
                    prop_assert_eq!(s.status, DeliveryStatus::RejectedNotSystemOfRecord);
                }
            }
        }
        let prefix = format!("c{case}-o");
        // Meta: the Purchases it received for this case's orders, raw, by order.
        let mut meta_ids: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut meta_value: BTreeMap<String, f64> = BTreeMap::new();
        for (_, ev) in self.meta.purchases_raw() {
            let order = ev["custom_data"]["order_id"].as_str().unwrap_or_default();
            if !order.starts_with(&prefix) {
                continue;
            }
            meta_ids
                .entry(order.to_string())
                .or_default()
                .insert(ev["event_id"].as_str().unwrap_or_default().to_string());
            meta_value.insert(
                order.to_string(),
                ev["custom_data"]["value"].as_f64().unwrap_or(f64::NAN),
            );
        }
        let google = self.google.conversions();
        // Conversions per order across every action: a second upload of an order under
        // another action would be a second count that `conversions()` (by order) merges.
        let mut per_order: BTreeMap<String, usize> = BTreeMap::new();
        for k in self.google.conversions_by_key().keys() {
            if let bridge_tests::fakes::google::OrderKey::Order(o) = &k.order
                && o.starts_with(&prefix)
            {
                *per_order.entry(o.clone()).or_default() += 1;
            }
        }
        // Data Manager: what Google holds once it has processed every request, one
        // conversion per (account, action, transactionId) at its latest value.
        let mut dm: BTreeMap<String, (usize, f64)> = BTreeMap::new();
        if h.data_manager {
            self.google.dm_complete_all();
            for (k, c) in self.google.dm_conversions() {
                if k.transaction_id.starts_with(&prefix) {
                    let e = dm.entry(k.transaction_id.clone()).or_insert((0, 0.0));
                    e.0 += 1;
                    e.1 = c.value.unwrap_or(f64::NAN);
                }
            }
        }
        if let Ok(mut st) = self.stats.lock() {
            for (k, f) in &h.faults {
                for f in [k, f].into_iter().flatten() {
                    *st.entry(match f {
                        FaultKind::ServerError => "server errors",
                        FaultKind::AcceptThenTimeout => "accepted then timed out",
                        FaultKind::Crash => "sender crashes after send",
                    })
                    .or_default() += 1;
                }
            }
            for d in &h.deals {
                let mut add = |k: &'static str, on: bool| {
                    if on {
                        *st.entry(k).or_default() += 1;
                    }
                };
                add("orders", true);
                add("orders through Data Manager", h.data_manager);
                add("orders with consent denied", !d.consent);
                add("re-won orders", d.rewon);
                add("refunds", !d.refunds.is_empty());
                add("full refunds", d.refunds.iter().sum::<u32>() == 100);
                add(
                    "refunds before their won",
                    d.refunds_first && !d.refunds.is_empty(),
                );
                add("duplicated webhooks", d.duplicated);
                add("same order from a second source", d.second_source);
            }
        }
        for (k, d) in h.deals.iter().enumerate() {
            let order = format!("c{case}-o{k}");
            let refunded: u64 = d.refunds.iter().map(|p| refund_cents(d, *p)).sum();
            let won_cents = u64::from(d.value) * 100;
            if !d.consent {
                prop_assert!(!meta_ids.contains_key(&order), "{order}: denied, at Meta");
                prop_assert!(!google.contains_key(&order), "{order}: denied, at Google");
                prop_assert!(!dm.contains_key(&order), "{order}: denied, at Data Manager");
                continue;
            }
            // Meta: one Purchase id per order, at the won's value (refunds are their own events).
            let ids = meta_ids.get(&order).cloned().unwrap_or_default();
            prop_assert_eq!(ids.len(), 1, "{}: Meta Purchase ids {:?}", order, ids);
            prop_assert_eq!(meta_value.get(&order).copied(), Some(f64::from(d.value)));
            let want = won_cents.saturating_sub(refunded);
            if h.data_manager {
                // Data Manager: one conversion per transaction, overwritten by each
                // restatement; a full refund leaves it at 0 (it cannot retract).
                prop_assert!(!google.contains_key(&order), "{order}: through the Ads API");
                let (count, value) = dm.get(&order).copied().unwrap_or((0, f64::NAN));
                prop_assert_eq!(count, 1, "{}: Data Manager conversions", order);
                prop_assert!(
                    (value * 100.0 - want as f64).abs() < 0.5,
                    "{}: Data Manager value {} want {}",
                    order,
                    value,
                    want as f64 / 100.0
                );
                continue;
            }
            // Google: one conversion per order, worth the won minus every refund; a full
            // refund is a retraction (counted zero).
            prop_assert_eq!(
                per_order.get(&order).copied(),
                Some(1),
                "{}: conversions at Google",
                order
            );
            let c = google.get(&order);
            prop_assert!(c.is_some(), "{}: not at Google", order);
            let c = c
                .cloned()
                .ok_or_else(|| TestCaseError::fail(order.clone()))?;
            if want == 0 {
                prop_assert!(c.retracted, "{}: fully refunded, not retracted", order);
            } else {
                prop_assert!(!c.retracted, "{}: retracted", order);
                prop_assert!(
                    (c.value * 100.0 - want as f64).abs() < 0.5,
                    "{}: Google value {} want {}",
                    order,
                    c.value,
                    want as f64 / 100.0
                );
            }
        }
        Ok(())
    }
}

#[test]
fn generated_crm_histories_are_counted_once_by_what_the_platforms_count() {
    let cases: u32 = std::env::var("MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let seed: u64 = std::env::var("MODEL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("model test: {cases} cases, MODEL_SEED={seed}");
    let world = World::new();
    let config = Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "integration/model.proptest-regressions",
        ))),
        // Each case already runs a whole bridge: shrinking a few steps is enough to read it.
        max_shrink_iters: 64,
        ..Config::default()
    };
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let started = std::time::Instant::now();
    let result = runner.run(&history(), |h| world.run(h));
    println!(
        "model test: {} cases in {:.1} s",
        world.case.load(Ordering::SeqCst),
        started.elapsed().as_secs_f64()
    );
    println!(
        "model test exercised: {:?}",
        world.stats.lock().map(|s| s.clone()).unwrap_or_default()
    );
    if let Err(e) = result {
        panic!("{e} (replay with MODEL_SEED={seed})");
    }
}
