//! Unit tests of reading, validating and identifying events.

use super::*;
use crate::consent::{ConsentOrigin, ConsentStatus};
use crate::hashing::sha256_hex;
use serde_json::Value;
use serde_json::json;

fn ctx() -> ValidationContext {
    ValidationContext {
        now: Timestamp::parse_rfc3339("2026-11-28T12:00:00Z").unwrap(),
        max_future_skew_secs: 300,
        default_region: phonenumber::country::Id::US,
        mapping_version: "test-1".into(),
        default_consent: ConsentStatus::Unknown,
    }
}

fn won() -> Value {
    json!({
        "source": "hubspot", "event_name": "won", "occurred_at": "2026-11-27T10:00:00-05:00",
        "entity_type": "opportunity", "entity_id": "D-1", "order_id": "ORD-1",
        "value": 1200.5, "currency": "usd",
        "identity": {"email": " Jane@Example.com ", "phone": "+1 650 555 1234", "gclid": "abc"},
        "consent": {"status": "granted", "basis": "consent"}
    })
}

/// Validates through both readers and checks they agree.
fn check(v: Value) -> Result<CanonicalEvent, Vec<FieldError>> {
    let slow = parse_event(&v).and_then(|i| validate(&i, &ctx()));
    let fast = parse_event_json(&v.to_string()).and_then(|i| validate(&i, &ctx()));
    assert_eq!(
        fast, slow,
        "the typed fast path and the field reader disagree"
    );
    slow
}

#[test]
fn malformed_json_is_named() {
    let errs = parse_event_json("{\"source\": ").unwrap_err();
    assert_eq!(errs[0].field, "$");
    assert!(errs[0].reason.starts_with("not valid JSON"));
}

fn fields(r: Result<CanonicalEvent, Vec<FieldError>>) -> Vec<String> {
    r.unwrap_err().into_iter().map(|e| e.field).collect()
}

#[test]
fn golden_event_ids() {
    // Pinned forever: these values are what platforms deduplicate on.
    let at = Timestamp::parse_rfc3339("2026-11-27T15:00:00Z").unwrap();
    let won = derive_event_id(
        "hubspot",
        EventName::Won,
        EntityType::Opportunity,
        "D-1",
        at,
        Some("ORD-1"),
    );
    assert_eq!(
        won,
        sha256_hex("hubspot|won|opportunity|D-1|2026-11-27T15:00:00.000Z|ORD-1")
    );
    let lead = derive_event_id(
        "generic",
        EventName::Lead,
        EntityType::Lead,
        "L-9",
        at,
        Some("ignored"),
    );
    assert_eq!(
        lead,
        sha256_hex("generic|lead|lead|L-9|2026-11-27T15:00:00.000Z")
    );
    assert_eq!(won, GOLDEN_WON);
    assert_eq!(lead, GOLDEN_LEAD);
}

const GOLDEN_WON: &str = "18ff468d4ac155defd58864b47fc0d1d845dd510ad5cbe4c8148a92845e28d80";
const GOLDEN_LEAD: &str = "0da9d7a395838935e81e5d1db8ad094b916960b0c8c3dac344cffec4fd2050ad";

#[test]
fn valid_won_event() {
    let e = check(won()).unwrap();
    assert_eq!(e.event_name, EventName::Won);
    assert_eq!(e.currency.as_deref(), Some("USD"));
    assert_eq!(e.value, Money::from_f64(1200.5));
    assert_eq!(e.occurred_at.canonical(), "2026-11-27T15:00:00.000Z");
    assert_eq!(e.event_id_origin, EventIdOrigin::Derived);
    assert_eq!(e.event_id, GOLDEN_WON);
    assert_eq!(e.identity.meta.em, Some(sha256_hex("jane@example.com")));
    assert_eq!(e.consent.status, ConsentStatus::Granted);
    assert_eq!(e.consent.origin, ConsentOrigin::Payload);
    assert_eq!(e.mapping_version, "test-1");
}

#[test]
fn same_instant_written_two_ways_gives_one_id() {
    let mut other = won();
    other["occurred_at"] = json!("2026-11-27T15:00:00.000Z");
    assert_eq!(
        check(won()).unwrap().event_id,
        check(other).unwrap().event_id
    );
}

#[test]
fn provided_event_id_is_kept() {
    let mut v = won();
    v["event_id"] = json!("pixel-evt-42");
    let e = check(v).unwrap();
    assert_eq!(e.event_id, "pixel-evt-42");
    assert_eq!(e.event_id_origin, EventIdOrigin::Provided);
}

#[test]
fn every_problem_is_reported_at_once() {
    let v = json!({
        "source": "Hub Spot", "event_name": "closed", "occurred_at": "yesterday",
        "entity_type": "deal", "value": -5, "currency": "dollars", "bogus": 1,
        "consent": {"status": "maybe", "ad_user_data": "yes"}
    });
    let got = fields(check(v));
    assert_eq!(got, ["bogus"], "unknown fields are caught while parsing");
    let v = json!({
        "source": "Hub Spot", "event_name": "closed", "occurred_at": "yesterday",
        "entity_type": "deal", "value": -5, "currency": "dollars",
        "consent": {"status": "maybe", "ad_user_data": "yes"}
    });
    let got = fields(check(v));
    assert_eq!(
        got,
        [
            "source",
            "event_name",
            "occurred_at",
            "entity_type",
            "entity_id",
            "value",
            "currency",
            "consent.status",
            "consent.ad_user_data"
        ]
    );
}

#[test]
fn won_needs_order_value_currency() {
    let v = json!({"source": "hubspot", "event_name": "won", "occurred_at": "2026-11-27T10:00:00Z",
        "entity_type": "opportunity", "entity_id": "D-1"});
    assert_eq!(fields(check(v)), ["order_id", "value", "currency"]);
}

#[test]
fn refund_needs_positive_value() {
    let mut v = won();
    v["event_name"] = json!("refund");
    v["value"] = json!(0);
    let errs = check(v).unwrap_err();
    assert_eq!(errs[0].field, "value");
    assert!(errs[0].reason.contains("positive"));
}

#[test]
fn future_beyond_skew_is_rejected_within_skew_accepted() {
    let mut v = won();
    v["occurred_at"] = json!("2026-11-28T12:04:00Z");
    assert!(check(v.clone()).is_ok());
    v["occurred_at"] = json!("2026-11-28T12:06:00Z");
    assert_eq!(fields(check(v)), ["occurred_at"]);
}

#[test]
fn wrong_types_name_their_fields() {
    let v = json!({"source": "x", "event_name": "lead", "occurred_at": "2026-11-27T10:00:00Z",
        "entity_type": "lead", "entity_id": 42, "value": "12", "identity": {"email": ["a"]}, "consent": "yes"});
    assert_eq!(fields(check(v)), ["value", "identity.email", "consent"]);
    assert_eq!(fields(check(json!([1]))), ["$"]);
}

#[test]
fn numeric_ids_are_accepted_as_text() {
    let v = json!({"source": "x", "event_name": "lead", "occurred_at": "2026-11-27T10:00:00Z",
        "entity_type": "lead", "entity_id": 42});
    assert_eq!(check(v).unwrap().entity_id, "42");
}

#[test]
fn missing_consent_uses_the_default_and_says_so() {
    let mut v = won();
    v.as_object_mut().unwrap().remove("consent");
    let e = check(v).unwrap();
    assert_eq!(e.consent.status, ConsentStatus::Unknown);
    assert_eq!(e.consent.origin, ConsentOrigin::SourceDefault);
}

#[test]
fn bad_identity_is_a_warning_not_an_error() {
    let mut v = won();
    v["identity"]["phone"] = json!("123");
    let e = check(v).unwrap();
    assert_eq!(e.warnings.len(), 1);
    assert_eq!(e.warnings[0].field, "identity.phone");
    assert!(e.identity.meta.ph.is_none());
}

#[test]
fn stored_form_round_trips_and_holds_no_raw_pii() {
    let e = check(won()).unwrap();
    let text = serde_json::to_string(&e).unwrap();
    assert!(!text.to_lowercase().contains("jane@example.com"));
    assert!(!text.contains("650"));
    let back: CanonicalEvent = serde_json::from_str(&text).unwrap();
    assert_eq!(back, e);
}

#[test]
fn no_input_can_claim_to_be_a_correction() {
    // Corrections are the operator's command's own events: a webhook naming one is refused.
    let mut v = won();
    v["event_name"] = json!("correction");
    let errs = check(v).unwrap_err();
    assert_eq!(errs[0].field, "event_name");
    assert!(errs[0].reason.contains("must be one of"), "{errs:?}");
    assert!(!EventName::ALL.contains(&EventName::Correction));
}
