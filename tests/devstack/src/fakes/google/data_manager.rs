//! `POST /v1/events:ingest` in the fake Data Manager API: fast-fail validation in the
//! documented error shape (paths `events.events[i]...`, a reason per field violation), the
//! per-account configuration errors, and a pending job per accepted request (processed
//! asynchronously by `dm_processing`).

use super::dm_processing::{DmJob, DmJobDestination, EcTermsCheck};
use super::oauth::{DATAMANAGER_SCOPE, authorized};
use super::shared::{lock, parse, rpc_error};
use super::{Data, FakeGoogle};
use crate::fakes::{Fault, Reply};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashSet;

/// One BadRequest.FieldViolation (source: DM-UE: `field`, `description`, `reason` ErrorReason).
#[derive(Clone, Debug)]
pub(super) struct Violation {
    pub field: String,
    pub description: String,
    pub reason: &'static str,
}

fn violation(field: impl Into<String>, reason: &'static str, description: &str) -> Violation {
    Violation {
        field: field.into(),
        description: description.into(),
        reason,
    }
}

/// The understand-errors guide's INVALID_ARGUMENT error: ErrorInfo (reason INVALID_ARGUMENT),
/// RequestInfo and BadRequest (source: DM-UE sample 1).
pub(super) fn bad_request(violations: &[Violation], request_id: &str) -> Reply {
    let fv: Vec<Value> = violations
        .iter()
        .map(|v| json!({"field": v.field, "description": v.description, "reason": v.reason}))
        .collect();
    rpc_error(
        StatusCode::BAD_REQUEST,
        "INVALID_ARGUMENT",
        "There was a problem with the request.",
        vec![
            json!({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "INVALID_ARGUMENT",
                   "domain": "datamanager.googleapis.com", "metadata": {"requestId": request_id}}),
            json!({"@type": "type.googleapis.com/google.rpc.RequestInfo", "requestId": request_id}),
            json!({"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": fv}),
        ],
    )
}

/// A 403 whose ErrorInfo reason is an ErrorReason (source: DM-UE PERMISSION_DENIED sample, ErrorInfo
/// carries the reason; DM-ERRENUM for the reason names).
pub(super) fn permission_denied(reason: &str, message: &str, request_id: &str) -> Reply {
    rpc_error(
        StatusCode::FORBIDDEN,
        "PERMISSION_DENIED",
        message,
        vec![
            json!({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
                   "domain": "datamanager.googleapis.com", "metadata": {"requestId": request_id}}),
            json!({"@type": "type.googleapis.com/google.rpc.RequestInfo", "requestId": request_id}),
        ],
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Account {
    account_type: Option<String>,
    account_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Destination {
    reference: Option<String>,
    operating_account: Option<Account>,
    login_account: Option<Account>,
    linked_account: Option<Account>,
    product_destination_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Consent {
    pub ad_user_data: Option<String>,
    pub ad_personalization: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AdIdentifiers {
    gclid: Option<String>,
    gbraid: Option<String>,
    wbraid: Option<String>,
    session_attributes: Option<String>,
    landing_page_device_info: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Address {
    given_name: Option<String>,
    family_name: Option<String>,
    region_code: Option<String>,
    postal_code: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Identifier {
    email_address: Option<String>,
    phone_number: Option<String>,
    address: Option<Address>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct UserData {
    #[serde(default)]
    user_identifiers: Vec<Identifier>,
}

/// Event (source: DM-PROTO `event.proto`; DM-EVT). Valid optional fields are taken and ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Event {
    destination_references: Option<Vec<String>>,
    transaction_id: Option<String>,
    event_timestamp: Option<String>,
    last_updated_timestamp: Option<String>,
    event_source: Option<String>,
    conversion_value: Option<f64>,
    currency: Option<String>,
    consent: Option<Consent>,
    ad_identifiers: Option<AdIdentifiers>,
    user_data: Option<UserData>,
    event_device_info: Option<Value>,
    cart_data: Option<Value>,
    custom_variables: Option<Value>,
    experimental_fields: Option<Value>,
    user_properties: Option<Value>,
    additional_event_parameters: Option<Value>,
    event_name: Option<String>,
    client_id: Option<String>,
    user_id: Option<String>,
}

/// IngestEventsRequest (source: DM-SVC, google-data-manager.md).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Ingest {
    #[serde(default)]
    destinations: Vec<Destination>,
    #[serde(default)]
    events: Vec<Event>,
    validate_only: Option<bool>,
    encoding: Option<String>,
    consent: Option<Consent>,
    encryption_info: Option<Value>,
}

// source: google-data-manager.md (consent values); DM-EVT ConsentStatus
const CONSENT_VALUES: &[&str] = &[
    "CONSENT_GRANTED",
    "CONSENT_DENIED",
    "CONSENT_STATUS_UNSPECIFIED",
];

fn account_ok(a: &Account, path: &str) -> Option<Violation> {
    // source: google-data-manager.md (`{accountType: "GOOGLE_ADS", accountId}`)
    match a.account_type.as_deref() {
        None => {
            return Some(violation(
                format!("{path}.account_type"),
                "REQUIRED_FIELD_MISSING",
                "account_type is required",
            ));
        }
        Some("GOOGLE_ADS") => {}
        // the fake serves Google Ads destinations only
        Some(_) => {
            return Some(violation(
                format!("{path}.account_type"),
                "INVALID_DESTINATION",
                "this fake serves GOOGLE_ADS accounts only",
            ));
        }
    }
    // source: DM-UE sample 1 (`destinations[0].login_account.account_id`, "String is not a valid
    // number.", INVALID_NUMBER_FORMAT); google-ads-api.md (10-digit customer ids)
    match a.account_id.as_deref() {
        Some(id) if id.len() == 10 && id.bytes().all(|b| b.is_ascii_digit()) => None,
        _ => Some(violation(
            format!("{path}.account_id"),
            "INVALID_NUMBER_FORMAT",
            "String is not a valid number.",
        )),
    }
}

fn check_destinations(d: &Data, dests: &[Destination]) -> Vec<Violation> {
    // source: DM-LIM, DM-SVC (1 to 10 destinations); DM-ERRENUM TOO_MANY_DESTINATIONS
    if dests.is_empty() {
        return vec![violation(
            "destinations",
            "REQUIRED_FIELD_MISSING",
            "at least one destination is required",
        )];
    }
    if dests.len() > 10 {
        return vec![violation(
            "destinations",
            "TOO_MANY_DESTINATIONS",
            "Maximum number of destinations allowed per request is 10.",
        )];
    }
    let mut out = Vec::new();
    let mut refs = HashSet::new();
    for (i, dst) in dests.iter().enumerate() {
        let path = format!("destinations[{i}]");
        let _ = &dst.linked_account;
        // source: google-data-manager.md ("operatingAccount must own the conversion action"):
        // a Google Ads destination names its operating account.
        let op = match &dst.operating_account {
            Some(a) => account_ok(a, &format!("{path}.operating_account")),
            None => Some(violation(
                format!("{path}.operating_account"),
                "REQUIRED_FIELD_MISSING",
                "operating_account is required",
            )),
        };
        let login = dst
            .login_account
            .as_ref()
            .and_then(|a| account_ok(a, &format!("{path}.login_account")));
        // source: DM-PROTO (product_destination_id required for Google Ads: the conversion action id)
        let pd = match dst.product_destination_id.as_deref() {
            None | Some("") => Some(violation(
                format!("{path}.product_destination_id"),
                "REQUIRED_FIELD_MISSING",
                "product_destination_id is required",
            )),
            // source: DM-ERRENUM INVALID_CONVERSION_ACTION_ID ("Conversion action ID is not valid"),
            // once the test registered conversion actions
            Some(id)
                if !d.conversion_actions.is_empty() && !d.conversion_actions.contains_key(id) =>
            {
                Some(violation(
                    format!("{path}.product_destination_id"),
                    "INVALID_CONVERSION_ACTION_ID",
                    "Conversion action ID is not valid.",
                ))
            }
            Some(_) => None,
        };
        // source: DM-ERRENUM DUPLICATE_DESTINATION_REFERENCE ("Two or more destinations in the
        // request have the same reference")
        let dup = (!refs.insert(dst.reference.clone().unwrap_or_default())).then(|| {
            violation(
                format!("{path}.reference"),
                "DUPLICATE_DESTINATION_REFERENCE",
                "Two or more destinations in the request have the same reference.",
            )
        });
        out.extend([op, login, pd, dup].into_iter().flatten());
    }
    out
}

/// A hashed value in the request's encoding (source: DM-ERRENUM INVALID_HEX_ENCODING,
/// INVALID_BASE64_ENCODING, INVALID_SHA256_FORMAT; DM-UE sample 2).
fn check_hashed(v: &str, encoding: Option<&str>, path: String) -> Option<Violation> {
    let bytes = match encoding {
        Some("HEX") => {
            if v.is_empty()
                || !v.bytes().all(|b| b.is_ascii_hexdigit())
                || !v.len().is_multiple_of(2)
            {
                return Some(violation(
                    path,
                    "INVALID_HEX_ENCODING",
                    "The HEX encoded value is malformed.",
                ));
            }
            v.len() / 2
        }
        Some("BASE64") => match base64::engine::general_purpose::STANDARD.decode(v) {
            Ok(b) => b.len(),
            Err(_) => {
                return Some(violation(
                    path,
                    "INVALID_BASE64_ENCODING",
                    "The base64 encoded value is malformed.",
                ));
            }
        },
        _ => return None,
    };
    (bytes != 32).then(|| {
        violation(
            path,
            "INVALID_SHA256_FORMAT",
            "The SHA256 encoded value is malformed.",
        )
    })
}

/// A US postal code: 5 digits, or 5 + a 4-digit extension (source: DM-FMT postal_code; whether
/// the extension is written `12345-6789` or `123456789` is UNCONFIRMED, so both pass).
fn us_postal_code(p: &str) -> bool {
    let b = p.as_bytes();
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    match b.len() {
        5 | 9 => digits(b),
        10 => digits(&b[..5]) && b[5] == b'-' && digits(&b[6..]),
        _ => false,
    }
}

fn check_identifiers(e: &Event, path: &str, encoding: Option<&str>) -> Option<Violation> {
    let ids = e
        .user_data
        .as_ref()
        .map_or(&[][..], |u| &u.user_identifiers[..]);
    // source: DM-LIM ("10 identifiers per event"); the reason is the nearest ErrorReason (UNCONFIRMED)
    if ids.len() > 10 {
        return Some(violation(
            format!("{path}.user_data.user_identifiers"),
            "TOO_MANY_USER_IDENTIFIERS",
            "at most 10 user identifiers per event",
        ));
    }
    for (j, id) in ids.iter().enumerate() {
        let p = format!("{path}.user_data.user_identifiers[{j}]");
        // source: google-data-manager.md ("each identifier is exactly one of emailAddress, phoneNumber, address")
        let set = [
            id.email_address.is_some(),
            id.phone_number.is_some(),
            id.address.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if set != 1 {
            return Some(violation(
                p,
                "INVALID_FORMAT",
                "exactly one of email_address, phone_number, address",
            ));
        }
        let hashed: Vec<&String> = match (&id.email_address, &id.phone_number, &id.address) {
            (Some(x), _, _) | (_, Some(x), _) => vec![x],
            (_, _, Some(a)) => {
                // source: FMTPY format_region_code (strip, uppercase, 2 characters)
                if !a
                    .region_code
                    .as_deref()
                    .is_some_and(|r| r.len() == 2 && r.bytes().all(|b| b.is_ascii_uppercase()))
                {
                    return Some(violation(
                        format!("{p}.address.region_code"),
                        "INVALID_FORMAT",
                        "region_code must be a 2-letter code",
                    ));
                }
                // source: FMTPY format_postal_code (None or blank refused; never hashed)
                let Some(pc) = a.postal_code.as_deref().filter(|s| !s.trim().is_empty()) else {
                    return Some(violation(
                        format!("{p}.address.postal_code"),
                        "REQUIRED_FIELD_MISSING",
                        "postal_code is required",
                    ));
                };
                // source: DM-FMT ("For US addresses, use either 5 digits or 5 digits followed by a
                // 4-digit extension"); ErrorReason INVALID_POSTAL_CODE
                if a.region_code.as_deref() == Some("US") && !us_postal_code(pc) {
                    return Some(violation(
                        format!("{p}.address.postal_code"),
                        "INVALID_POSTAL_CODE",
                        "Postal code is not valid.",
                    ));
                }
                [&a.given_name, &a.family_name]
                    .into_iter()
                    .flatten()
                    .collect()
            }
            _ => vec![],
        };
        if let Some(v) = hashed
            .into_iter()
            .find_map(|h| check_hashed(h, encoding, p.clone()))
        {
            return Some(v);
        }
    }
    None
}

fn check_event(
    d: &Data,
    e: &Event,
    i: usize,
    refs: &HashSet<String>,
    req: &Ingest,
) -> Option<Violation> {
    let path = format!("events.events[{i}]");
    let v =
        |f: &str, reason: &'static str, m: &str| Some(violation(format!("{path}.{f}"), reason, m));
    let _ = (
        &e.last_updated_timestamp,
        &e.event_device_info,
        &e.cart_data,
        &e.custom_variables,
    );
    let _ = (
        &e.experimental_fields,
        &e.user_properties,
        &e.additional_event_parameters,
    );
    let _ = (&e.event_name, &e.client_id, &e.user_id);
    // source: DM-PROTO destination_references ("If empty, the event will be sent to all
    // destinations in the request"); a name that is no request destination's is derived invalid.
    if e.destination_references
        .iter()
        .flatten()
        .any(|r| !refs.contains(r))
    {
        return v(
            "destination_references",
            "INVALID_DESTINATION",
            "names no destination of this request",
        );
    }
    // source: DM-PROTO (event_timestamp REQUIRED); RFC 3339 (google-data-manager.md)
    let Some(ts) = e.event_timestamp.as_deref() else {
        return v(
            "event_timestamp",
            "REQUIRED_FIELD_MISSING",
            "event_timestamp is required",
        );
    };
    if bridge_core::timestamp::Timestamp::parse_rfc3339(ts).is_err() {
        return v(
            "event_timestamp",
            "INVALID_FORMAT",
            "event_timestamp must be an RFC 3339 timestamp",
        );
    }
    // source: google-data-manager.md (event_source "required for offline conversions"); DM-EVT values
    match e.event_source.as_deref() {
        None => {
            return v(
                "event_source",
                "REQUIRED_FIELD_MISSING",
                "event_source is required for offline conversions",
            );
        }
        Some("WEB" | "APP" | "IN_STORE" | "PHONE" | "MESSAGE" | "OTHER") => {}
        Some(_) => {
            return v(
                "event_source",
                "INVALID_ENUM_VALUE",
                "Enum value cannot be used.",
            );
        }
    }
    let txn = e.transaction_id.as_deref().filter(|t| !t.is_empty());
    // project policy (DM-PROTO 102d9f9 marks transaction_id OPTIONAL; the bridge always sends it)
    let Some(txn) = txn else {
        return v(
            "transaction_id",
            "REQUIRED_FIELD_MISSING",
            "transaction_id is required (project policy)",
        );
    };
    // third-party, live-tested (treg #151): an all-digit transactionId is refused, and validateOnly
    // does not catch it. Strict mode only.
    if d.controls.strict
        && req.validate_only != Some(true)
        && txn.bytes().all(|b| b.is_ascii_digit())
    {
        return v(
            "transaction_id",
            "INVALID_FORMAT",
            "transaction_id must not be purely numeric",
        );
    }
    // source: DM-UE (INVALID_CURRENCY_CODE); ISO 4217 codes are 3 uppercase letters
    if e.currency
        .as_deref()
        .is_some_and(|c| !(c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase())))
    {
        return v(
            "currency",
            "INVALID_CURRENCY_CODE",
            "The currency code is not supported.",
        );
    }
    // the fake's own rules (UNCONFIRMED: no source bounds the value or requires the currency).
    // Strict mode only.
    if d.controls.strict && e.conversion_value.is_some_and(|x| x < 0.0) {
        return v(
            "conversion_value",
            "INVALID_FORMAT",
            "conversion_value must not be negative (the fake's own rule)",
        );
    }
    if d.controls.strict && e.conversion_value.is_some() && e.currency.is_none() {
        return v(
            "currency",
            "REQUIRED_FIELD_MISSING",
            "currency is required with conversion_value (the fake's own rule)",
        );
    }
    for c in [&e.consent].into_iter().flatten() {
        for s in [&c.ad_user_data, &c.ad_personalization]
            .into_iter()
            .flatten()
        {
            if !CONSENT_VALUES.contains(&s.as_str()) {
                return v(
                    "consent",
                    "INVALID_ENUM_VALUE",
                    "Enum value cannot be used.",
                );
            }
        }
    }
    if let Some(a) = &e.ad_identifiers {
        let _ = (&a.session_attributes, &a.landing_page_device_info);
        // the fake's own rule (UNCONFIRMED for Data Manager; the Ads API's GBRAID_WBRAID_BOTH_SET).
        if d.controls.strict && a.gbraid.is_some() && a.wbraid.is_some() {
            return v(
                "ad_identifiers",
                "INVALID_FORMAT",
                "gbraid and wbraid are both set (the fake's own rule)",
            );
        }
    }
    let has_ids = e
        .user_data
        .as_ref()
        .is_some_and(|u| !u.user_identifiers.is_empty());
    // source: DM-SVC (encoding is required with user data)
    if has_ids && !matches!(req.encoding.as_deref(), Some("HEX" | "BASE64")) {
        return Some(violation(
            "encoding",
            "REQUIRED_FIELD_MISSING",
            "encoding is required with user data",
        ));
    }
    if let Some(x) = check_identifiers(e, &path, req.encoding.as_deref()) {
        return Some(x);
    }
    let has_click = e
        .ad_identifiers
        .as_ref()
        .is_some_and(|a| a.gclid.is_some() || a.gbraid.is_some() || a.wbraid.is_some());
    // source: DM-ERRENUM NO_IDENTIFIERS_PROVIDED ("Events data contains no user identifiers or ad identifiers")
    if !has_click && !has_ids {
        return Some(violation(
            path.clone(),
            "NO_IDENTIFIERS_PROVIDED",
            "Events data contains no user identifiers or ad identifiers.",
        ));
    }
    // The test's hook: an event Google refuses.
    if d.poison.contains(txn) {
        return v(
            "transaction_id",
            "INVALID_EVENT",
            "This event is not valid (poisoned by the test).",
        );
    }
    None
}

/// The events one destination receives: those naming it, and those naming none.
fn events_for(raw: &Value, req: &Ingest, reference: &str) -> Vec<Value> {
    req.events
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            e.destination_references
                .as_ref()
                .is_none_or(|r| r.is_empty() || r.iter().any(|x| x == reference))
        })
        .map(|(i, _)| raw["events"][i].clone())
        .collect()
}

/// The configuration errors of the destinations' operating accounts.
fn check_accounts(d: &Data, req: &Ingest, request_id: &str) -> Result<(), Reply> {
    let mut violations = Vec::new();
    for (i, dst) in req.destinations.iter().enumerate() {
        let id = dst
            .operating_account
            .as_ref()
            .and_then(|a| a.account_id.clone())
            .unwrap_or_default();
        let Some(acct) = d.dm_accounts.get(&id) else {
            continue;
        };
        // source: DM-ERRENUM PERMISSION_DENIED ("The user does not have permission or the resource
        // is not found"); the 403 shape follows DM-UE's PERMISSION_DENIED sample.
        if !acct.reachable {
            return Err(permission_denied(
                "PERMISSION_DENIED",
                "The caller does not have permission",
                request_id,
            ));
        }
        // source: DM-ERRENUM NOT_ALLOWLISTED ("The account is not allowlisted for the given
        // feature"); its status and placement are UNCONFIRMED (403 with the reason in ErrorInfo).
        if !acct.allowlisted {
            return Err(permission_denied(
                "NOT_ALLOWLISTED",
                "The account is not allowlisted for the given feature.",
                request_id,
            ));
        }
        let path = format!("destinations[{i}].operating_account");
        // source: DM-ERRENUM TERMS_AND_CONDITIONS_NOT_SIGNED; placement UNCONFIRMED
        if !acct.terms_signed {
            violations.push(violation(
                path.clone(),
                "TERMS_AND_CONDITIONS_NOT_SIGNED",
                "Required terms and conditions are not accepted.",
            ));
        }
        // source: DM-ERRENUM DESTINATION_ACCOUNT_ENHANCED_CONVERSIONS_TERMS_NOT_SIGNED (synchronous);
        // whether this or the processing reason fires is UNCONFIRMED, hence `ec_terms_check`.
        let reference = dst.reference.clone().unwrap_or_default();
        let with_user_data = req.events.iter().any(|e| {
            e.user_data
                .as_ref()
                .is_some_and(|u| !u.user_identifiers.is_empty())
                && e.destination_references
                    .as_ref()
                    .is_none_or(|r| r.is_empty() || r.contains(&reference))
        });
        if !acct.ec_terms_signed && acct.ec_terms_check == EcTermsCheck::Sync && with_user_data {
            violations.push(violation(
                path,
                "DESTINATION_ACCOUNT_ENHANCED_CONVERSIONS_TERMS_NOT_SIGNED",
                "The destination account hasn't agreed to the terms for enhanced conversions.",
            ));
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(bad_request(&violations, request_id))
    }
}

/// A transaction aborted by concurrency on Google's side (google.rpc.Code ABORTED maps to HTTP
/// 409; DM-RETRY lists it as retryable).
pub fn dm_aborted() -> (u16, Value) {
    (
        409,
        json!({"error": {"code": 409, "status": "ABORTED", "message": "The operation was aborted."}}),
    )
}

pub(super) async fn ingest(State(s): State<FakeGoogle>, headers: HeaderMap, body: Bytes) -> Reply {
    // source: research google-ads.md Q4 (datamanager scope; no developer token)
    if let Err(r) = authorized(&s, &headers, DATAMANAGER_SCOPE) {
        return r;
    }
    let fault = {
        let mut d = lock(&s.data);
        let seq = d.requests.len();
        d.controls.next_fault(
            // source: DM-LIM (429 RESOURCE_EXHAUSTED over quota)
            || {
                (
                    429,
                    json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "Quota exceeded."}}),
                )
            },
            // source: DM-RETRY (the guide's retry list: UNAVAILABLE, DEADLINE_EXCEEDED,
            // INTERNAL, UNKNOWN, ABORTED): the weather answers both outage shapes in turn.
            || {
                if seq.is_multiple_of(2) {
                    (
                        503,
                        json!({"error": {"code": 503, "status": "UNAVAILABLE", "message": "The service is currently unavailable."}}),
                    )
                } else {
                    dm_aborted()
                }
            },
        )
    };
    let fault = match Fault::before(fault).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let req: Ingest = match parse(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let raw: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let _ = (&req.consent, &req.encryption_info);
    let request_id = {
        let mut d = lock(&s.data);
        let seq = d.requests.len() + 1;
        // Ids that need URL-encoding ('+', '/', '='), so a client that sends them raw is caught.
        let request_id = format!("t-fake+{seq}/{:04x}==", fastrand::u16(..));
        let mut violations = check_destinations(&d, &req.destinations);
        // source: DM-LIM, DM-SVC (at most 2,000 events; the TOO_MANY_EVENTS text says 10,000)
        if req.events.is_empty() {
            violations.push(violation(
                "events",
                "REQUIRED_FIELD_MISSING",
                "at least one event is required",
            ));
        } else if req.events.len() > 2000 {
            violations.push(violation(
                "events",
                "TOO_MANY_EVENTS",
                "At most 2000 events can be sent in a single request.",
            ));
        }
        if violations.is_empty() {
            let refs: HashSet<String> = req
                .destinations
                .iter()
                .map(|x| x.reference.clone().unwrap_or_default())
                .collect();
            // source: DM-ERR ("If any record in a request fails basic validation, the entire request
            // fails, and the API does not process any of the data in that request")
            violations.extend(
                req.events
                    .iter()
                    .enumerate()
                    .filter_map(|(i, e)| check_event(&d, e, i, &refs, &req)),
            );
        }
        if !violations.is_empty() {
            return bad_request(&violations, &request_id);
        }
        if let Err(r) = check_accounts(&d, &req, &request_id) {
            return r;
        }
        d.requests.push(("events:ingest".into(), raw.clone()));
        d.batch_sizes.push(req.events.len());
        // source: DM-RS (status exists only for successful, non-validateOnly requests)
        if req.validate_only != Some(true) {
            let destinations = req
                .destinations
                .iter()
                .enumerate()
                .map(|(i, dst)| DmJobDestination {
                    destination: raw["destinations"][i].clone(),
                    operating_account: dst
                        .operating_account
                        .as_ref()
                        .and_then(|a| a.account_id.clone())
                        .unwrap_or_default(),
                    product_destination_id: dst.product_destination_id.clone().unwrap_or_default(),
                    events: events_for(&raw, &req, dst.reference.as_deref().unwrap_or_default()),
                })
                .collect();
            let received_at = d.controls.clock.now();
            d.dm_jobs.push(DmJob {
                request_id: request_id.clone(),
                received_at,
                polls: 0,
                forced: false,
                consent: raw["consent"].clone(),
                destinations,
                outcome: None,
            });
        }
        request_id
    };
    Fault::after(fault).await;
    // source: DM-DIAG / [ING] (the response is `{requestId}`: accepted, not processed)
    (StatusCode::OK, Json(json!({"requestId": request_id})))
}
