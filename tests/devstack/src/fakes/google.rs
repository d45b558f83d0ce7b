//! A strict fake of Google's OAuth token endpoint, the Google Ads API (click conversion and
//! adjustment uploads with partial failure, GAQL terms pre-flight) and the Data Manager API
//! (events:ingest with fast-fail, requestStatus:retrieve), enforcing the reference's rules,
//! answering in Google's shapes, keeping the conversions it imported, and injecting faults.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone)]
pub enum Fault {
    /// Answer the next upload/ingest with this status and body instead of processing it.
    Respond(u16, Value),
    /// Process the next upload/ingest normally after a delay.
    Slow(Duration),
    /// Import the next upload/ingest, then answer only after this delay (past the client's timeout).
    AcceptThenTimeout(Duration),
    /// Import the next upload/ingest, then run the callback (which kills the sender) before answering.
    AcceptThenCrash(Arc<dyn Fn() + Send + Sync>),
}

/// One imported Ads API conversion, by order id.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversion {
    pub action: String,
    pub value: f64,
    pub currency: String,
    pub at: String,
    pub retracted: bool,
    /// The latest restatement's adjustmentDateTime.
    pub adjusted_at: Option<String>,
    pub restatements: u32,
}

#[derive(Default)]
pub struct Data {
    pub faults: VecDeque<Fault>,
    /// Tokens issued and whether they are still valid.
    pub tokens: HashMap<String, bool>,
    pub token_grants: usize,
    pub token_lifetime_secs: u64,
    /// customer id -> accepted customer data terms (absent: accepted).
    pub terms: HashMap<String, bool>,
    pub searches: usize,
    /// Ads API: order id -> conversion.
    pub conversions: BTreeMap<String, Conversion>,
    /// Data Manager: (productDestinationId, transactionId) -> latest event; and ingest count per key.
    pub dm_events: BTreeMap<(String, String), Value>,
    pub dm_sends: BTreeMap<(String, String), usize>,
    pub request_ids: Vec<String>,
    /// Every request the fake accepted (processed, even with row errors): (path kind, body).
    pub requests: Vec<(String, Value)>,
    pub batch_sizes: Vec<usize>,
    /// Order ids / transaction ids the fake treats as invalid rows (a permanent row error).
    pub poison: HashSet<String>,
    /// gclids Google does not know (CLICK_NOT_FOUND).
    pub unknown_clicks: HashSet<String>,
    /// Order ids whose clicks are under 6 hours old (TOO_RECENT_EVENT) until cleared.
    pub too_recent: HashSet<String>,
    /// Requests answered 401 because the token was missing, unknown or expired.
    pub unauthenticated: usize,
    pub chaos: Option<super::Chaos>,
}

#[derive(Clone)]
pub struct FakeGoogle {
    pub base_url: String,
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
    pub developer_token: String,
    pub data: Arc<Mutex<Data>>,
}

type Reply = (StatusCode, Json<Value>);

fn lock(d: &Arc<Mutex<Data>>) -> std::sync::MutexGuard<'_, Data> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

fn rpc_error(status: StatusCode, rpc: &str, message: &str, details: Vec<Value>) -> Reply {
    (
        status,
        Json(
            json!({"error": {"code": status.as_u16(), "message": message, "status": rpc, "details": details}}),
        ),
    )
}

fn ads_failure(errors: Vec<Value>) -> Value {
    json!({"@type": "type.googleapis.com/google.ads.googleads.v26.errors.GoogleAdsFailure", "errors": errors})
}

fn ads_error(kind: &str, code: &str, message: &str, list: &str, index: Option<usize>) -> Value {
    let mut e = json!({"errorCode": {kind: code}, "message": message});
    if let Some(i) = index {
        e["location"] = json!({"fieldPathElements": [{"fieldName": list, "index": i}]});
    }
    e
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `yyyy-mm-dd hh:mm:ss+hh:mm`, the only form the Ads API takes.
fn ads_datetime(s: &str) -> bool {
    let b = s.as_bytes();
    let digit =
        |r: std::ops::Range<usize>| r.clone().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    b.len() == 25
        && digit(0..4)
        && b[4] == b'-'
        && digit(5..7)
        && b[7] == b'-'
        && digit(8..10)
        && b[10] == b' '
        && digit(11..13)
        && b[13] == b':'
        && digit(14..16)
        && b[16] == b':'
        && digit(17..19)
        && (b[19] == b'+' || b[19] == b'-')
        && digit(20..22)
        && b[22] == b':'
        && digit(23..25)
}

/// Comparable instant of an Ads datetime (seconds since epoch).
fn ads_instant(s: &str) -> Option<i64> {
    let iso = format!("{}T{}{}", &s[..10], &s[11..19], &s[19..]);
    bridge_core::timestamp::Timestamp::parse_rfc3339(&iso)
        .ok()
        .map(|t| t.unix_secs())
}

// ---- OAuth ----

#[derive(Deserialize)]
struct TokenForm {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    refresh_token: Option<String>,
}

async fn token(State(s): State<FakeGoogle>, Form(f): Form<TokenForm>) -> Reply {
    if f.grant_type.as_deref() != Some("refresh_token") {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"error": "unsupported_grant_type", "error_description": "Invalid grant_type"}),
            ),
        );
    }
    if f.client_id.as_deref() != Some(&s.client_id)
        || f.client_secret.as_deref() != Some(&s.client_secret)
    {
        return (
            StatusCode::UNAUTHORIZED,
            Json(
                json!({"error": "invalid_client", "error_description": "The OAuth client was not found."}),
            ),
        );
    }
    if f.refresh_token.as_deref() != Some(&s.refresh_token) {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}),
            ),
        );
    }
    let mut d = lock(&s.data);
    d.token_grants += 1;
    let t = format!("ya29.fake-{}", d.token_grants);
    d.tokens.insert(t.clone(), true);
    let lifetime = if d.token_lifetime_secs == 0 {
        3599
    } else {
        d.token_lifetime_secs
    };
    (
        StatusCode::OK,
        Json(
            json!({"access_token": t, "expires_in": lifetime, "token_type": "Bearer", "scope": "https://www.googleapis.com/auth/adwords"}),
        ),
    )
}

/// The bearer token check both APIs share.
fn authorized(s: &FakeGoogle, headers: &HeaderMap) -> Result<(), Reply> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let mut d = lock(&s.data);
    if bearer.is_some_and(|t| d.tokens.get(t) == Some(&true)) {
        return Ok(());
    }
    d.unauthenticated += 1;
    Err(rpc_error(
        StatusCode::UNAUTHORIZED,
        "UNAUTHENTICATED",
        "Request had invalid authentication credentials. Expected OAuth 2 access token.",
        vec![],
    ))
}

fn ads_headers(s: &FakeGoogle, headers: &HeaderMap) -> Result<(), Reply> {
    authorized(s, headers)?;
    let dev = headers.get("developer-token").and_then(|v| v.to_str().ok());
    if dev != Some(s.developer_token.as_str()) {
        return Err(rpc_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "The developer token is not valid.",
            vec![ads_failure(vec![ads_error(
                "authenticationError",
                "DEVELOPER_TOKEN_INVALID",
                "The developer token is not valid.",
                "",
                None,
            )])],
        ));
    }
    if let Some(l) = headers
        .get("login-customer-id")
        .and_then(|v| v.to_str().ok())
        && !(l.len() == 10 && l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(rpc_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "login-customer-id must be 10 digits without dashes",
            vec![],
        ));
    }
    Ok(())
}

/// Takes the next fault; a `Respond` is answered at once.
async fn fault(s: &FakeGoogle) -> Result<Option<Fault>, Reply> {
    let f = {
        let mut d = lock(&s.data);
        let chaos = d.chaos.clone();
        d.faults.pop_front().or_else(|| {
            let c = chaos?;
            Some(match c.roll()? {
                super::ChaosKind::Throttled => Fault::Respond(429, json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "quota",
                    "details": [ads_failure(vec![json!({"errorCode": {"quotaError": "RESOURCE_EXHAUSTED"}, "message": "Too many requests. Retry in 1 seconds.",
                        "details": {"quotaErrorDetails": {"rateScope": "DEVELOPER", "retryDelay": "1s"}}})])]}})),
                super::ChaosKind::ServerError => Fault::Respond(503, json!({"error": {"code": 503, "status": "UNAVAILABLE", "message": "The service is currently unavailable."}})),
                super::ChaosKind::Slow => Fault::Slow(c.hold),
                super::ChaosKind::AcceptThenTimeout => Fault::AcceptThenTimeout(c.hold),
                super::ChaosKind::AcceptThenCrash => Fault::AcceptThenCrash(c.crash?),
            })
        })
    };
    match &f {
        Some(Fault::Respond(status, body)) => Err((
            StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Json(body.clone()),
        )),
        Some(Fault::Slow(d)) => {
            tokio::time::sleep(*d).await;
            Ok(None)
        }
        _ => Ok(f),
    }
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Reply> {
    serde_json::from_slice(body).map_err(|e| {
        rpc_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            &format!("Invalid JSON payload received. {e}"),
            vec![],
        )
    })
}

/// After an accepted request: hold the answer past the client's timeout, or crash the sender.
async fn hold(fault: Option<Fault>) {
    match fault {
        Some(Fault::AcceptThenTimeout(d)) => tokio::time::sleep(d).await,
        Some(Fault::AcceptThenCrash(crash)) => {
            crash();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        _ => {}
    }
}

// ---- Google Ads API ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct UserIdentifier {
    hashed_email: Option<String>,
    hashed_phone_number: Option<String>,
    address_info: Option<Value>,
    mobile_id: Option<String>,
    third_party_user_id: Option<String>,
    user_identifier_source: Option<String>,
}

impl UserIdentifier {
    fn set(&self) -> usize {
        [
            self.hashed_email.is_some(),
            self.hashed_phone_number.is_some(),
            self.address_info.is_some(),
            self.mobile_id.is_some(),
            self.third_party_user_id.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AdsConsent {
    ad_user_data: Option<String>,
    ad_personalization: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ClickConversion {
    gclid: Option<String>,
    gbraid: Option<String>,
    wbraid: Option<String>,
    conversion_action: Option<String>,
    conversion_date_time: Option<String>,
    conversion_value: Option<f64>,
    currency_code: Option<String>,
    order_id: Option<String>,
    user_identifiers: Option<Vec<UserIdentifier>>,
    consent: Option<AdsConsent>,
    conversion_environment: Option<String>,
    custom_variables: Option<Value>,
    cart_data: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct UploadClicks {
    conversions: Vec<ClickConversion>,
    partial_failure: Option<bool>,
    validate_only: Option<bool>,
    job_id: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RestatementValue {
    adjusted_value: Option<f64>,
    currency_code: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Adjustment {
    conversion_action: Option<String>,
    adjustment_type: Option<String>,
    adjustment_date_time: Option<String>,
    order_id: Option<String>,
    gclid_date_time_pair: Option<Value>,
    restatement_value: Option<RestatementValue>,
    user_identifiers: Option<Vec<UserIdentifier>>,
    user_agent: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct UploadAdjustments {
    conversion_adjustments: Vec<Adjustment>,
    partial_failure: Option<bool>,
    validate_only: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Search {
    query: String,
}

fn row_checks_identifiers(
    ids: &[UserIdentifier],
    only_hashed: bool,
) -> Result<(), (String, String, String)> {
    let e =
        |kind: &str, code: &str, m: &str| Err((kind.to_string(), code.to_string(), m.to_string()));
    if ids.len() > 5 {
        return e(
            "collectionSizeError",
            "TOO_MANY",
            "at most 5 user identifiers",
        );
    }
    for id in ids {
        if id.set() != 1 {
            return e(
                "conversionUploadError",
                "INVALID_USER_IDENTIFIER",
                "each UserIdentifier carries exactly one identifier",
            );
        }
        if only_hashed
            && (id.address_info.is_some()
                || id.mobile_id.is_some()
                || id.third_party_user_id.is_some())
        {
            return e(
                "conversionUploadError",
                "INVALID_USER_IDENTIFIER",
                "only hashedEmail and hashedPhoneNumber are accepted here",
            );
        }
        for h in [&id.hashed_email, &id.hashed_phone_number]
            .into_iter()
            .flatten()
        {
            if !is_hex64(h) {
                return e(
                    "conversionUploadError",
                    "INVALID_USER_IDENTIFIER",
                    "hashed identifiers are 64 lowercase hex characters",
                );
            }
        }
        if id
            .user_identifier_source
            .as_deref()
            .is_some_and(|s| !["FIRST_PARTY", "THIRD_PARTY", "UNSPECIFIED", "UNKNOWN"].contains(&s))
        {
            return e("fieldError", "INVALID_VALUE", "userIdentifierSource");
        }
    }
    Ok(())
}

fn check_action(action: Option<&str>, customer: &str) -> Result<String, (String, String, String)> {
    let prefix = format!("customers/{customer}/conversionActions/");
    match action {
        Some(a)
            if a.strip_prefix(&prefix)
                .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())) =>
        {
            Ok(a.to_string())
        }
        Some(_) => Err((
            "conversionUploadError".into(),
            "NO_CONVERSION_ACTION_FOUND".into(),
            "the conversion action is not in this customer".into(),
        )),
        None => Err((
            "fieldError".into(),
            "REQUIRED".into(),
            "conversionAction is required".into(),
        )),
    }
}

fn check_click(
    s: &Data,
    c: &ClickConversion,
    customer: &str,
    seen: &mut HashSet<String>,
) -> Result<Conversion, (String, String, String)> {
    let e =
        |kind: &str, code: &str, m: &str| Err((kind.to_string(), code.to_string(), m.to_string()));
    let action = check_action(c.conversion_action.as_deref(), customer)?;
    let Some(at) = c.conversion_date_time.as_deref() else {
        return e("fieldError", "REQUIRED", "conversionDateTime is required");
    };
    if !ads_datetime(at) {
        return e(
            "dateError",
            "INVALID_FIELD_FORMAT",
            "conversionDateTime must be yyyy-mm-dd hh:mm:ss+hh:mm",
        );
    }
    if c.gbraid.is_some() && c.wbraid.is_some() {
        return e(
            "conversionUploadError",
            "GBRAID_WBRAID_BOTH_SET",
            "gbraid and wbraid are both set",
        );
    }
    if c.gclid.is_some() && (c.gbraid.is_some() || c.wbraid.is_some()) {
        return e(
            "conversionUploadError",
            "VALUE_MUST_BE_UNSET",
            "gclid with a braid",
        );
    }
    let ids = c.user_identifiers.as_deref().unwrap_or(&[]);
    row_checks_identifiers(ids, true)?;
    if c.gclid.is_none() && c.gbraid.is_none() && c.wbraid.is_none() && ids.is_empty() {
        return e(
            "conversionUploadError",
            "CLICK_NOT_FOUND",
            "no click id and no user identifier",
        );
    }
    for v in [
        c.consent.as_ref().and_then(|c| c.ad_user_data.as_deref()),
        c.consent
            .as_ref()
            .and_then(|c| c.ad_personalization.as_deref()),
    ]
    .into_iter()
    .flatten()
    {
        if !["GRANTED", "DENIED", "UNSPECIFIED", "UNKNOWN"].contains(&v) {
            return e(
                "fieldError",
                "INVALID_VALUE",
                "consent values are GRANTED or DENIED",
            );
        }
    }
    if c.conversion_environment
        .as_deref()
        .is_some_and(|v| !["APP", "WEB", "UNSPECIFIED"].contains(&v))
    {
        return e("fieldError", "INVALID_VALUE", "conversionEnvironment");
    }
    let _ = (&c.custom_variables, &c.cart_data);
    if c.conversion_value.is_some() && c.currency_code.is_none() {
        return e(
            "fieldError",
            "REQUIRED",
            "currencyCode is required with a value",
        );
    }
    let order = c.order_id.clone().unwrap_or_default();
    if s.poison.contains(&order) {
        return e(
            "conversionUploadError",
            "CONVERSION_PRECEDES_EVENT",
            "the conversion precedes its click",
        );
    }
    if c.gclid
        .as_ref()
        .is_some_and(|g| s.unknown_clicks.contains(g))
    {
        return e(
            "conversionUploadError",
            "CLICK_NOT_FOUND",
            "no click matches this gclid",
        );
    }
    if s.too_recent.contains(&order) {
        return e(
            "conversionUploadError",
            "TOO_RECENT_EVENT",
            "the click is under 6 hours old",
        );
    }
    if !order.is_empty() {
        if !seen.insert(order.clone()) {
            return e(
                "conversionUploadError",
                "DUPLICATE_ORDER_ID",
                "two rows with one order id in one request",
            );
        }
        if s.conversions.contains_key(&order) {
            return e(
                "conversionUploadError",
                "ORDER_ID_ALREADY_IN_USE",
                "a conversion with this order id exists",
            );
        }
    }
    Ok(Conversion {
        action,
        value: c.conversion_value.unwrap_or(0.0),
        currency: c.currency_code.clone().unwrap_or_default(),
        at: at.to_string(),
        retracted: false,
        adjusted_at: None,
        restatements: 0,
    })
}

/// The effect of one valid adjustment on a conversion.
fn check_adjustment(
    s: &Data,
    a: &Adjustment,
    customer: &str,
) -> Result<(String, Conversion), (String, String, String)> {
    let e =
        |kind: &str, code: &str, m: &str| Err((kind.to_string(), code.to_string(), m.to_string()));
    let action = check_action(a.conversion_action.as_deref(), customer)?;
    let Some(at) = a.adjustment_date_time.as_deref() else {
        return e("fieldError", "REQUIRED", "adjustmentDateTime is required");
    };
    if !ads_datetime(at) {
        return e(
            "dateError",
            "INVALID_FIELD_FORMAT",
            "adjustmentDateTime must be yyyy-mm-dd hh:mm:ss+hh:mm",
        );
    }
    let kind = a.adjustment_type.as_deref().unwrap_or("");
    if a.order_id.is_some() && a.gclid_date_time_pair.is_some() && kind != "ENHANCEMENT" {
        return e(
            "conversionAdjustmentUploadError",
            "INVALID_ADJUSTMENT_TARGET",
            "orderId and gclidDateTimePair are both set",
        );
    }
    row_checks_identifiers(a.user_identifiers.as_deref().unwrap_or(&[]), false)?;
    let _ = &a.user_agent;
    let Some(order) = a.order_id.clone() else {
        return e(
            "conversionAdjustmentUploadError",
            "CONVERSION_NOT_FOUND",
            "only orderId targets are supported by this fake",
        );
    };
    if s.poison.contains(&order) {
        return e(
            "conversionAdjustmentUploadError",
            "TOO_MANY_ADJUSTMENTS",
            "too many adjustments",
        );
    }
    let Some(mut conv) = s.conversions.get(&order).cloned() else {
        return e(
            "conversionAdjustmentUploadError",
            "CONVERSION_NOT_FOUND",
            "no conversion with this order id",
        );
    };
    if conv.action != action {
        return e(
            "conversionAdjustmentUploadError",
            "CONVERSION_NOT_FOUND",
            "no conversion with this order id under this action",
        );
    }
    let t = ads_instant(at).unwrap_or(0);
    if t <= ads_instant(&conv.at).unwrap_or(0) {
        return e(
            "conversionAdjustmentUploadError",
            "ADJUSTMENT_PRECEDES_CONVERSION",
            "the adjustment precedes the conversion",
        );
    }
    if conv.retracted {
        return e(
            "conversionAdjustmentUploadError",
            "CONVERSION_ALREADY_RETRACTED",
            "the conversion was retracted",
        );
    }
    match kind {
        "RETRACTION" => {
            if a.restatement_value.is_some() {
                return e(
                    "fieldError",
                    "VALUE_MUST_BE_UNSET",
                    "restatementValue must not be set on a RETRACTION",
                );
            }
            conv.retracted = true;
        }
        "RESTATEMENT" => {
            let Some(v) = a.restatement_value.as_ref().and_then(|r| r.adjusted_value) else {
                return e(
                    "fieldError",
                    "REQUIRED",
                    "RESTATEMENT needs restatementValue.adjustedValue",
                );
            };
            if let Some(c) = a
                .restatement_value
                .as_ref()
                .and_then(|r| r.currency_code.as_deref())
                && c != conv.currency
            {
                return e(
                    "conversionAdjustmentUploadError",
                    "INVALID_CURRENCY",
                    "the restatement's currency differs",
                );
            }
            if let Some(prev) = conv.adjusted_at.as_deref().and_then(ads_instant) {
                if t == prev {
                    return e(
                        "conversionAdjustmentUploadError",
                        "RESTATEMENT_ALREADY_EXISTS",
                        "a restatement with this time exists",
                    );
                }
                if t < prev {
                    return e(
                        "conversionAdjustmentUploadError",
                        "MORE_RECENT_RESTATEMENT_FOUND",
                        "a later restatement exists",
                    );
                }
            }
            conv.value = v;
            conv.restatements += 1;
            conv.adjusted_at = Some(at.to_string());
        }
        "ENHANCEMENT" => {}
        _ => {
            return e(
                "fieldError",
                "INVALID_VALUE",
                "adjustmentType must be RETRACTION, RESTATEMENT or ENHANCEMENT",
            );
        }
    }
    Ok((order, conv))
}

async fn ads(
    State(s): State<FakeGoogle>,
    Path((version, rest)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    if version != "v26" {
        return rpc_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "unknown API version",
            vec![],
        );
    }
    if let Err(r) = ads_headers(&s, &headers) {
        return r;
    }
    if let Some(customer) = rest.strip_suffix("/googleAds:search") {
        let q: Search = match parse(&body) {
            Ok(q) => q,
            Err(r) => return r,
        };
        let mut d = lock(&s.data);
        d.searches += 1;
        if !q.query.contains("accepted_customer_data_terms") {
            return rpc_error(
                StatusCode::BAD_REQUEST,
                "INVALID_ARGUMENT",
                "this fake answers the terms query only",
                vec![],
            );
        }
        let accepted = d.terms.get(customer).copied().unwrap_or(true);
        return (
            StatusCode::OK,
            Json(
                json!({"results": [{"customer": {"resourceName": format!("customers/{customer}"),
                "conversionTrackingSetting": {"acceptedCustomerDataTerms": accepted, "googleAdsConversionCustomer": format!("customers/{customer}")}}}],
                "fieldMask": "customer.conversionTrackingSetting.acceptedCustomerDataTerms,customer.conversionTrackingSetting.googleAdsConversionCustomer"}),
            ),
        );
    }
    let (customer, method) = match rest.split_once(':') {
        Some((c, m)) if c.len() == 10 && c.bytes().all(|b| b.is_ascii_digit()) => {
            (c.to_string(), m.to_string())
        }
        _ => return rpc_error(StatusCode::NOT_FOUND, "NOT_FOUND", "unknown method", vec![]),
    };
    let fault = match fault(&s).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let answer = match method.as_str() {
        "uploadClickConversions" => upload_clicks(&s, &customer, &body),
        "uploadConversionAdjustments" => upload_adjustments(&s, &customer, &body),
        _ => return rpc_error(StatusCode::NOT_FOUND, "NOT_FOUND", "unknown method", vec![]),
    };
    hold(fault).await;
    answer
}

/// The common frame of both uploads: size and partial-failure checks, then per-row results.
fn frame(rows: usize, partial: Option<bool>, list: &str) -> Result<(), Reply> {
    if partial != Some(true) {
        return Err(rpc_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "partialFailure must be true",
            vec![ads_failure(vec![ads_error(
                "requestError",
                "PARTIAL_FAILURE_MODE_REQUIRED",
                "partial failure mode is required",
                "",
                None,
            )])],
        ));
    }
    if rows == 0 || rows > 2000 {
        return Err(rpc_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            &format!("{list} must hold 1 to 2000 rows"),
            vec![ads_failure(vec![ads_error(
                "collectionSizeError",
                "TOO_MANY",
                "at most 2000 rows",
                list,
                None,
            )])],
        ));
    }
    Ok(())
}

fn partial_reply(results: Vec<Value>, errors: Vec<Value>, job: i64) -> Reply {
    let mut out = json!({"results": results, "jobId": job.to_string()});
    if !errors.is_empty() {
        out["partialFailureError"] = json!({"code": 3, "message": format!("{} rows failed", errors.len()), "details": [ads_failure(errors)]});
    }
    (StatusCode::OK, Json(out))
}

fn upload_clicks(s: &FakeGoogle, customer: &str, body: &[u8]) -> Reply {
    let req: UploadClicks = match parse(body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    if let Err(r) = frame(req.conversions.len(), req.partial_failure, "conversions") {
        return r;
    }
    let validate_only = req.validate_only == Some(true);
    let mut d = lock(&s.data);
    let mut seen = HashSet::new();
    let (mut results, mut errors) = (Vec::new(), Vec::new());
    let mut imported = Vec::new();
    for (i, c) in req.conversions.iter().enumerate() {
        match check_click(&d, c, customer, &mut seen) {
            Ok(conv) => {
                let mut r = json!({"conversionAction": conv.action, "conversionDateTime": conv.at});
                for (k, v) in [
                    ("gclid", &c.gclid),
                    ("gbraid", &c.gbraid),
                    ("wbraid", &c.wbraid),
                ] {
                    if let Some(v) = v {
                        r[k] = json!(v);
                    }
                }
                results.push(r);
                imported.push((
                    c.order_id
                        .clone()
                        .unwrap_or_else(|| format!("no-order-{i}")),
                    conv,
                ));
            }
            Err((kind, code, m)) => {
                results.push(json!({}));
                errors.push(ads_error(&kind, &code, &m, "conversions", Some(i)));
            }
        }
    }
    d.requests.push((
        "uploadClickConversions".into(),
        serde_json::from_slice(body).unwrap_or(Value::Null),
    ));
    d.batch_sizes.push(req.conversions.len());
    if !validate_only {
        d.conversions.extend(imported);
    } else {
        results = Vec::new();
    }
    partial_reply(
        results,
        errors,
        req.job_id.unwrap_or(d.requests.len() as i64),
    )
}

fn upload_adjustments(s: &FakeGoogle, customer: &str, body: &[u8]) -> Reply {
    let req: UploadAdjustments = match parse(body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    if let Err(r) = frame(
        req.conversion_adjustments.len(),
        req.partial_failure,
        "conversionAdjustments",
    ) {
        return r;
    }
    let validate_only = req.validate_only == Some(true);
    let mut d = lock(&s.data);
    let (mut results, mut errors) = (Vec::new(), Vec::new());
    for (i, a) in req.conversion_adjustments.iter().enumerate() {
        match check_adjustment(&d, a, customer) {
            Ok((order, conv)) => {
                results.push(json!({"conversionAction": conv.action, "adjustmentType": a.adjustment_type, "adjustmentDateTime": a.adjustment_date_time, "orderId": order}));
                if !validate_only {
                    d.conversions.insert(order, conv);
                }
            }
            Err((kind, code, m)) => {
                results.push(json!({}));
                errors.push(ads_error(
                    &kind,
                    &code,
                    &m,
                    "conversion_adjustments",
                    Some(i),
                ));
            }
        }
    }
    d.requests.push((
        "uploadConversionAdjustments".into(),
        serde_json::from_slice(body).unwrap_or(Value::Null),
    ));
    d.batch_sizes.push(req.conversion_adjustments.len());
    if validate_only {
        results = Vec::new();
    }
    let job = d.requests.len() as i64;
    partial_reply(results, errors, job)
}

// ---- Data Manager API ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Account {
    account_type: Option<String>,
    account_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DmDestination {
    reference: Option<String>,
    operating_account: Option<Account>,
    login_account: Option<Account>,
    linked_account: Option<Account>,
    product_destination_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DmConsent {
    ad_user_data: Option<String>,
    ad_personalization: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AdIdentifiers {
    gclid: Option<String>,
    gbraid: Option<String>,
    wbraid: Option<String>,
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
struct DmIdentifier {
    email_address: Option<String>,
    phone_number: Option<String>,
    address: Option<Address>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct UserData {
    user_identifiers: Vec<DmIdentifier>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DmEvent {
    destination_references: Option<Vec<String>>,
    transaction_id: Option<String>,
    event_timestamp: Option<String>,
    last_updated_timestamp: Option<String>,
    event_source: Option<String>,
    conversion_value: Option<f64>,
    currency: Option<String>,
    consent: Option<DmConsent>,
    ad_identifiers: Option<AdIdentifiers>,
    user_data: Option<UserData>,
    event_device_info: Option<Value>,
    cart_data: Option<Value>,
    custom_variables: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Ingest {
    destinations: Vec<DmDestination>,
    events: Vec<DmEvent>,
    validate_only: Option<bool>,
    encoding: Option<String>,
    consent: Option<DmConsent>,
}

fn check_dm_event(
    d: &Data,
    e: &DmEvent,
    refs: &HashSet<String>,
    encoding: Option<&str>,
) -> Result<(), (String, String)> {
    let v = |field: &str, m: &str| Err((field.to_string(), m.to_string()));
    match &e.destination_references {
        Some(r) if !r.is_empty() && r.iter().all(|x| refs.contains(x)) => {}
        _ => {
            return v(
                "destination_references",
                "must name destinations of this request",
            );
        }
    }
    let Some(ts) = e.event_timestamp.as_deref() else {
        return v("event_timestamp", "is required");
    };
    if bridge_core::timestamp::Timestamp::parse_rfc3339(ts).is_err() {
        return v("event_timestamp", "must be an RFC 3339 timestamp");
    }
    let _ = (
        &e.last_updated_timestamp,
        &e.event_device_info,
        &e.cart_data,
        &e.custom_variables,
    );
    match e.event_source.as_deref() {
        Some("WEB" | "APP" | "IN_STORE" | "PHONE" | "MESSAGE" | "OTHER") => {}
        _ => {
            return v(
                "event_source",
                "is required for offline conversions (WEB, APP, IN_STORE, PHONE, MESSAGE, OTHER)",
            );
        }
    }
    if e.transaction_id.as_deref().is_none_or(str::is_empty) {
        return v("transaction_id", "is required");
    }
    if e.conversion_value.is_some_and(|x| x < 0.0) {
        return v("conversion_value", "must not be negative");
    }
    if e.conversion_value.is_some() && e.currency.is_none() {
        return v("currency", "is required with conversion_value");
    }
    for c in [&e.consent].into_iter().flatten() {
        for s in [&c.ad_user_data, &c.ad_personalization]
            .into_iter()
            .flatten()
        {
            if ![
                "CONSENT_GRANTED",
                "CONSENT_DENIED",
                "CONSENT_STATUS_UNSPECIFIED",
            ]
            .contains(&s.as_str())
            {
                return v("consent", "values are CONSENT_GRANTED or CONSENT_DENIED");
            }
        }
    }
    if let Some(a) = &e.ad_identifiers
        && a.gbraid.is_some()
        && a.wbraid.is_some()
    {
        return v("ad_identifiers", "gbraid and wbraid are both set");
    }
    let ids = e
        .user_data
        .as_ref()
        .map_or(&[][..], |u| &u.user_identifiers[..]);
    if ids.len() > 10 {
        return v("user_data.user_identifiers", "at most 10 identifiers");
    }
    if !ids.is_empty() && encoding != Some("HEX") && encoding != Some("BASE64") {
        return v("encoding", "is required with user data");
    }
    for (k, id) in ids.iter().enumerate() {
        let set = [
            id.email_address.is_some(),
            id.phone_number.is_some(),
            id.address.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if set != 1 {
            return v(
                &format!("user_data.user_identifiers[{k}]"),
                "exactly one of email_address, phone_number, address",
            );
        }
        let hashed: Vec<&String> = match (&id.email_address, &id.phone_number, &id.address) {
            (Some(x), _, _) | (_, Some(x), _) => vec![x],
            (_, _, Some(a)) => {
                if a.region_code.as_deref().is_none_or(|r| r.len() != 2) || a.postal_code.is_none()
                {
                    return v(
                        &format!("user_data.user_identifiers[{k}].address"),
                        "region_code and postal_code are required (not hashed)",
                    );
                }
                [&a.given_name, &a.family_name]
                    .into_iter()
                    .flatten()
                    .collect()
            }
            _ => vec![],
        };
        if encoding == Some("HEX") && hashed.iter().any(|h| !is_hex64(h)) {
            return v(
                &format!("user_data.user_identifiers[{k}]"),
                "must be SHA-256 hashed and hex encoded",
            );
        }
    }
    let has_click = e
        .ad_identifiers
        .as_ref()
        .is_some_and(|a| a.gclid.is_some() || a.gbraid.is_some() || a.wbraid.is_some());
    if !has_click && ids.is_empty() {
        return v("ad_identifiers", "an event needs a click id or user data");
    }
    if e.transaction_id
        .as_ref()
        .is_some_and(|t| d.poison.contains(t))
    {
        return v("transaction_id", "rejected by the fake (poisoned)");
    }
    Ok(())
}

async fn ingest(State(s): State<FakeGoogle>, headers: HeaderMap, body: Bytes) -> Reply {
    if let Err(r) = authorized(&s, &headers) {
        return r;
    }
    let fault = match fault(&s).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let req: Ingest = match parse(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let bad = |violations: Vec<Value>| {
        rpc_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "Request contains an invalid argument.",
            vec![
                json!({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "INVALID_ARGUMENT", "domain": "datamanager.googleapis.com"}),
                json!({"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": violations}),
            ],
        )
    };
    if req.events.is_empty() || req.events.len() > 2000 {
        return bad(vec![
            json!({"field": "events", "description": "must hold 1 to 2000 events"}),
        ]);
    }
    if req.destinations.is_empty() || req.destinations.len() > 10 {
        return bad(vec![
            json!({"field": "destinations", "description": "must hold 1 to 10 destinations"}),
        ]);
    }
    let _ = &req.consent;
    let mut refs = HashMap::new();
    for (i, dst) in req.destinations.iter().enumerate() {
        let op = dst.operating_account.as_ref();
        let ok_account = |a: Option<&Account>| {
            a.is_some_and(|a| {
                a.account_type.as_deref() == Some("GOOGLE_ADS")
                    && a.account_id
                        .as_deref()
                        .is_some_and(|id| id.len() == 10 && id.bytes().all(|b| b.is_ascii_digit()))
            })
        };
        if !ok_account(op)
            || dst
                .login_account
                .as_ref()
                .is_some_and(|l| !ok_account(Some(l)))
        {
            return bad(vec![
                json!({"field": format!("destinations[{i}].operating_account"), "description": "a GOOGLE_ADS account with a 10-digit id"}),
            ]);
        }
        let _ = &dst.linked_account;
        let Some(pd) = dst.product_destination_id.clone() else {
            return bad(vec![
                json!({"field": format!("destinations[{i}].product_destination_id"), "description": "is required"}),
            ]);
        };
        refs.insert(dst.reference.clone().unwrap_or_default(), pd);
    }
    let ref_names: HashSet<String> = refs.keys().cloned().collect();
    let raw: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let request_id = {
        let mut d = lock(&s.data);
        let violations: Vec<Value> = req
            .events
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                check_dm_event(&d, e, &ref_names, req.encoding.as_deref())
                    .err()
                    .map(|(f, m)| json!({"field": format!("events[{i}].{f}"), "description": m}))
            })
            .collect();
        if !violations.is_empty() {
            return bad(violations);
        }
        d.requests.push(("events:ingest".into(), raw.clone()));
        d.batch_sizes.push(req.events.len());
        let request_id = format!("fake-request-{}", d.requests.len());
        if req.validate_only != Some(true) {
            for (i, e) in req.events.iter().enumerate() {
                for r in e.destination_references.iter().flatten() {
                    let key = (
                        refs[r].clone(),
                        e.transaction_id.clone().unwrap_or_default(),
                    );
                    *d.dm_sends.entry(key.clone()).or_insert(0) += 1;
                    d.dm_events.insert(key, raw["events"][i].clone());
                }
            }
            d.request_ids.push(request_id.clone());
        }
        request_id
    };
    hold(fault).await;
    (StatusCode::OK, Json(json!({"requestId": request_id})))
}

async fn request_status(
    State(s): State<FakeGoogle>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Reply {
    if let Err(r) = authorized(&s, &headers) {
        return r;
    }
    let d = lock(&s.data);
    match q.get("requestId") {
        Some(id) if d.request_ids.contains(id) => (
            StatusCode::OK,
            Json(
                json!({"requestStatusPerDestination": [{"requestStatus": "SUCCESS",
                "eventsIngestionStatus": {"recordCount": "1"}}]}),
            ),
        ),
        _ => rpc_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "unknown requestId",
            vec![],
        ),
    }
}

impl FakeGoogle {
    /// Starts on an ephemeral loopback port.
    pub async fn start() -> FakeGoogle {
        Self::start_on("127.0.0.1:0").await
    }

    /// Starts on `addr` (the local stack uses a fixed port). The OAuth endpoint is
    /// `{base_url}/token`; both APIs live under `base_url`.
    pub async fn start_on(addr: &str) -> FakeGoogle {
        let fake = FakeGoogle {
            base_url: String::new(),
            client_id: "fake-client.apps.googleusercontent.com".into(),
            client_secret: "fake-client-secret".into(),
            refresh_token: "1//fake-refresh-token".into(),
            developer_token: "fake-developer-token".into(),
            data: Arc::new(Mutex::new(Data::default())),
        };
        let app = Router::new()
            .route("/token", post(token))
            .route("/{version}/customers/{*rest}", post(ads))
            .route("/v1/events:ingest", post(ingest))
            .route("/v1/requestStatus:retrieve", get(request_status))
            .with_state(fake.clone());
        let base_url = super::serve_on(addr, app).await;
        FakeGoogle { base_url, ..fake }
    }

    pub fn token_url(&self) -> String {
        format!("{}/token", self.base_url)
    }

    /// The credentials JSON the sender reads from SSM.
    pub fn credentials_json(&self) -> String {
        json!({"client_id": self.client_id, "client_secret": self.client_secret,
               "refresh_token": self.refresh_token, "developer_token": self.developer_token})
        .to_string()
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut Data) -> R) -> R {
        f(&mut lock(&self.data))
    }

    pub fn inject(&self, f: Fault) {
        self.with(|d| d.faults.push_back(f));
    }

    /// Invalidates every token issued so far (they "expire" mid-run).
    pub fn expire_tokens(&self) {
        self.with(|d| d.tokens.values_mut().for_each(|v| *v = false));
    }

    pub fn conversions(&self) -> BTreeMap<String, Conversion> {
        self.with(|d| d.conversions.clone())
    }

    pub fn requests(&self, kind: &str) -> Vec<Value> {
        self.with(|d| {
            d.requests
                .iter()
                .filter(|(k, _)| k == kind)
                .map(|(_, v)| v.clone())
                .collect()
        })
    }

    /// Revenue Google holds per currency: imported conversions at their current (restated)
    /// value, retracted ones excluded.
    pub fn revenue(&self) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        for c in self
            .conversions()
            .values()
            .filter(|c| !c.retracted && !c.currency.is_empty())
        {
            *m.entry(c.currency.clone()).or_insert(0.0) += c.value;
        }
        m
    }
}
