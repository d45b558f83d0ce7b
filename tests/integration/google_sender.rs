//! The Google sender's pipeline against the strict fake Google Ads API, Data Manager API and
//! OAuth endpoint, with the DynamoDB store and SQS queues in the emulator (and in memory where
//! only batching and classification are measured).

use bridge_core::delivery::pipeline::{BatchReport, PipelineConfig, Record, process_batch};
use bridge_core::delivery::{DeliveryStatus, Destination};
use bridge_core::event::CanonicalEvent;
use bridge_core::mapping::{GoogleBackend, Mapping};
use bridge_core::queue::memory::MemoryQueue;
use bridge_core::queue::{DeliveryMessage, DeliveryQueue};
use bridge_core::store::EventStore;
use bridge_core::store::memory::MemoryStore;
use bridge_core::timestamp::Timestamp;
use bridge_platforms::credentials::{Deferred, ReadError};
use bridge_platforms::google::{GoogleConfig, GoogleCredentials, GooglePlatform};
use bridge_tests::fakes::google::{DmKey, FakeGoogle, Fault, dm_aborted};
use bridge_tests::sample_event;
use serde_json::json;
use std::time::Duration;

fn mapping(backend: GoogleBackend) -> Mapping {
    let mut m = Mapping::bundled().unwrap();
    m.google.as_mut().unwrap().backend = backend;
    m
}

/// The configuration for `fake`, with its credentials given.
fn platform_config(fake: &FakeGoogle) -> GoogleConfig {
    GoogleConfig {
        ads_base_url: fake.base_url.clone(),
        ads_api_version: "v26".into(),
        datamanager_base_url: fake.base_url.clone(),
        token_url: fake.token_url(),
        credentials: GoogleCredentials::from_json(&fake.credentials_json())
            .unwrap()
            .into(),
        validate_only: false,
        timeout: Duration::from_secs(10),
        terms_ttl: Duration::from_secs(3600),
    }
}

fn platform_with(
    fake: &FakeGoogle,
    m: Mapping,
    timeout_ms: u64,
    validate_only: bool,
) -> GooglePlatform {
    let cfg = GoogleConfig {
        validate_only,
        timeout: Duration::from_millis(timeout_ms),
        ..platform_config(fake)
    };
    GooglePlatform::new(
        bridge_platforms::http::client().expect("HTTP client"),
        cfg,
        m,
    )
}

fn platform(fake: &FakeGoogle, backend: GoogleBackend) -> GooglePlatform {
    platform_with(fake, mapping(backend), 10_000, false)
}

fn cfg() -> PipelineConfig {
    bridge_tests::pipeline(5, Duration::from_secs(1), Duration::from_secs(2))
}

fn hours_ago(h: i64) -> String {
    Timestamp::now().minus_secs(h * 3600).canonical()
}

fn won(entity: &str, value: f64) -> CanonicalEvent {
    sample_event(
        entity,
        "won",
        Some(&format!("O-{entity}")),
        Some(value),
        &hours_ago(30),
    )
}

fn refund(entity: &str, value: f64, h: i64) -> CanonicalEvent {
    let mut r = sample_event(
        &format!("{entity}-r{value}"),
        "refund",
        Some(&format!("O-{entity}")),
        Some(value),
        &hours_ago(h),
    );
    r.entity_type = bridge_core::event::EntityType::Order;
    r
}

fn records(events: &[CanonicalEvent], tag: &str) -> Vec<Record> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| Record {
            message_id: format!("{tag}{i}"),
            receipt: format!("r-{tag}{i}"),
            body: DeliveryMessage::new(&e.event_id, Destination::Google).to_body(),
            attributes: Default::default(),
        })
        .collect()
}

async fn memory(events: &[CanonicalEvent]) -> (MemoryStore, MemoryQueue) {
    let store = MemoryStore::new();
    for e in events {
        store.put_new(e).await.unwrap();
    }
    (store, MemoryQueue::new(5, Duration::from_secs(30)))
}

/// The events stored in memory, queued for Google, and handed to the sender in one batch
/// at once: the store, the queue and the batch's report.
async fn deliver(
    events: &[CanonicalEvent],
    p: &GooglePlatform,
) -> (MemoryStore, MemoryQueue, BatchReport) {
    let (store, queue) = memory(events).await;
    let r = run_batch(&store, &queue, p, events, "m", Timestamp::now()).await;
    (store, queue, r)
}

fn status(store: &MemoryStore, e: &CanonicalEvent) -> (DeliveryStatus, String) {
    let s = store.get_sync(&e.event_id).destinations[&Destination::Google].clone();
    (
        s.status,
        s.last_error.map(|e| e.code.to_string()).unwrap_or_default(),
    )
}

#[tokio::test]
async fn two_thousand_rows_with_three_bad_ones_deliver_1997_in_one_request() {
    let fake = FakeGoogle::start().await;
    let mut events: Vec<_> = (0..2000).map(|i| won(&format!("B{i}"), 10.0)).collect();
    // Three rows Google refuses, each for its own reason.
    events[10].identity.click.gclid = Some("unknown-click".into());
    fake.with(|d| {
        d.unknown_clicks.insert("unknown-click".into());
        d.poison.insert("O-B500".into());
        d.too_recent.insert("O-B1999".into());
    });
    let p = platform(&fake, GoogleBackend::AdsApi);
    let (store, queue, r) = deliver(&events, &p).await;
    assert_eq!(
        fake.with(|d| d.batch_sizes.clone()),
        [2000],
        "one request of 2,000 rows"
    );
    assert_eq!(fake.count(), 1997);
    let delivered = events
        .iter()
        .filter(|e| status(&store, e).0 == DeliveryStatus::Delivered)
        .count();
    assert_eq!(delivered, 1997);
    // An unknown gclid is EVENT_NOT_FOUND ("could not be attributed to a click", G-ERR-UP #45);
    // CLICK_NOT_FOUND is for email/phone that matched no click.
    assert_eq!(
        status(&store, &events[10]),
        (DeliveryStatus::Rejected, "EVENT_NOT_FOUND".into()),
        "terminal, not dead-lettered"
    );
    assert_eq!(
        status(&store, &events[500]),
        (
            DeliveryStatus::DeadLetter,
            "CONVERSION_PRECEDES_EVENT".into()
        )
    );
    assert_eq!(
        status(&store, &events[1999]),
        (DeliveryStatus::Retry, "TOO_RECENT_EVENT".into())
    );
    let s = store.get_sync(&events[1999].event_id).destinations[&Destination::Google].clone();
    let wait = s.next_attempt_at.unwrap().secs_since(&Timestamp::now());
    assert!(
        (6 * 3600 - 60..=6 * 3600 + 60).contains(&wait),
        "retried in about 6 hours: {wait}s"
    );
    assert_eq!(r.failures, ["m1999"], "only the retry stays on the queue");
    assert_eq!(r.alerts, 0, "none of these needs a person");
    assert_eq!(queue.dlq(Destination::Google).len(), 1);
    // The row itself is in the API's form.
    let req = &fake.requests("uploadClickConversions")[0];
    assert_eq!(req["partialFailure"], true);
    let row = &req["conversions"][0];
    assert_eq!(row["orderId"], "O-B0");
    assert_eq!(
        row["userIdentifiers"].as_array().unwrap().len(),
        2,
        "email and phone, one per object"
    );
    assert!(
        row["conversionDateTime"]
            .as_str()
            .unwrap()
            .ends_with("+00:00")
    );
}

#[tokio::test]
async fn replay_after_accept_then_timeout_is_not_double_counted() {
    let fake = FakeGoogle::start().await;
    let events: Vec<_> = (0..4).map(|i| won(&format!("T{i}"), 25.0)).collect();
    let p = platform_with(&fake, mapping(GoogleBackend::AdsApi), 400, false);
    fake.inject(Fault::AcceptThenTimeout(Duration::from_millis(1500)));
    let (store, queue, r) = deliver(&events, &p).await;
    assert_eq!(r.failures.len(), 4, "a timeout is retried");
    let r = run_batch(
        &store,
        &queue,
        &p,
        &events,
        "m",
        Timestamp::now().plus_secs(5),
    )
    .await;
    assert!(r.failures.is_empty(), "{r:?}");
    assert!(
        r.results.values().all(|v| v.as_str() == "delivered_replay"),
        "{r:?}"
    );
    assert_eq!(fake.count(), 4, "four distinct order ids");
    assert_eq!(fake.revenue()["USD"], 100.0, "counted once each");
    assert_eq!(fake.requests("uploadClickConversions").len(), 2);
}

#[tokio::test]
async fn token_expiry_mid_run_refreshes_once_and_delivers() {
    let fake = FakeGoogle::start().await;
    let first: Vec<_> = (0..3).map(|i| won(&format!("K{i}"), 5.0)).collect();
    let second: Vec<_> = (0..3).map(|i| won(&format!("L{i}"), 5.0)).collect();
    let (store, queue) = memory(&[first.clone(), second.clone()].concat()).await;
    let p = platform(&fake, GoogleBackend::AdsApi);
    let r = run_batch(&store, &queue, &p, &first, "a", Timestamp::now()).await;
    assert!(r.failures.is_empty());
    assert_eq!(
        fake.with(|d| d.token_grants),
        1,
        "one token for the terms check and the upload"
    );
    fake.expire_tokens();
    let r = run_batch(&store, &queue, &p, &second, "b", Timestamp::now()).await;
    assert!(r.failures.is_empty(), "{r:?}");
    assert_eq!(
        fake.with(|d| (d.token_grants, d.unauthenticated)),
        (2, 1),
        "one 401, one refresh"
    );
    assert_eq!(fake.count(), 6);
}

#[tokio::test]
async fn quota_errors_honour_retry_delay_and_outages_retry() {
    let fake = FakeGoogle::start().await;
    let events: Vec<_> = (0..2).map(|i| won(&format!("Q{i}"), 5.0)).collect();
    let (store, queue) = memory(&events).await;
    let p = platform(&fake, GoogleBackend::AdsApi);
    fake.inject(Fault::Respond(429, json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "quota",
        "details": [{"@type": "type.googleapis.com/google.ads.googleads.v26.errors.GoogleAdsFailure",
            "errors": [{"errorCode": {"quotaError": "RESOURCE_EXHAUSTED"}, "message": "Too many requests. Retry in 900 seconds.",
                "details": {"quotaErrorDetails": {"rateScope": "DEVELOPER", "rateName": "Requests", "retryDelay": "900s"}}}]}]}})));
    let now = Timestamp::now();
    let r = run_batch(&store, &queue, &p, &events, "m", now).await;
    assert_eq!(r.failures.len(), 2);
    let s = store.get_sync(&events[0].event_id).destinations[&Destination::Google].clone();
    assert_eq!(s.last_error.unwrap().code, "RESOURCE_EXHAUSTED");
    let wait = s.next_attempt_at.unwrap().secs_since(&now);
    assert!(
        (899..=905).contains(&wait),
        "retryDelay honoured, not shortened by jitter: {wait}"
    );
    fake.inject(Fault::Respond(503, json!({"error": {"code": 503, "status": "UNAVAILABLE", "message": "The service is currently unavailable."}})));
    let later = now.plus_secs(901);
    let r = run_batch(&store, &queue, &p, &events, "m", later).await;
    assert_eq!(r.failures.len(), 2, "5xx retried");
    let r = run_batch(&store, &queue, &p, &events, "m", later.plus_secs(10)).await;
    assert!(r.failures.is_empty(), "{r:?}");
    assert_eq!(fake.count(), 2);
}

/// Data Manager's ABORTED (the guide's retry list) is a wait, not a refusal: nothing is lost and
/// nothing is sent twice.
#[tokio::test]
async fn data_manager_aborted_is_retried() {
    let fake = FakeGoogle::start().await;
    let events: Vec<_> = (0..2).map(|i| won(&format!("AB{i}"), 5.0)).collect();
    let (store, queue) = memory(&events).await;
    let p = platform(&fake, GoogleBackend::DataManager);
    let (status_code, body) = dm_aborted();
    fake.inject(Fault::Respond(status_code, body));
    let now = Timestamp::now();
    let r = run_batch(&store, &queue, &p, &events, "m", now).await;
    assert_eq!(r.failures.len(), 2, "{r:?}");
    assert_eq!(r.alerts, 0);
    for e in &events {
        let (st, code) = status(&store, e);
        assert_eq!((st, code.as_str()), (DeliveryStatus::Retry, "ABORTED"));
    }
    let r = run_batch(&store, &queue, &p, &events, "m", now.plus_secs(10)).await;
    assert!(r.failures.is_empty(), "{r:?}");
    fake.dm_complete_all();
    assert_eq!(fake.dm_count(), 2);
    assert_eq!(
        fake.requests("events:ingest").len(),
        1,
        "the aborted request was not kept"
    );
}

#[tokio::test]
async fn terms_not_accepted_strips_user_data_from_click_rows_and_holds_the_rest() {
    let fake = FakeGoogle::start().await;
    fake.with(|d| d.terms.insert("1234567890".into(), false));
    // A click id and user data: sent as a plain click conversion, without the user data.
    let with_click = won("U1", 5.0);
    // User data and no click id: nothing Google may receive, so it is held and alerted.
    let mut data_only = won("U2", 5.0);
    data_only.identity.click.gclid = None;
    // A click id alone: nothing to strip.
    let mut click_only = won("U3", 5.0);
    click_only.identity.google = Default::default();
    let all = [with_click.clone(), data_only.clone(), click_only.clone()];
    let (store, queue) = memory(&all).await;
    // Enhanced conversions for leads: the action takes rows without a click id.
    let mut m = mapping(GoogleBackend::AdsApi);
    for c in m.google.as_mut().unwrap().conversions.values_mut() {
        c.allow_without_click_id = true;
    }
    let p = platform_with(&fake, m, 10_000, false);
    let r = run_batch(&store, &queue, &p, &all, "m", Timestamp::now()).await;
    assert_eq!(r.alerts, 1);
    assert_eq!(status(&store, &with_click).0, DeliveryStatus::Delivered);
    assert_eq!(status(&store, &click_only).0, DeliveryStatus::Delivered);
    assert_eq!(
        status(&store, &data_only),
        (
            DeliveryStatus::DeadLetter,
            "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS".into()
        )
    );
    assert_eq!(queue.dlq(Destination::Google).len(), 1);
    let sent = fake.requests("uploadClickConversions");
    let rows = sent[0]["conversions"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "the held row is not sent");
    for row in rows {
        assert!(row.get("gclid").is_some());
        assert!(
            row.get("userIdentifiers").is_none(),
            "no user data may reach Google without the terms: {row}"
        );
    }
    // The answer is cached: a second batch does not ask again.
    let more = won("U4", 5.0);
    store.put_new(&more).await.unwrap();
    run_batch(&store, &queue, &p, &[more], "n", Timestamp::now()).await;
    assert_eq!(fake.with(|d| d.searches), 1);
}

#[tokio::test]
#[ignore = "needs the local AWS emulator: bash infra/local/test.sh starts it and runs this"]
async fn refunds_restate_and_retract_in_order_and_out_of_order_against_the_emulator() {
    let fake = FakeGoogle::start().await;
    let (_stack, store, _sqs, queue) = bridge_tests::emulated("google_refunds", &[]).await;
    let p = platform(&fake, GoogleBackend::AdsApi);
    let run = |evs: Vec<CanonicalEvent>, now: Timestamp| {
        let (p, store, queue) = (&p, &store, &queue);
        async move {
            let recs = records(&evs, "m");
            process_batch(recs, p, store, queue, &cfg(), now).await
        }
    };
    let final_status = |e: &CanonicalEvent| {
        let (store, id) = (&store, e.event_id.clone());
        async move {
            let s =
                store.get(&id).await.unwrap().unwrap().destinations[&Destination::Google].clone();
            (
                s.status,
                s.last_error.map(|e| e.code.to_string()).unwrap_or_default(),
            )
        }
    };

    // In order: won 100, refund 20 (restate 80), refund 30 (restate 50), refund 50 (retract).
    let w = won("A", 100.0);
    let (r1, r2, r3) = (
        refund("A", 20.0, 20),
        refund("A", 30.0, 10),
        refund("A", 50.0, 5),
    );
    // Each refund reaches the store as the CRM records it; each restatement states the total
    // given every refund known at that moment.
    let now = Timestamp::now();
    store.put_new(&w).await.unwrap();
    run(vec![w.clone()], now).await;
    store.put_new(&r1).await.unwrap();
    run(vec![r1.clone()], now).await;
    assert_eq!(fake.conversions()["O-A"].value, 80.0);
    store.put_new(&r2).await.unwrap();
    run(vec![r2.clone()], now).await;
    assert_eq!(fake.conversions()["O-A"].value, 50.0);
    store.put_new(&r3).await.unwrap();
    run(vec![r3.clone()], now).await;
    let c = fake.conversions()["O-A"].clone();
    assert!(
        c.retracted,
        "the last refund takes the total to zero: RETRACTION"
    );
    let adj = fake.requests("uploadConversionAdjustments");
    assert_eq!(adj.len(), 3);
    assert!(
        adj[2]["conversionAdjustments"][0]
            .get("restatementValue")
            .is_none()
    );
    for e in [&r1, &r2, &r3] {
        assert_eq!(final_status(e).await.0, DeliveryStatus::Delivered);
    }

    // Out of order: the refund arrives before its won event, waits, then restates correctly;
    // an older refund learnt after a newer one was sent still moves the total on.
    let w2 = won("B", 200.0);
    let late = refund("B", 50.0, 2);
    store.put_new(&late).await.unwrap();
    let r = run(vec![late.clone()], now).await;
    assert_eq!(r.failures.len(), 1, "held back: {r:?}");
    assert_eq!(
        final_status(&late).await,
        (DeliveryStatus::Retry, "original_not_delivered".into())
    );
    assert!(
        fake.requests("uploadConversionAdjustments").len() == 3,
        "nothing sent before the conversion"
    );
    store.put_new(&w2).await.unwrap();
    run(vec![w2.clone()], now).await;
    let after_wait =
        now.plus_secs(bridge_core::delivery::pipeline::REFUND_WAIT.as_secs() as i64 + 5);
    run(vec![late.clone()], after_wait).await;
    assert_eq!(fake.conversions()["O-B"].value, 150.0);
    let older = refund("B", 25.0, 3);
    store.put_new(&older).await.unwrap();
    run(vec![older.clone()], after_wait).await;
    assert_eq!(
        fake.conversions()["O-B"].value,
        125.0,
        "the new total, with a later adjustment time"
    );
    assert_eq!(final_status(&older).await.0, DeliveryStatus::Delivered);
    // A redelivered refund message sends nothing; a replayed restatement is a duplicate.
    let before = fake.requests("uploadConversionAdjustments").len();
    let r = run(vec![older.clone()], after_wait).await;
    assert_eq!(r.results["m0"].as_str(), "already_delivered");
    assert_eq!(fake.requests("uploadConversionAdjustments").len(), before);
    assert_eq!(
        fake.revenue()["USD"],
        125.0,
        "A retracted, B at 200 - 50 - 25"
    );
    assert_eq!(fake.count(), 1, "a retracted conversion counts zero");
}

#[tokio::test]
async fn adjustment_before_google_has_the_conversion_is_retried_then_dead_lettered() {
    let fake = FakeGoogle::start().await;
    let mut w = won("N", 100.0);
    // The store says delivered (e.g. by another bridge instance), but Google has no such order.
    w.destinations.get_mut(&Destination::Google).unwrap().status = DeliveryStatus::Delivered;
    let r = refund("N", 10.0, 1);
    let (store, queue) = memory(&[w, r.clone()]).await;
    let p = platform(&fake, GoogleBackend::AdsApi);
    let mut now = Timestamp::now();
    let long = PipelineConfig {
        max_attempts: 10,
        ..cfg()
    };
    for attempt in 1..=4 {
        let rep = process_batch(
            records(std::slice::from_ref(&r), "m"),
            &p,
            &store,
            &queue,
            &long,
            now,
        )
        .await;
        let (st, code) = status(&store, &r);
        assert_eq!(code, "CONVERSION_NOT_FOUND");
        if attempt < 4 {
            assert_eq!(
                (st, rep.failures.len()),
                (DeliveryStatus::Retry, 1),
                "attempt {attempt}"
            );
        } else {
            assert_eq!(
                st,
                DeliveryStatus::DeadLetter,
                "a few delayed retries, then the DLQ"
            );
        }
        now = now.plus_secs(3700);
    }
    assert_eq!(queue.dlq(Destination::Google).len(), 1);
}

#[tokio::test]
async fn data_manager_delivers_isolates_bad_events_and_restates_refunds() {
    let fake = FakeGoogle::start().await;
    let wins: Vec<_> = (0..6).map(|i| won(&format!("D{i}"), 100.0)).collect();
    fake.with(|d| d.poison.insert("O-D3".into()));
    let full = refund("D0", 100.0, 2);
    let partial = refund("D1", 40.0, 2);
    let (store, queue) =
        memory(&[wins.clone(), vec![full.clone(), partial.clone()]].concat()).await;
    let p = platform(&fake, GoogleBackend::DataManager);
    let r = run_batch(&store, &queue, &p, &wins, "w", Timestamp::now()).await;
    assert!(r.failures.is_empty(), "{r:?}");
    let ingests = fake.requests("events:ingest");
    assert_eq!(
        ingests.len(),
        1,
        "fast-fail: the named event is dropped and the rest resent"
    );
    assert_eq!(ingests[0]["events"].as_array().unwrap().len(), 5);
    assert_eq!(ingests[0]["encoding"], "HEX");
    assert_eq!(
        ingests[0]["destinations"][0]["productDestinationId"],
        "987654321"
    );
    let (st, code) = status(&store, &wins[3]);
    assert_eq!(
        (st, code.as_str()),
        (DeliveryStatus::DeadLetter, "INVALID_EVENT"),
        "the violation's reason (DM-UE), not ErrorInfo's generic INVALID_ARGUMENT"
    );
    let bad = store.get_sync(&wins[3].event_id).destinations[&Destination::Google]
        .last_error
        .clone()
        .unwrap();
    assert!(
        bad.message.contains("events[3].transaction_id"),
        "{}",
        bad.message
    );
    let s = store.get_sync(&wins[0].event_id).destinations[&Destination::Google].clone();
    assert_eq!(s.status, DeliveryStatus::Delivered);
    assert_eq!(
        s.log[0].platform_ref,
        Some(format!("requestId:{}", fake.dm_request_ids()[0])),
        "requestId kept for reconciliation"
    );
    // Data Manager processes asynchronously: nothing counts until Google has processed it.
    assert_eq!(fake.dm_count(), 0);
    fake.dm_complete_all();
    assert_eq!(fake.dm_count(), 5);

    let r = process_batch(
        records(&[full.clone(), partial.clone()], "f"),
        &p,
        &store,
        &queue,
        &cfg(),
        Timestamp::now(),
    )
    .await;
    assert!(r.failures.is_empty(), "{r:?}");
    assert_eq!(
        status(&store, &full).0,
        DeliveryStatus::RetractionUnsupported,
        "restated to zero, recorded"
    );
    assert_eq!(status(&store, &partial).0, DeliveryStatus::Delivered);
    fake.dm_complete_all();
    let conversions = fake.dm_conversions();
    let key = |o: &str| DmKey::new("1234567890", "987654321", o);
    assert_eq!(conversions[&key("O-D0")].value, Some(0.0));
    assert_eq!(
        conversions[&key("O-D1")].value,
        Some(60.0),
        "the new total, not the refunded amount"
    );
    assert_eq!(
        conversions[&key("O-D1")].ingests,
        2,
        "same transactionId: a restatement"
    );
    assert_eq!(fake.dm_count(), 5, "restatements add no conversion");
    assert_eq!(fake.dm_revenue()["USD"], 360.0, "0 + 60 + 3 x 100");
    assert!(fake.with(|d| {
        d.requests
            .iter()
            .all(|(_, b)| b.get("developer-token").is_none())
    }));
}

#[tokio::test]
async fn validate_only_dry_run_imports_nothing() {
    let fake = FakeGoogle::start().await;
    let events: Vec<_> = (0..3).map(|i| won(&format!("V{i}"), 10.0)).collect();
    for (backend, kind) in [
        (GoogleBackend::AdsApi, "uploadClickConversions"),
        (GoogleBackend::DataManager, "events:ingest"),
    ] {
        let (store, queue) = memory(&events).await;
        let p = platform_with(&fake, mapping(backend), 10_000, true);
        let r: BatchReport = run_batch(&store, &queue, &p, &events, "m", Timestamp::now()).await;
        assert!(r.failures.is_empty(), "{r:?}");
        let req = fake.requests(kind);
        assert_eq!(req.len(), 1);
        assert_eq!(req[0]["validateOnly"], true);
    }
    assert!(fake.conversions().is_empty());
    fake.dm_complete_all();
    assert_eq!(fake.dm_count(), 0);
    assert!(
        fake.dm_request_ids().is_empty(),
        "validateOnly requests have no status"
    );
}

/// The Google conversions of `order` under `action_id`: (value, retracted).
fn held(fake: &FakeGoogle, order: &str, action_id: &str) -> Option<(f64, bool)> {
    fake.conversions_by_key()
        .into_iter()
        .find(|(k, _)| {
            k.action_id == action_id
                && k.order == bridge_tests::fakes::google::OrderKey::Order(order.into())
        })
        .map(|(_, c)| (c.value, c.retracted))
}

/// One invocation of the Google sender with one message per event (ids `{tag}0`, `{tag}1`, ...).
async fn run_batch(
    store: &dyn EventStore,
    queue: &dyn DeliveryQueue,
    p: &GooglePlatform,
    evs: &[CanonicalEvent],
    tag: &str,
    at: Timestamp,
) -> BatchReport {
    process_batch(records(evs, tag), p, store, queue, &cfg(), at).await
}

/// The bundled mapping with the won stage under action `id` (click-through window 30 days).
fn won_action(id: &str, version: &str) -> Mapping {
    Mapping::load(
        &include_str!("../../infra/mapping.toml")
            .replace(
                "conversionActions/987654321\"",
                &format!("conversionActions/{id}\"\nclick_through_lookback_window_days = 30"),
            )
            .replacen("version = \"", &format!("version = \"{version}"), 1),
    )
    .unwrap()
}

#[tokio::test]
#[ignore = "needs the local AWS emulator: bash infra/local/test.sh starts it and runs this"]
async fn a_mapping_change_moves_each_order_to_the_new_action_once_and_a_replay_changes_nothing() {
    use bridge_core::correction::{CorrectionStep, apply, plan_from_store};
    let fake = FakeGoogle::start().await;
    let (_stack, store, _sqs, queue) = bridge_tests::emulated("google_correction", &[]).await;
    // The won stage moves from action 987654321 to action 555 in a new mapping version.
    let (old, new) = (won_action("987654321", ""), won_action("555", "moved-"));
    let before = platform_with(&fake, old.clone(), 10_000, false);
    let after = platform_with(&fake, new.clone(), 10_000, false);
    let now = Timestamp::now();
    let (a, b, c) = (won("MA", 100.0), won("MB", 200.0), won("MC", 300.0));
    let mut d = won("MD", 400.0);
    d.identity.click.gclid = Some("Cj0-md".into());
    let rb = refund("MB", 50.0, 20);
    for e in [&a, &b, &c, &d] {
        store.put_new(e).await.unwrap();
    }
    run_batch(
        &store,
        &queue,
        &before,
        &[a.clone(), b.clone(), c.clone(), d.clone()],
        "w",
        now,
    )
    .await;
    store.put_new(&rb).await.unwrap();
    run_batch(&store, &queue, &before, std::slice::from_ref(&rb), "r", now).await;
    assert_eq!(held(&fake, "O-MB", "987654321"), Some((150.0, false)));
    // Retention removed MC's click id: its upload could not match, so it is not retracted.
    store
        .scrub(&c.key, bridge_core::store::Scrub::ClickIds, now)
        .await
        .unwrap();

    let from = now.minus_secs(90 * 86_400);
    let period = now.plus_secs(1);
    let plan = plan_from_store(&store, &old, &new, from, period, now)
        .await
        .unwrap();
    let mut orders: Vec<&str> = plan
        .corrections
        .iter()
        .map(|p| p.order_id.as_str())
        .collect();
    orders.sort();
    assert_eq!(orders, ["O-MA", "O-MB", "O-MD"], "{plan:#?}");
    assert_eq!(plan.revenue_moved["USD"].as_f64(), 650.0);
    let mc = plan
        .not_corrected
        .iter()
        .find(|n| n.order_id.as_deref() == Some("O-MC"))
        .unwrap();
    assert!(mc.reason.contains("click id is no longer stored"), "{mc:?}");
    // Google will not find MD's click for the new upload (EVENT_NOT_FOUND).
    fake.with(|f| f.unknown_clicks.insert("Cj0-md".into()));
    let applied = apply(&plan, &store, &queue, now).await.unwrap();
    assert_eq!((applied.stored, applied.existing), (9, 0), "{applied:?}");

    // A refund arrives while the move is on its way: it waits for it.
    let rb2 = refund("MB", 20.0, 10);
    store.put_new(&rb2).await.unwrap();
    let r = run_batch(
        &store,
        &queue,
        &after,
        std::slice::from_ref(&rb2),
        "r2",
        now,
    )
    .await;
    assert_eq!(
        r.count(bridge_core::delivery::PairResult::Waiting),
        1,
        "{r:?}"
    );

    // The sender, now on the new mapping, delivers the steps in order: each waits for the one
    // before it (the refund wait), so three rounds move the orders.
    let steps: Vec<CanonicalEvent> = store
        .events_between(from, period)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.correction.is_some())
        .collect();
    assert_eq!(steps.len(), 9);
    let wait = bridge_core::delivery::pipeline::REFUND_WAIT.as_secs() as i64 + 5;
    let mut alerts = 0;
    for round in 0..3 {
        let at = now.plus_secs(round * wait);
        alerts += run_batch(&store, &queue, &after, &steps, &format!("c{round}"), at)
            .await
            .alerts;
        if round == 0 {
            assert_eq!(
                held(&fake, "O-MA", "987654321"),
                Some((100.0, true)),
                "retracted first"
            );
            assert_eq!(
                held(&fake, "O-MA", "555"),
                None,
                "uploaded only after the retraction"
            );
        }
    }
    run_batch(
        &store,
        &queue,
        &after,
        std::slice::from_ref(&rb2),
        "r2",
        now.plus_secs(3 * wait),
    )
    .await;
    let stored = |key: &str| {
        let store = &store;
        let key = key.to_string();
        async move { store.get(&key).await.unwrap().unwrap() }
    };
    for e in &steps {
        let e = stored(&e.key).await;
        let s = &e.destinations[&Destination::Google];
        let c = e.correction.as_ref().unwrap();
        assert_eq!(c.to_mapping_version, new.version);
        assert_eq!(c.from_mapping_version, old.version);
        if e.order_id.as_deref() == Some("O-MD") {
            continue;
        }
        assert_eq!(s.status, DeliveryStatus::Delivered, "{e:?}");
        let expected = if c.step == CorrectionStep::Retract {
            &c.from
        } else {
            &c.to
        };
        assert_eq!(
            s.delivered_as().unwrap(),
            expected,
            "the delivery log says what each step was sent as"
        );
    }
    // Google counts each order once, under the new action, at its net value.
    assert_eq!(held(&fake, "O-MA", "555"), Some((100.0, false)));
    assert_eq!(held(&fake, "O-MB", "987654321").map(|c| c.1), Some(true));
    assert_eq!(
        held(&fake, "O-MB", "555"),
        Some((130.0, false)),
        "both refunds carried over, the one that came during the move too"
    );
    assert_eq!(
        held(&fake, "O-MC", "987654321"),
        Some((300.0, false)),
        "left as sent"
    );
    // MD's upload failed after its retraction: nothing is silent about it. The step is in the
    // dead-letter queue with an alert, and the plan says to redrive it.
    let md: Vec<CanonicalEvent> = steps
        .iter()
        .filter(|e| e.order_id.as_deref() == Some("O-MD"))
        .cloned()
        .collect();
    let upload = md
        .iter()
        .find(|e| e.correction.as_ref().unwrap().step == CorrectionStep::Upload)
        .unwrap();
    let state = stored(&upload.key).await.destinations[&Destination::Google].clone();
    assert_eq!(state.status, DeliveryStatus::DeadLetter, "{state:?}");
    assert_eq!(state.last_error.as_ref().unwrap().code, "EVENT_NOT_FOUND");
    assert!(alerts >= 1);
    assert_eq!(held(&fake, "O-MD", "987654321"), Some((400.0, true)));
    assert_eq!(held(&fake, "O-MD", "555"), None);
    let stuck = plan_from_store(&store, &old, &new, from, period, now)
        .await
        .unwrap();
    let why = stuck
        .not_corrected
        .iter()
        .find(|n| n.order_id.as_deref() == Some("O-MD"))
        .unwrap();
    assert!(why.reason.contains("redrive"), "{why:?}");
    // Fixed (Google finds the click now) and redriven from the console: the move completes.
    fake.with(|f| f.unknown_clicks.remove("Cj0-md"));
    let redriven = Record {
        message_id: "dlq-md".into(),
        receipt: "r-dlq-md".into(),
        body: DeliveryMessage {
            redrive_of: Some(state.attempts),
            ..DeliveryMessage::new(&upload.key, Destination::Google)
        }
        .to_body(),
        attributes: Default::default(),
    };
    process_batch(
        vec![redriven],
        &after,
        &store,
        &queue,
        &cfg(),
        now.plus_secs(3 * wait),
    )
    .await;
    run_batch(&store, &queue, &after, &md, "md", now.plus_secs(5 * wait)).await;
    assert_eq!(held(&fake, "O-MD", "555"), Some((400.0, false)));
    assert_eq!(fake.count(), 4);
    assert_eq!(fake.revenue()["USD"], 100.0 + 130.0 + 300.0 + 400.0);

    // A replay of the whole correction: the plan finds nothing to do, applying the old plan
    // again stores nothing, and redelivered messages send nothing.
    let requests = |fake: &FakeGoogle| {
        fake.requests("uploadClickConversions").len()
            + fake.requests("uploadConversionAdjustments").len()
    };
    let sent = requests(&fake);
    let again = plan_from_store(&store, &old, &new, from, period, now)
        .await
        .unwrap();
    assert!(again.corrections.is_empty(), "{again:#?}");
    assert_eq!(again.unchanged[&Destination::Google], 3);
    let reapplied = apply(&plan, &store, &queue, now).await.unwrap();
    assert_eq!((reapplied.stored, reapplied.existing), (0, 9));
    let r = run_batch(&store, &queue, &after, &steps, "x", now.plus_secs(6 * wait)).await;
    assert_eq!(
        r.count(bridge_core::delivery::PairResult::AlreadyDelivered),
        9,
        "{r:?}"
    );
    assert_eq!(requests(&fake), sent);
    // Sent again as if the first answers were lost (a sender crashed after sending): Google
    // answers each step of MA's move as a replay and counts nothing new.
    {
        use bridge_core::delivery::pipeline::Platform;
        let order = store.find_by_order("O-MA").await.unwrap();
        for step in order.iter().filter(|e| e.correction.is_some()) {
            let (group, item) = after
                .prepare(step, &order, now.plus_secs(6 * wait))
                .unwrap();
            let out = after
                .send(&group, &[item], bridge_core::delivery::Limits::DEFAULT)
                .await;
            assert!(
                matches!(
                    out[0],
                    bridge_core::delivery::Outcome::Delivered { replay: true, .. }
                ),
                "{:?}: {out:?}",
                step.correction
            );
        }
        assert_eq!(fake.count(), 4);
        assert_eq!(fake.revenue()["USD"], 100.0 + 130.0 + 300.0 + 400.0);
    }

    // A refund after the move restates the conversion that counts, under the new action.
    let ra = refund("MA", 30.0, 1);
    store.put_new(&ra).await.unwrap();
    run_batch(
        &store,
        &queue,
        &after,
        std::slice::from_ref(&ra),
        "ra",
        now.plus_secs(6 * wait),
    )
    .await;
    assert_eq!(held(&fake, "O-MA", "555"), Some((70.0, false)));
    assert_eq!(fake.revenue()["USD"], 70.0 + 130.0 + 300.0 + 400.0);

    // The reconciliation report shows the corrections apart from the CRM's revenue.
    let events = store.events_between(from, period).await.unwrap();
    let report = bridge_core::reconcile::build_report(
        "correction",
        from,
        period,
        now,
        &events,
        &Default::default(),
    );
    let g = &report.destinations["google"];
    assert_eq!(g.corrections["retract"]["delivered"], 3);
    assert_eq!(g.corrections["upload"]["delivered"], 3);
    assert_eq!(g.corrections["restate"]["delivered"], 3);
    assert_eq!(g.currencies["USD"].crm_revenue, "900.00");
    assert_eq!(g.currencies["USD"].delivered_revenue, "900.00");
    assert_eq!(
        report.events, 7,
        "four wons and three refunds; corrections are not CRM events"
    );
    assert!(
        report
            .to_csv()
            .contains("correction,google,correction,retract,delivered,3\n"),
        "{}",
        report.to_csv()
    );
}

/// A customer without enhanced conversions for leads turned on: a lead matched on hashed email
/// without a click id is refused (G-ERR-UP #50), a configuration error for a person: dead
/// letter and an alert, while the won with a click id in the same request is delivered.
/// The Ads API's account, action and click configuration codes, each triggered the way Google
/// documents it (google-ads-python v25 conversion_upload_error.py), reach a person as an alert
/// on the row that caused it, while the rest of the batch delivers.
#[tokio::test]
async fn account_action_and_click_configuration_codes_alert_on_their_own_rows() {
    let fake = FakeGoogle::start().await;
    fake.with(|d| {
        // #46: the won action counts one conversion per click and refuses braids.
        d.one_per_click_actions.insert("987654321".into());
        // #30 and #8: clicks of another account, one the login can reach, one it cannot.
        d.click_accounts
            .insert("G-OTHER".into(), ("2222222222".into(), true));
        d.click_accounts
            .insert("G-FOREIGN".into(), ("3333333333".into(), false));
    });
    let mut braid = won("CFG-1", 10.0);
    braid.identity.click.gclid = None;
    braid.identity.click.gbraid = Some("B-1".into());
    let mut other = won("CFG-2", 10.0);
    other.identity.click.gclid = Some("G-OTHER".into());
    let mut foreign = won("CFG-3", 10.0);
    foreign.identity.click.gclid = Some("G-FOREIGN".into());
    let fine = won("CFG-4", 10.0);
    let events = [braid.clone(), other.clone(), foreign.clone(), fine.clone()];
    let p = platform(&fake, GoogleBackend::AdsApi);
    let (store, _, r) = deliver(&events, &p).await;
    for (e, code) in [
        (
            &braid,
            "ONE_PER_CLICK_CONVERSION_ACTION_NOT_PERMITTED_WITH_BRAID",
        ),
        (&other, "INVALID_CUSTOMER_FOR_CLICK"),
        (&foreign, "UNAUTHORIZED_CUSTOMER"),
    ] {
        assert_eq!(status(&store, e), (DeliveryStatus::DeadLetter, code.into()));
    }
    assert_eq!(r.alerts, 3, "{r:?}");
    assert_eq!(status(&store, &fine).0, DeliveryStatus::Delivered);
    assert_eq!(fake.count(), 1);
    assert_eq!(
        fake.requests("uploadClickConversions").len(),
        1,
        "no row is sent twice"
    );

    // #47: Google's customer data policies prohibit enhanced conversions in the account.
    fake.with(|d| d.ec_prohibited.insert("1234567890".into()));
    let prohibited = won("CFG-5", 10.0);
    let events = [prohibited.clone()];
    let (store, _, r) = deliver(&events, &p).await;
    assert_eq!(
        status(&store, &prohibited),
        (
            DeliveryStatus::DeadLetter,
            "CUSTOMER_DATA_POLICY_PROHIBITS_ENHANCED_CONVERSIONS".into()
        )
    );
    assert_eq!(r.alerts, 1, "{r:?}");
}

#[tokio::test]
async fn leads_without_enhanced_conversions_for_leads_turned_on_alert() {
    let fake = FakeGoogle::start().await;
    fake.with(|d| d.ec_for_leads_disabled.insert("1234567890".into()));
    let mut lead = sample_event("EC-1", "sql", None, None, &hours_ago(30));
    lead.identity.click.gclid = None;
    let w = won("EC-2", 10.0);
    let events = [lead.clone(), w.clone()];
    let p = platform(&fake, GoogleBackend::AdsApi);
    let (store, _, r) = deliver(&events, &p).await;
    assert_eq!(
        status(&store, &lead),
        (
            DeliveryStatus::DeadLetter,
            "CUSTOMER_NOT_ENABLED_ENHANCED_CONVERSIONS_FOR_LEADS".into()
        )
    );
    assert_eq!(r.alerts, 1, "{r:?}");
    assert_eq!(status(&store, &w).0, DeliveryStatus::Delivered);
    assert_eq!(fake.count(), 1);
}

/// A credentials parameter whose JSON is not Google's credentials (read at the first send, as
/// the sender Lambda reads it) is a configuration error: no token request, no upload, one
/// alert, and every pair dead-lettered with the reason, for an operator to fix and redrive.
#[tokio::test]
async fn credentials_that_do_not_parse_send_nothing_and_dead_letter_every_pair_with_one_alert() {
    let fake = FakeGoogle::start().await;
    let json = "{\"client_id\": \"only\"}".to_string();
    let credentials = Deferred::read(move || {
        let json = json.clone();
        async move {
            GoogleCredentials::from_json(&json).map_err(|e| ReadError {
                message: format!("SSM parameter /bridge/google: {e}"),
                permanent: true,
            })
        }
    });
    let p = GooglePlatform::new(
        bridge_platforms::http::client().expect("HTTP client"),
        GoogleConfig {
            credentials,
            ..platform_config(&fake)
        },
        mapping(GoogleBackend::AdsApi),
    );
    let events: Vec<_> = (0..50).map(|i| won(&format!("K{i}"), 10.0)).collect();
    let (store, queue, r) = deliver(&events, &p).await;
    assert_eq!(r.alerts, 1, "{r:?}");
    assert!(fake.requests("uploadClickConversions").is_empty());
    assert_eq!(fake.count(), 0);
    for e in [&events[0], &events[49]] {
        assert_eq!(
            status(&store, e),
            (DeliveryStatus::DeadLetter, "credentials_unavailable".into())
        );
    }
    assert_eq!(queue.dlq(Destination::Google).len(), 50);
}
