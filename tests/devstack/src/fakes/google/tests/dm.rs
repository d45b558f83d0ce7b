//! The fake Data Manager API: asynchronous processing, request ids, merging by transactionId,
//! the error shape and the account configuration errors.

use super::{CUSTOMER, Client, hash};
use crate::fakes::Clock;
use crate::fakes::google::{DmKey, EcTermsCheck, FakeGoogle};
use bridge_core::timestamp::Timestamp;
use serde_json::{Value, json};
use std::time::Duration;

const ACTION: &str = "987654321";

fn event(txn: &str, value: f64, currency: &str) -> Value {
    json!({"destinationReferences": ["d0"], "transactionId": txn, "eventTimestamp": Timestamp::now().minus_secs(86_400).canonical(),
        "eventSource": "OTHER", "conversionValue": value, "currency": currency, "adIdentifiers": {"gclid": "G-1"},
        "consent": {"adUserData": "CONSENT_GRANTED"}})
}

fn with_email(mut e: Value) -> Value {
    e["userData"] = json!({"userIdentifiers": [{"emailAddress": hash("ada@example.com")}]});
    e
}

fn request(events: Vec<Value>) -> Value {
    json!({"destinations": [{"reference": "d0", "operatingAccount": {"accountType": "GOOGLE_ADS", "accountId": CUSTOMER},
        "productDestinationId": ACTION}], "events": events, "encoding": "HEX"})
}

fn key(txn: &str) -> DmKey {
    DmKey::new(CUSTOMER, ACTION, txn)
}

fn violations(v: &Value) -> Vec<(String, String)> {
    v["error"]["details"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["@type"] == "type.googleapis.com/google.rpc.BadRequest")
        .flat_map(|d| d["fieldViolations"].as_array().cloned().unwrap_or_default())
        .map(|f| {
            (
                f["field"].as_str().unwrap_or_default().to_string(),
                f["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn processing_is_asynchronous_and_only_processed_records_count() {
    let fake = FakeGoogle::start().await;
    let c = Client::new(&fake).await;
    fake.dm_fail("T-2", "PROCESSING_ERROR_REASON_CLICK_NOT_FOUND");
    let (s, b) = c
        .ingest(request(vec![
            event("T-1", 10.0, "USD"),
            event("T-2", 20.0, "USD"),
            event("T-3", 30.0, "USD"),
        ]))
        .await;
    assert_eq!(s, 200, "{b}");
    let id = b["requestId"].as_str().unwrap_or_default().to_string();
    assert!(
        id.contains('+') && id.contains('/') && id.contains('='),
        "{id}"
    );
    assert_eq!(fake.dm_count(), 0, "nothing counted before processing");
    let (s, b) = c.status(&id, true).await;
    let entry = &b["requestStatusPerDestination"][0];
    assert_eq!(
        (s, entry["requestStatus"].as_str()),
        (200, Some("PROCESSING")),
        "{b}"
    );
    assert!(entry.get("errorInfo").is_none());
    assert_eq!(entry["destination"]["reference"], "d0");
    let (_, b) = c.status(&id, true).await;
    let entry = &b["requestStatusPerDestination"][0];
    assert_eq!(entry["requestStatus"], "PARTIAL_SUCCESS");
    assert_eq!(entry["eventsIngestionStatus"]["recordCount"], "3");
    assert_eq!(
        entry["errorInfo"]["errorCounts"],
        json!([{"recordCount": "1", "reason": "PROCESSING_ERROR_REASON_CLICK_NOT_FOUND"}])
    );
    assert_eq!(fake.dm_count(), 2);
    assert_eq!(fake.dm_revenue()["USD"], 40.0);
    // A client that does not URL-encode the id asks for another id.
    let (s, b) = c.status(&id, false).await;
    assert_eq!(
        (s, violations(&b)),
        (
            400,
            vec![("request_id".to_string(), "INVALID_REQUEST_ID".to_string())]
        )
    );
    // validateOnly requests have no status.
    let mut dry = request(vec![event("T-4", 1.0, "USD")]);
    dry["validateOnly"] = json!(true);
    let (_, b) = c.ingest(dry).await;
    let (s, b) = c
        .status(b["requestId"].as_str().unwrap_or_default(), true)
        .await;
    assert_eq!(
        (s, violations(&b)[0].1.as_str()),
        (400, "INVALID_REQUEST_ID")
    );
    // All records failing: FAILED.
    fake.dm_fail("T-5", "PROCESSING_ERROR_REASON_EVENT_TOO_OLD");
    let (_, b) = c.ingest(request(vec![event("T-5", 1.0, "USD")])).await;
    fake.dm_complete_all();
    let (_, b) = c
        .status(b["requestId"].as_str().unwrap_or_default(), true)
        .await;
    assert_eq!(
        b["requestStatusPerDestination"][0]["requestStatus"],
        "FAILED"
    );
}

#[tokio::test]
async fn a_matching_transaction_id_restates_value_and_currency_only() {
    let fake = FakeGoogle::start().await;
    let c = Client::new(&fake).await;
    assert_eq!(
        c.ingest(request(vec![event("T-1", 100.0, "USD")])).await.0,
        200
    );
    fake.dm_complete_all();
    let mut again = with_email(event("T-1", 60.0, "EUR"));
    again["adIdentifiers"]["gclid"] = json!("G-other");
    assert_eq!(
        c.ingest(request(vec![again, event("T-9", 5.0, "USD")]))
            .await
            .0,
        200
    );
    fake.dm_complete_all();
    let conv = fake.dm_conversions();
    let t1 = &conv[&key("T-1")];
    assert_eq!(
        (t1.value, t1.currency.as_deref(), t1.ingests),
        (Some(60.0), Some("EUR"), 2)
    );
    assert_eq!(
        t1.event["adIdentifiers"]["gclid"], "G-1",
        "other fields unchanged"
    );
    assert!(
        t1.event.get("userData").is_some(),
        "user data added: the original had none"
    );
    assert_eq!(fake.dm_count(), 2, "an adjustment adds no conversion");
    assert_eq!(
        fake.dm_revenue(),
        [("EUR".to_string(), 60.0), ("USD".to_string(), 5.0)].into()
    );
}

#[tokio::test]
async fn errors_carry_documented_paths_and_reasons() {
    let fake = FakeGoogle::start().await;
    let c = Client::new(&fake).await;
    let mut bad = event("T-1", 1.0, "USD");
    bad["userData"] = json!({"userIdentifiers": [{"emailAddress": hash("a@example.com")}, {"phoneNumber": "zz"}]});
    let (s, b) = c.ingest(request(vec![bad, event("T-2", 1.0, "usd")])).await;
    assert_eq!(s, 400);
    assert_eq!(b["error"]["status"], "INVALID_ARGUMENT");
    assert_eq!(b["error"]["details"][0]["reason"], "INVALID_ARGUMENT");
    assert_eq!(
        b["error"]["details"][1]["@type"],
        "type.googleapis.com/google.rpc.RequestInfo"
    );
    assert_eq!(
        violations(&b),
        [
            (
                "events.events[0].user_data.user_identifiers[1]".to_string(),
                "INVALID_HEX_ENCODING".to_string()
            ),
            (
                "events.events[1].currency".to_string(),
                "INVALID_CURRENCY_CODE".to_string()
            ),
        ]
    );
    let address = |postal: &str| {
        let mut e = event("T-3", 1.0, "USD");
        e["userData"] = json!({"userIdentifiers": [{"address": {"givenName": hash("ada"), "familyName": hash("lovelace"), "regionCode": "US", "postalCode": postal}}]});
        e
    };
    assert_eq!(
        c.ingest(request(vec![address("94043-1351")])).await.0,
        200,
        "ZIP+4"
    );
    let (_, b) = c.ingest(request(vec![address("9404")])).await;
    assert_eq!(violations(&b)[0].1, "INVALID_POSTAL_CODE");
    let mut none = event("T-4", 1.0, "USD");
    none["adIdentifiers"] = json!({});
    assert_eq!(
        violations(&c.ingest(request(vec![none])).await.1),
        [(
            "events.events[0]".to_string(),
            "NO_IDENTIFIERS_PROVIDED".to_string()
        )]
    );
}

#[tokio::test]
async fn account_configuration_errors() {
    let fake = FakeGoogle::start().await;
    let c = Client::new(&fake).await;
    fake.dm_account(CUSTOMER, |a| a.ec_terms_signed = false);
    let (s, b) = c
        .ingest(request(vec![with_email(event("T-1", 1.0, "USD"))]))
        .await;
    assert_eq!(
        (s, violations(&b)[0].1.as_str()),
        (
            400,
            "DESTINATION_ACCOUNT_ENHANCED_CONVERSIONS_TERMS_NOT_SIGNED"
        )
    );
    assert_eq!(
        c.ingest(request(vec![event("T-2", 1.0, "USD")])).await.0,
        200,
        "click-only events pass"
    );
    fake.dm_account(CUSTOMER, |a| a.ec_terms_check = EcTermsCheck::Async);
    let (_, b) = c
        .ingest(request(vec![with_email(event("T-3", 1.0, "USD"))]))
        .await;
    fake.dm_complete_all();
    let (_, b) = c
        .status(b["requestId"].as_str().unwrap_or_default(), true)
        .await;
    assert_eq!(
        b["requestStatusPerDestination"][0]["errorInfo"]["errorCounts"][0]["reason"],
        "PROCESSING_ERROR_REASON_DESTINATION_ACCOUNT_ENHANCED_CONVERSIONS_TERMS_NOT_SIGNED"
    );
    fake.add_conversion_action("1", "UPLOAD_CLICKS");
    let (_, b) = c.ingest(request(vec![event("T-4", 1.0, "USD")])).await;
    assert_eq!(
        violations(&b),
        [(
            "destinations[0].product_destination_id".to_string(),
            "INVALID_CONVERSION_ACTION_ID".to_string()
        )]
    );
    fake.add_conversion_action(ACTION, "UPLOAD_CLICKS");
    fake.dm_account(CUSTOMER, |a| a.allowlisted = false);
    let (s, b) = c.ingest(request(vec![event("T-5", 1.0, "USD")])).await;
    assert_eq!(
        (s, &b["error"]["details"][0]["reason"]),
        (403, &json!("NOT_ALLOWLISTED"))
    );
    fake.dm_account(CUSTOMER, |a| a.reachable = false);
    let (s, b) = c.ingest(request(vec![event("T-6", 1.0, "USD")])).await;
    assert_eq!(
        (s, &b["error"]["details"][0]["reason"]),
        (403, &json!("PERMISSION_DENIED"))
    );
}

#[tokio::test]
async fn a_processing_delay_runs_on_the_fakes_clock() {
    let fake = FakeGoogle::start().await;
    let clock = Clock::virtual_at(Timestamp::now());
    fake.set_clock(clock.clone());
    fake.with(|d| {
        d.dm_processing_polls = 0;
        d.dm_processing_delay = Duration::from_secs(30 * 60);
    });
    let c = Client::new(&fake).await;
    let (_, b) = c.ingest(request(vec![event("T-1", 1.0, "USD")])).await;
    let id = b["requestId"].as_str().unwrap_or_default().to_string();
    assert_eq!(
        c.status(&id, true).await.1["requestStatusPerDestination"][0]["requestStatus"],
        "PROCESSING"
    );
    assert_eq!(fake.dm_pending(), 1);
    clock.advance(Duration::from_secs(31 * 60));
    assert_eq!(
        c.status(&id, true).await.1["requestStatusPerDestination"][0]["requestStatus"],
        "SUCCESS"
    );
    assert_eq!(fake.dm_count(), 1);
}
