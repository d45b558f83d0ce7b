//! Google Ads: click conversions and refund adjustments through the Google Ads API, or events
//! and restatements through the Data Manager API, chosen per account by the mapping; the OAuth
//! token cache; the customer-data-terms pre-flight; and the classification of partial failures
//! (Ads API) and fast-fail errors (Data Manager) into one outcome per event.

use async_trait::async_trait;
use bridge_core::consent::{Consent, GoogleSignal};
use bridge_core::delivery::{Answer, Attempt, Limits, Outcome, deliver_isolating};
use bridge_core::delivery::{DeliveryStatus, Destination, ErrorInfo};
use bridge_core::event::{CanonicalEvent, EventName};
use bridge_core::identity::{ClickIds, GoogleHashes};
use bridge_core::mapping::{
    FullRefundPolicy, GoogleBackend, GoogleConversion, GoogleMapping, GoogleRefundPolicy, Mapping,
};
use bridge_core::money::Money;
use bridge_core::timestamp::Timestamp;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use bridge_core::delivery::REQUEST_ID_PREFIX;

/// Both APIs take at most 2,000 rows (conversions, adjustments or events) per request.
pub const MAX_ROWS: usize = 2000;
/// How long Google asks us to wait after TOO_RECENT_EVENT / TOO_RECENT_CONVERSION_ACTION.
pub const TOO_RECENT_WAIT: Duration = Duration::from_secs(6 * 3600);
/// CONVERSION_NOT_FOUND: the adjustment may have overtaken Google's processing of the
/// conversion, so it is retried this many times, an hour apart, before it is dead-lettered.
pub const CONVERSION_NOT_FOUND_ATTEMPTS: u32 = 4;
pub const CONVERSION_NOT_FOUND_WAIT: Duration = Duration::from_secs(3600);

/// OAuth client, refresh token and developer token, as stored (JSON) in SSM.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoogleCredentials {
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
    /// Needed by the Google Ads API only; the Data Manager API takes none.
    #[serde(default)]
    pub developer_token: Option<String>,
}

impl fmt::Debug for GoogleCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GoogleCredentials")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("refresh_token", &"<redacted>")
            .field(
                "developer_token",
                &self.developer_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("Google credentials: {0}")]
pub struct CredentialsError(#[from] serde_json::Error);

impl GoogleCredentials {
    pub fn from_json(text: &str) -> Result<Self, CredentialsError> {
        Ok(serde_json::from_str(text)?)
    }
}

#[derive(Clone, Debug)]
pub struct GoogleConfig {
    pub ads_base_url: String,
    pub ads_api_version: String,
    pub datamanager_base_url: String,
    pub token_url: String,
    pub credentials: GoogleCredentials,
    /// Dry runs: `validateOnly: true` on every request; Google checks and imports nothing.
    pub validate_only: bool,
    pub timeout: Duration,
    /// How long a customer-data-terms answer is trusted.
    pub terms_ttl: Duration,
}

fn err(code: &str, message: impl Into<String>) -> ErrorInfo {
    ErrorInfo {
        code: code.into(),
        message: message.into(),
    }
}

fn rejected(code: &str, message: impl Into<String>) -> Outcome {
    Outcome::Rejected {
        error: err(code, message),
        dead_letter: true,
        alert: false,
    }
}

fn retry(code: &str, message: impl Into<String>, after: Option<Duration>) -> Outcome {
    Outcome::Retryable {
        error: err(code, message),
        after,
    }
}

// ---- building rows ----

/// Which API and which call a row belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Ads API `uploadClickConversions`.
    Click,
    /// Ads API `uploadConversionAdjustments`.
    Adjustment,
    /// Data Manager `events:ingest`.
    DataManager,
}

/// One row, ready to batch.
#[derive(Clone, Debug, PartialEq)]
pub struct GoogleItem {
    pub kind: Kind,
    pub row: Value,
    pub customer_id: String,
    pub login_customer_id: Option<String>,
    /// The conversion action id (Data Manager's productDestinationId).
    pub action_id: String,
    /// The row carries hashed user data, so the customer data terms must be accepted.
    pub has_user_data: bool,
    /// This delivery attempt (1-based), for errors that allow only a few tries.
    pub attempt: u32,
    /// A full refund restated to 0 because the back end cannot retract.
    pub restated_to_zero: bool,
}

impl GoogleItem {
    /// The conversion action's resource name.
    pub fn action(&self) -> String {
        format!(
            "customers/{}/conversionActions/{}",
            self.customer_id, self.action_id
        )
    }

    /// The order the row is for (`orderId`, or Data Manager's `transactionId`).
    pub fn order(&self) -> Option<&str> {
        self.row
            .get("orderId")
            .or_else(|| self.row.get("transactionId"))
            .and_then(Value::as_str)
    }

    /// Rows are batched per call, customer and manager account (and, for Data Manager, per
    /// conversion action, which is the request's destination).
    pub fn group(&self) -> String {
        let login = self.login_customer_id.as_deref().unwrap_or("-");
        match self.kind {
            Kind::Click => format!("ads-click/{}/{login}", self.customer_id),
            Kind::Adjustment => format!("ads-adjust/{}/{login}", self.customer_id),
            Kind::DataManager => {
                format!(
                    "datamanager/{}/{login}/{}",
                    self.customer_id, self.action_id
                )
            }
        }
    }
}

/// gclid first; otherwise one braid, never both (GBRAID_WBRAID_BOTH_SET).
fn click_id(c: &ClickIds) -> Option<(&'static str, &str)> {
    if let Some(g) = &c.gclid {
        return Some(("gclid", g));
    }
    if let Some(g) = &c.gbraid {
        return Some(("gbraid", g));
    }
    c.wbraid.as_deref().map(|w| ("wbraid", w))
}

/// Ads API user identifiers: one identifier per object (the field is a oneof), hashed email
/// and phone only (the only kinds a click conversion accepts).
fn ads_identifiers(g: &GoogleHashes) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(e) = &g.email {
        out.push(json!({"hashedEmail": e, "userIdentifierSource": "FIRST_PARTY"}));
    }
    if let Some(p) = &g.phone {
        out.push(json!({"hashedPhoneNumber": p, "userIdentifierSource": "FIRST_PARTY"}));
    }
    out
}

/// Data Manager user identifiers: one per object; an address only when all four parts are
/// known (Google matches on the whole address), with names hashed and region/postal code not.
fn dm_identifiers(g: &GoogleHashes) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(e) = &g.email {
        out.push(json!({"emailAddress": e}));
    }
    if let Some(p) = &g.phone {
        out.push(json!({"phoneNumber": p}));
    }
    if let (Some(gn), Some(fam), Some(rc), Some(pc)) = (
        &g.given_name,
        &g.family_name,
        &g.region_code,
        &g.postal_code,
    ) {
        out.push(json!({"address": {"givenName": gn, "familyName": fam, "regionCode": rc, "postalCode": pc}}));
    }
    out
}

fn ads_consent(c: &Consent) -> Value {
    let s = |g: GoogleSignal| match g {
        GoogleSignal::Granted => "GRANTED",
        GoogleSignal::Denied => "DENIED",
    };
    // Only consented events reach a sender, so an unstated ad_user_data is the granted consent.
    let mut v = json!({"adUserData": s(c.ad_user_data.unwrap_or(GoogleSignal::Granted))});
    if let Some(p) = c.ad_personalization {
        v["adPersonalization"] = json!(s(p));
    }
    v
}

fn dm_consent(c: &Consent) -> Value {
    let s = |g: GoogleSignal| match g {
        GoogleSignal::Granted => "CONSENT_GRANTED",
        GoogleSignal::Denied => "CONSENT_DENIED",
    };
    let mut v = json!({"adUserData": s(c.ad_user_data.unwrap_or(GoogleSignal::Granted))});
    if let Some(p) = c.ad_personalization {
        v["adPersonalization"] = json!(s(p));
    }
    v
}

fn ads_time(t: Timestamp) -> String {
    t.google_ads_datetime(time::UtcOffset::UTC)
}

/// The order id Google deduplicates on: the deal's order id for revenue; for lead stages the
/// event's store key (its event id when derived here; scoped by source when the caller gave
/// one, so two sources' ids never collide at Google), so a replay of the same lead is
/// recognised (ORDER_ID_ALREADY_IN_USE) too.
fn order_key(e: &CanonicalEvent) -> String {
    e.order_id.clone().unwrap_or_else(|| e.key.clone())
}

/// The Google row for one stored event, or why it can never be valid. `order` holds the
/// order's stored events (refunds only).
pub fn build_item(
    e: &CanonicalEvent,
    order: &[CanonicalEvent],
    mapping: &Mapping,
    now: Timestamp,
) -> Result<GoogleItem, ErrorInfo> {
    let Some(g) = &mapping.google else {
        return Err(err("not_mapped", "Google is not enabled in the mapping"));
    };
    if e.occurred_at.secs_since(&now) > 60 {
        return Err(err("event_in_future", "occurred_at is in the future"));
    }
    let attempt = e
        .destinations
        .get(&Destination::Google)
        .map_or(1, |s| s.attempts.max(1));
    if e.event_name == EventName::Refund {
        return build_adjustment(e, order, g, now, attempt);
    }
    let Some(conv) = g.conversions.get(&e.event_name) else {
        return Err(err(
            "not_mapped",
            format!(
                "{} is not mapped to a Google conversion action",
                e.event_name
            ),
        ));
    };
    let backend = g.backend_for(&conv.customer_id);
    let click = click_id(&e.identity.click);
    if click.is_none() && !conv.allow_without_click_id {
        return Err(err(
            "no_click_id",
            format!(
                "{} needs a gclid, gbraid or wbraid: the action is not set up for enhanced conversions for leads (allow_without_click_id)",
                conv.action
            ),
        ));
    }
    if e.event_name.is_revenue() && (e.value.is_none() || e.currency.is_none()) {
        return Err(err(
            "missing_value",
            "a revenue conversion needs value and currency",
        ));
    }
    let item = |kind, row, has_user_data| GoogleItem {
        kind,
        row,
        customer_id: conv.customer_id.clone(),
        login_customer_id: g.login_for(&conv.customer_id).map(str::to_string),
        action_id: conv.action_id.clone(),
        has_user_data,
        attempt,
        restated_to_zero: false,
    };
    match backend {
        GoogleBackend::AdsApi => {
            let ids = ads_identifiers(&e.identity.google);
            if click.is_none() && ids.is_empty() {
                return Err(err(
                    "no_identifier",
                    "no click id and no hashed email or phone to match on",
                ));
            }
            let has_user_data = !ids.is_empty();
            Ok(item(
                Kind::Click,
                click_row(e, conv, click, ids, e.value),
                has_user_data,
            ))
        }
        GoogleBackend::DataManager => {
            let row = dm_event(e, e, e.value)?;
            let has_user_data = row.get("userData").is_some();
            Ok(item(Kind::DataManager, row, has_user_data))
        }
    }
}

fn click_row(
    e: &CanonicalEvent,
    conv: &GoogleConversion,
    click: Option<(&str, &str)>,
    ids: Vec<Value>,
    value: Option<Money>,
) -> Value {
    let mut row = Map::new();
    if let Some((k, v)) = click {
        row.insert(k.into(), json!(v));
    }
    row.insert("conversionAction".into(), json!(conv.action));
    row.insert("conversionDateTime".into(), json!(ads_time(e.occurred_at)));
    if let Some(v) = value {
        row.insert("conversionValue".into(), json!(v.as_f64()));
    }
    if let Some(c) = &e.currency {
        row.insert("currencyCode".into(), json!(c));
    }
    row.insert("orderId".into(), json!(order_key(e)));
    if !ids.is_empty() {
        row.insert("userIdentifiers".into(), Value::Array(ids));
    }
    row.insert("consent".into(), ads_consent(&e.consent));
    Value::Object(row)
}

/// A Data Manager event for `original` (the conversion) at `value`, with the consent of
/// `current` (the event being delivered: the conversion itself, or a refund restating it).
fn dm_event(
    original: &CanonicalEvent,
    current: &CanonicalEvent,
    value: Option<Money>,
) -> Result<Value, ErrorInfo> {
    let mut ev = Map::new();
    ev.insert("destinationReferences".into(), json!(["d0"]));
    ev.insert("transactionId".into(), json!(order_key(original)));
    ev.insert(
        "eventTimestamp".into(),
        json!(original.occurred_at.canonical()),
    );
    ev.insert("eventSource".into(), json!("OTHER"));
    if let Some(v) = value {
        ev.insert("conversionValue".into(), json!(v.as_f64()));
    }
    if let Some(c) = &original.currency {
        ev.insert("currency".into(), json!(c));
    }
    ev.insert("consent".into(), dm_consent(&current.consent));
    if let Some((k, v)) = click_id(&original.identity.click) {
        ev.insert("adIdentifiers".into(), json!({ k: v }));
    }
    let ids = dm_identifiers(&original.identity.google);
    if !ids.is_empty() {
        ev.insert("userData".into(), json!({"userIdentifiers": ids}));
    }
    if ev.get("adIdentifiers").is_none() && ev.get("userData").is_none() {
        return Err(err(
            "no_identifier",
            "no click id and no hashed user data to match on",
        ));
    }
    Ok(Value::Object(ev))
}

/// A refund restates (or retracts) the won conversion of its order. The restatement carries the
/// order's new total given every refund known now, and its time is a pure function of that set
/// (the latest refund's time plus one second per earlier refund), so: a later restatement is
/// always strictly later; a refund arriving out of order still yields the right total; and
/// re-sending the same state is a duplicate Google ignores, never a second adjustment.
fn build_adjustment(
    refund: &CanonicalEvent,
    order: &[CanonicalEvent],
    g: &GoogleMapping,
    now: Timestamp,
    attempt: u32,
) -> Result<GoogleItem, ErrorInfo> {
    if g.refund_policy == GoogleRefundPolicy::Skip {
        return Err(err(
            "not_mapped",
            "refunds are not sent to Google (refund_policy = skip)",
        ));
    }
    let Some(mapped) = g.conversions.get(&EventName::Won) else {
        return Err(err("not_mapped", "no Google conversion action for won"));
    };
    let order_id = refund.order_id.as_deref().unwrap_or_default();
    let delivered = |e: &CanonicalEvent| {
        e.destinations
            .get(&Destination::Google)
            .is_some_and(|s| s.status.is_delivered())
    };
    let wons = order
        .iter()
        .filter(|e| e.event_name == EventName::Won && delivered(e));
    // The conversion Google holds for the order: the Ads API keeps the first upload of an
    // order id (a later one is ORDER_ID_ALREADY_IN_USE); Data Manager keeps the last value
    // written for a transactionId. With the order guard there is one delivered won; a stack
    // upgraded from before it may hold two.
    let key = |e: &&CanonicalEvent| (e.occurred_at, e.key.clone());
    let won = match g.backend_for(&mapped.customer_id) {
        GoogleBackend::AdsApi => wons.min_by_key(key),
        GoogleBackend::DataManager => wons.max_by_key(key),
    };
    let Some(won) = won else {
        return Err(err(
            "original_not_delivered",
            format!("no delivered won event for order {order_id}"),
        ));
    };
    // An adjustment cannot move a conversion to another action: it targets the action the won
    // was really uploaded under, whatever the mapping says now.
    let sent_under = won
        .destinations
        .get(&Destination::Google)
        .and_then(|s| s.delivered_as())
        .and_then(GoogleConversion::from_resource);
    let conv = sent_under.as_ref().unwrap_or(mapped);
    let (Some(won_value), Some(currency)) = (won.value, won.currency.as_deref()) else {
        return Err(err("missing_value", "the won event has no value to adjust"));
    };
    if refund.currency.as_deref() != Some(currency) {
        return Err(err(
            "currency_mismatch",
            format!(
                "refund in {} for a conversion in {currency}",
                refund.currency.as_deref().unwrap_or("no currency")
            ),
        ));
    }
    // Refunds that will never be sent (another source's, blocked, invalid) do not count.
    let counts = |e: &CanonicalEvent| {
        e.event_name == EventName::Refund
            && e.currency.as_deref() == Some(currency)
            && e.destinations.get(&Destination::Google).is_some_and(|s| {
                !matches!(
                    s.status,
                    DeliveryStatus::RejectedNotSystemOfRecord
                        | DeliveryStatus::Rejected
                        | DeliveryStatus::BlockedConsent
                )
            })
    };
    let mut refunds: BTreeMap<&str, &CanonicalEvent> = order
        .iter()
        .filter(|e| counts(e))
        .map(|e| (e.event_id.as_str(), e))
        .collect();
    refunds.insert(refund.event_id.as_str(), refund);
    let refunded = refunds
        .values()
        .filter_map(|e| e.value)
        .fold(Money::from_micros(0), Money::saturating_add);
    let total = won_value.saturating_sub(refunded);
    let latest = refunds
        .values()
        .map(|e| e.occurred_at)
        .max()
        .unwrap_or(refund.occurred_at);
    let mut at = latest.plus_secs(refunds.len() as i64 - 1);
    let after_conversion = won.occurred_at.plus_secs(1);
    if at < after_conversion {
        at = after_conversion;
    }
    // Google rejects adjustments dated in the future; only refunds seconds old can get here.
    if at > now {
        at = now;
    }
    let full = total.micros() <= 0;
    let backend = match (g.backend_for(&conv.customer_id), full, g.full_refund_policy) {
        (GoogleBackend::DataManager, true, FullRefundPolicy::RetractViaAdsApi) => {
            GoogleBackend::AdsApi
        }
        (b, _, _) => b,
    };
    let mut item = GoogleItem {
        kind: Kind::Adjustment,
        row: Value::Null,
        customer_id: conv.customer_id.clone(),
        login_customer_id: g.login_for(&conv.customer_id).map(str::to_string),
        action_id: conv.action_id.clone(),
        has_user_data: false,
        attempt,
        restated_to_zero: false,
    };
    match backend {
        GoogleBackend::AdsApi => {
            let mut row = json!({
                "conversionAction": conv.action,
                "adjustmentType": if full { "RETRACTION" } else { "RESTATEMENT" },
                "adjustmentDateTime": ads_time(at),
                "orderId": order_id,
            });
            if !full {
                row["restatementValue"] =
                    json!({"adjustedValue": total.as_f64(), "currencyCode": currency});
            }
            item.row = row;
        }
        GoogleBackend::DataManager => {
            let value = if full { Money::from_micros(0) } else { total };
            item.kind = Kind::DataManager;
            item.row = dm_event(won, refund, Some(value))?;
            item.has_user_data = item.row.get("userData").is_some();
            item.restated_to_zero = full;
        }
    }
    Ok(item)
}

// ---- classifying answers ----

const REPLAY: &[&str] = &[
    "ORDER_ID_ALREADY_IN_USE",
    "CLICK_CONVERSION_ALREADY_EXISTS",
    "CONVERSION_ALREADY_RETRACTED",
    "CONVERSION_ALREADY_ENHANCED",
    "RESTATEMENT_ALREADY_EXISTS",
];
const TRANSIENT: &[&str] = &[
    "RESOURCE_EXHAUSTED",
    "RESOURCE_TEMPORARILY_EXHAUSTED",
    "INTERNAL_ERROR",
    "TRANSIENT_ERROR",
    "DEADLINE_EXCEEDED",
    "CONCURRENT_MODIFICATION",
    "UNAVAILABLE",
];
const CONFIGURATION: &[&str] = &[
    "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS",
    "CUSTOMER_DATA_POLICY_PROHIBITS_ENHANCED_CONVERSIONS",
    "NO_CONVERSION_ACTION_FOUND",
    "INVALID_CONVERSION_ACTION_TYPE",
    "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE",
    "CUSTOMER_NOT_ENABLED",
    "DEVELOPER_TOKEN_NOT_APPROVED",
    "DEVELOPER_TOKEN_PROHIBITED",
    "USER_PERMISSION_DENIED",
    "NOT_ACTIVE",
    "PARTIAL_FAILURE_MODE_REQUIRED",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
];

/// One Google error code (the enum value, e.g. `CLICK_NOT_FOUND`) as an outcome for its row.
pub fn classify_code(
    code: &str,
    message: &str,
    attempt: u32,
    retry_after: Option<Duration>,
) -> Outcome {
    let info = err(code, message);
    match code {
        c if REPLAY.contains(&c) => Outcome::Delivered {
            platform_ref: None,
            replay: true,
        },
        "CLICK_NOT_FOUND" => Outcome::Rejected {
            error: info,
            dead_letter: false,
            alert: false,
        },
        "TOO_RECENT_EVENT" | "TOO_RECENT_CONVERSION_ACTION" => Outcome::Retryable {
            error: info,
            after: Some(TOO_RECENT_WAIT),
        },
        "CONVERSION_NOT_FOUND" if attempt < CONVERSION_NOT_FOUND_ATTEMPTS => Outcome::Retryable {
            error: info,
            after: Some(CONVERSION_NOT_FOUND_WAIT),
        },
        c if TRANSIENT.contains(&c) => Outcome::Retryable {
            error: info,
            after: retry_after,
        },
        c if CONFIGURATION.contains(&c) => Outcome::Rejected {
            error: info,
            dead_letter: true,
            alert: true,
        },
        _ => Outcome::Rejected {
            error: info,
            dead_letter: true,
            alert: false,
        },
    }
}

/// Which of two outcomes for one row wins when a row has several errors: what needs a person
/// first, then what can never succeed, then what may succeed later, then a replay.
fn severity(o: &Outcome) -> u8 {
    match o {
        Outcome::Closed { .. } | Outcome::Rejected { alert: true, .. } => 5,
        Outcome::Rejected {
            dead_letter: true, ..
        } => 4,
        Outcome::Rejected { .. } => 3,
        Outcome::Retryable { .. } | Outcome::Wait { .. } => 2,
        Outcome::Delivered { replay: true, .. } => 1,
        Outcome::Delivered { .. } => 0,
    }
}

/// The enum value inside an `errorCode` object such as `{"conversionUploadError": "X"}`.
fn error_code(v: &Value) -> Option<&str> {
    v.as_object()?.values().find_map(Value::as_str)
}

/// `"3600s"` (a protobuf Duration in JSON) to a Duration.
fn proto_duration(v: &Value) -> Option<Duration> {
    let s = v.as_str()?.strip_suffix('s')?;
    let secs: f64 = s.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

/// The retry delay Google asked for anywhere in a status's details (quota errors carry
/// `quotaErrorDetails.retryDelay`; a google.rpc.RetryInfo carries `retryDelay`).
fn retry_delay(status: &Value) -> Option<Duration> {
    let details = status["details"].as_array()?;
    details.iter().find_map(|d| {
        proto_duration(&d["retryDelay"]).or_else(|| {
            d["errors"]
                .as_array()?
                .iter()
                .find_map(|e| proto_duration(&e["details"]["quotaErrorDetails"]["retryDelay"]))
        })
    })
}

/// Every GoogleAdsFailure error in a status: (row index if any, code, message).
fn ads_errors(status: &Value) -> Vec<(Option<usize>, String, String)> {
    let mut out = Vec::new();
    for d in status["details"].as_array().into_iter().flatten() {
        for e in d["errors"].as_array().into_iter().flatten() {
            let code = error_code(&e["errorCode"]).unwrap_or("UNKNOWN").to_string();
            let message = e["message"].as_str().unwrap_or("").to_string();
            let index = e["location"]["fieldPathElements"][0]["index"]
                .as_u64()
                .map(|i| i as usize);
            out.push((index, code, message));
        }
    }
    out
}

/// A 2xx answer to an upload with `partialFailure: true`: one outcome per row. Every error in
/// `partialFailureError` goes to the row its first field path element names; the other rows
/// are delivered.
pub fn classify_partial(body: &str, attempts: &[u32], validate_only: bool) -> Vec<Outcome> {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let job = v["jobId"]
        .as_str()
        .map(str::to_string)
        .or_else(|| v["jobId"].as_i64().map(|j| j.to_string()))
        .map(|j| format!("jobId:{j}"));
    let retry_after = retry_delay(&v["partialFailureError"]);
    let mut by_row: HashMap<usize, Outcome> = HashMap::new();
    let mut unplaced: Option<Outcome> = None;
    for (index, code, message) in ads_errors(&v["partialFailureError"]) {
        let attempt = index.and_then(|i| attempts.get(i)).copied().unwrap_or(1);
        let o = classify_code(&code, &message, attempt, retry_after);
        let slot = match index {
            Some(i) if i < attempts.len() => by_row.entry(i).or_insert_with(|| o.clone()),
            _ => unplaced.get_or_insert_with(|| o.clone()),
        };
        if severity(&o) > severity(slot) {
            *slot = o;
        }
    }
    let results = v["results"].as_array();
    (0..attempts.len())
        .map(|i| {
            if let Some(o) = by_row.remove(&i) {
                return match o {
                    Outcome::Delivered { replay, .. } => Outcome::Delivered {
                        platform_ref: job.clone(),
                        replay,
                    },
                    o => o,
                };
            }
            let empty = results
                .and_then(|r| r.get(i))
                .is_none_or(|r| r.as_object().is_some_and(Map::is_empty));
            if empty && !validate_only {
                // A failed row with no error we could place: never count it as delivered.
                return unplaced.clone().unwrap_or_else(|| {
                    retry("no_result", "Google returned no result for this row", None)
                });
            }
            Outcome::Delivered {
                platform_ref: job.clone(),
                replay: false,
            }
        })
        .collect()
}

/// A non-2xx answer from the Ads API, for the whole request.
pub fn classify_ads_error(status: u16, body: &str) -> Outcome {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let e = &v["error"];
    let rpc = e["status"].as_str().unwrap_or("");
    let errors = ads_errors(e);
    let message = e["message"].as_str().unwrap_or("no error message");
    let after = retry_delay(e);
    let first = errors
        .iter()
        .map(|(_, c, m)| (c.as_str(), m.as_str()))
        .next();
    let (code, msg) = first.unwrap_or((if rpc.is_empty() { "HTTP_ERROR" } else { rpc }, message));
    let label = if code == "HTTP_ERROR" {
        format!("http_{status}")
    } else {
        code.to_string()
    };
    if errors
        .iter()
        .any(|(_, c, _)| CONFIGURATION.contains(&c.as_str()))
        || status == 401
        || status == 403
    {
        return Outcome::Rejected {
            error: err(&label, msg),
            dead_letter: true,
            alert: true,
        };
    }
    if status == 429 || status >= 500 || TRANSIENT.contains(&rpc) {
        return retry(&label, msg, after);
    }
    if let Some((_, c, m)) = errors.first() {
        return classify_code(c, m, 1, after);
    }
    rejected(&label, msg)
}

/// The event index in a Data Manager field path such as `events[3].user_data`.
fn event_index(field: &str) -> Option<usize> {
    let rest = field.strip_prefix("events[")?;
    rest[..rest.find(']')?].parse().ok()
}

/// A Data Manager answer: delivered with the requestId, bad events named by index (fast-fail),
/// or one outcome for the whole request.
pub fn classify_datamanager(status: u16, body: &str) -> Answer {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    if (200..300).contains(&status) {
        return Answer::Whole(Outcome::Delivered {
            // Prefixed so reconciliation can tell a Data Manager request from an Ads API job.
            platform_ref: v["requestId"]
                .as_str()
                .map(|r| format!("{REQUEST_ID_PREFIX}{r}")),
            replay: false,
        });
    }
    let e = &v["error"];
    let rpc = e["status"].as_str().unwrap_or("");
    let message = e["message"]
        .as_str()
        .unwrap_or("no error message")
        .to_string();
    let details = e["details"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let reason = details
        .iter()
        .find_map(|d| d["reason"].as_str())
        .unwrap_or(if rpc.is_empty() { "HTTP_ERROR" } else { rpc });
    let label = if reason == "HTTP_ERROR" {
        format!("http_{status}")
    } else {
        reason.to_string()
    };
    if status == 401 || status == 403 || CONFIGURATION.contains(&reason) {
        return Answer::Whole(Outcome::Rejected {
            error: err(&label, message),
            dead_letter: true,
            alert: true,
        });
    }
    if status == 429 || status >= 500 || TRANSIENT.contains(&rpc) {
        return Answer::Whole(retry(&label, message, retry_delay(e)));
    }
    let mut bad: BTreeMap<usize, ErrorInfo> = BTreeMap::new();
    for d in details {
        for f in d["fieldViolations"].as_array().into_iter().flatten() {
            let field = f["field"].as_str().unwrap_or("");
            if let Some(i) = event_index(field) {
                let description = f["description"].as_str().unwrap_or(&message);
                bad.entry(i)
                    .or_insert_with(|| err(&label, format!("{field}: {description}")));
            }
        }
    }
    if bad.is_empty() {
        Answer::Whole(rejected(&label, message))
    } else {
        Answer::BadItems(bad.into_iter().collect())
    }
}

// ---- tokens ----

/// OAuth access tokens from the refresh-token grant, cached until shortly before they expire.
/// The lock is held while refreshing, so concurrent requests share one refresh.
pub struct TokenSource {
    http: reqwest::Client,
    url: String,
    credentials: GoogleCredentials,
    timeout: Duration,
    cached: tokio::sync::Mutex<Option<(String, Instant)>>,
}

/// Refresh this long before the token's stated expiry.
const TOKEN_MARGIN: Duration = Duration::from_secs(120);

impl TokenSource {
    pub fn new(
        http: reqwest::Client,
        url: String,
        credentials: GoogleCredentials,
        timeout: Duration,
    ) -> Self {
        TokenSource {
            http,
            url,
            credentials,
            timeout,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    /// A valid access token, or the outcome every row of the request gets.
    pub async fn token(&self) -> Result<String, Outcome> {
        let mut cached = self.cached.lock().await;
        if let Some((t, until)) = &*cached
            && Instant::now() < *until
        {
            return Ok(t.clone());
        }
        let (token, lifetime) = self.fetch().await?;
        let until = Instant::now()
            + lifetime
                .saturating_sub(TOKEN_MARGIN)
                .max(Duration::from_secs(1));
        *cached = Some((token.clone(), until));
        Ok(token)
    }

    /// Forgets `stale` after a 401, unless another request already replaced it.
    pub async fn invalidate(&self, stale: &str) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|(t, _)| t == stale) {
            *cached = None;
        }
    }

    async fn fetch(&self) -> Result<(String, Duration), Outcome> {
        let c = &self.credentials;
        let form = [
            ("grant_type", "refresh_token"),
            ("client_id", c.client_id.as_str()),
            ("client_secret", c.client_secret.as_str()),
            ("refresh_token", c.refresh_token.as_str()),
        ];
        let resp = self
            .http
            .post(&self.url)
            .form(&form)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| retry("oauth_unavailable", format!("token endpoint: {e}"), None))?;
        let status = resp.status().as_u16();
        let body = resp
            .text()
            .await
            .map_err(|e| retry("oauth_unavailable", format!("token endpoint: {e}"), None))?;
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        if (200..300).contains(&status)
            && let Some(t) = v["access_token"].as_str()
        {
            let secs = v["expires_in"].as_u64().unwrap_or(3600);
            return Ok((t.to_string(), Duration::from_secs(secs)));
        }
        if status == 429 || status >= 500 {
            return Err(retry(
                "oauth_unavailable",
                format!("token endpoint answered {status}"),
                None,
            ));
        }
        // invalid_grant (revoked refresh token), invalid_client: a person must fix the credentials.
        let code = v["error"].as_str().unwrap_or("oauth_error");
        let description = v["error_description"]
            .as_str()
            .unwrap_or("token refresh refused");
        Err(Outcome::Rejected {
            error: err(&format!("oauth_{code}"), description),
            dead_letter: true,
            alert: true,
        })
    }
}

// ---- the platform ----

/// Google over HTTP: both back ends, the token cache and the terms cache.
pub struct GooglePlatform {
    http: reqwest::Client,
    cfg: GoogleConfig,
    mapping: Mapping,
    tokens: TokenSource,
    /// customer id -> (terms accepted, checked at).
    terms: Mutex<HashMap<String, (bool, Instant)>>,
    /// Data Manager request id -> its final status (SUCCESS, PARTIAL_SUCCESS, FAILED), which
    /// never changes once reached.
    statuses: Mutex<HashMap<String, String>>,
}

/// How long a refund waits before asking again whether Data Manager processed its won.
pub const PROCESSING_WAIT: Duration = Duration::from_secs(600);
/// How long before asking again about a won Google did not confirm (the operator may resend
/// it meanwhile); the refund ends `unconfirmed` at its wait deadline.
pub const UNCONFIRMED_WAIT: Duration = Duration::from_secs(3600);

enum Api {
    Ads,
    DataManager,
}

impl GooglePlatform {
    pub fn new(http: reqwest::Client, cfg: GoogleConfig, mapping: Mapping) -> Self {
        let tokens = TokenSource::new(
            http.clone(),
            cfg.token_url.clone(),
            cfg.credentials.clone(),
            cfg.timeout,
        );
        GooglePlatform {
            http,
            cfg,
            mapping,
            tokens,
            terms: Mutex::new(HashMap::new()),
            statuses: Mutex::new(HashMap::new()),
        }
    }

    /// POSTs `body` with a bearer token (refreshed once on a 401) and, for the Ads API, the
    /// developer token and manager account. The answer's status and text, or the outcome
    /// for every row when no answer came.
    async fn post(
        &self,
        api: Api,
        url: &str,
        login: Option<&str>,
        body: &Value,
    ) -> Result<(u16, String), Outcome> {
        let mut refreshed = false;
        loop {
            let token = self.tokens.token().await?;
            let mut req = self
                .http
                .post(url)
                .bearer_auth(&token)
                .json(body)
                .timeout(self.cfg.timeout);
            if let Api::Ads = api {
                if let Some(d) = &self.cfg.credentials.developer_token {
                    req = req.header("developer-token", d);
                }
                if let Some(l) = login {
                    req = req.header("login-customer-id", l);
                }
            }
            let resp = match req.send().await {
                Ok(r) => r,
                // A timeout may come after Google imported the rows: the retry carries the
                // same order ids / transaction ids, which Google deduplicates.
                Err(e) if e.is_timeout() => {
                    return Err(retry("timeout", "no answer in time", None));
                }
                Err(e) => return Err(retry("network", e.to_string(), None)),
            };
            let status = resp.status().as_u16();
            if status == 401 && !refreshed {
                self.tokens.invalidate(&token).await;
                refreshed = true;
                continue;
            }
            let text = resp
                .text()
                .await
                .map_err(|e| retry("response_read", e.to_string(), None))?;
            return Ok((status, text));
        }
    }

    fn ads_url(&self, customer: &str, method: &str) -> String {
        format!(
            "{}/{}/customers/{customer}{method}",
            self.cfg.ads_base_url, self.cfg.ads_api_version
        )
    }

    /// Whether enhanced conversions may carry user data for `customer`: the customer data
    /// terms of the account that owns conversion tracking (it may name another customer).
    async fn terms_accepted(&self, customer: &str, login: Option<&str>) -> Result<bool, Outcome> {
        if let Ok(t) = self.terms.lock()
            && let Some((ok, at)) = t.get(customer)
        {
            let ttl = if *ok {
                self.cfg.terms_ttl
            } else {
                self.cfg.terms_ttl / 12
            };
            if at.elapsed() < ttl {
                return Ok(*ok);
            }
        }
        let query = "SELECT customer.conversion_tracking_setting.accepted_customer_data_terms, customer.conversion_tracking_setting.google_ads_conversion_customer FROM customer";
        let mut target = customer.to_string();
        let mut accepted = false;
        for _ in 0..2 {
            let url = self.ads_url(&target, "/googleAds:search");
            let (status, text) = self
                .post(Api::Ads, &url, login, &json!({ "query": query }))
                .await?;
            if !(200..300).contains(&status) {
                return Err(classify_ads_error(status, &text));
            }
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            let setting = &v["results"][0]["customer"]["conversionTrackingSetting"];
            accepted = setting["acceptedCustomerDataTerms"].as_bool() == Some(true);
            let owner = setting["googleAdsConversionCustomer"]
                .as_str()
                .and_then(|c| c.strip_prefix("customers/"))
                .map(str::to_string);
            match owner {
                Some(o) if o != target => target = o,
                _ => break,
            }
        }
        if let Ok(mut t) = self.terms.lock() {
            t.insert(customer.to_string(), (accepted, Instant::now()));
        }
        Ok(accepted)
    }

    async fn send_ads(&self, items: &[GoogleItem], limits: Limits) -> Vec<Outcome> {
        let first = &items[0];
        let login = first.login_customer_id.as_deref();
        let mut out: Vec<Option<Outcome>> = vec![None; items.len()];
        if items.iter().any(|i| i.has_user_data) {
            match self.terms_accepted(&first.customer_id, login).await {
                Ok(true) => {}
                Ok(false) => {
                    let held = Outcome::Rejected {
                        error: err(
                            "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS",
                            format!(
                                "customer {} has not accepted the customer data terms; events with user data are held",
                                first.customer_id
                            ),
                        ),
                        dead_letter: true,
                        alert: true,
                    };
                    for (i, it) in items.iter().enumerate() {
                        if it.has_user_data {
                            out[i] = Some(held.clone());
                        }
                    }
                }
                Err(o) => return vec![o; items.len()],
            }
        }
        let pending: Vec<usize> = (0..items.len()).filter(|&i| out[i].is_none()).collect();
        let batch: Vec<GoogleItem> = pending.iter().map(|&i| items[i].clone()).collect();
        let request = AdsRequest { platform: self };
        for (k, o) in deliver_isolating(&request, &batch, limits)
            .await
            .into_iter()
            .enumerate()
        {
            out[pending[k]] = Some(o);
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| retry("no_outcome", "not sent", None)))
            .collect()
    }
}

struct AdsRequest<'a> {
    platform: &'a GooglePlatform,
}

#[async_trait]
impl Attempt<GoogleItem> for AdsRequest<'_> {
    async fn attempt(&self, items: &[GoogleItem]) -> Answer {
        let p = self.platform;
        let first = &items[0];
        let rows: Vec<&Value> = items.iter().map(|i| &i.row).collect();
        let (method, key) = match first.kind {
            Kind::Adjustment => (":uploadConversionAdjustments", "conversionAdjustments"),
            _ => (":uploadClickConversions", "conversions"),
        };
        let body =
            json!({ key: rows, "partialFailure": true, "validateOnly": p.cfg.validate_only });
        let url = p.ads_url(&first.customer_id, method);
        match p
            .post(Api::Ads, &url, first.login_customer_id.as_deref(), &body)
            .await
        {
            Ok((status, text)) if (200..300).contains(&status) => {
                let attempts: Vec<u32> = items.iter().map(|i| i.attempt).collect();
                Answer::PerItem(classify_partial(&text, &attempts, p.cfg.validate_only))
            }
            Ok((status, text)) => Answer::Whole(classify_ads_error(status, &text)),
            Err(o) => Answer::Whole(o),
        }
    }
}

struct DataManagerRequest<'a> {
    platform: &'a GooglePlatform,
}

#[async_trait]
impl Attempt<GoogleItem> for DataManagerRequest<'_> {
    async fn attempt(&self, items: &[GoogleItem]) -> Answer {
        let p = self.platform;
        let first = &items[0];
        let mut destination = json!({
            "reference": "d0",
            "operatingAccount": {"accountType": "GOOGLE_ADS", "accountId": first.customer_id},
            "productDestinationId": first.action_id,
        });
        if let Some(l) = &first.login_customer_id {
            destination["loginAccount"] = json!({"accountType": "GOOGLE_ADS", "accountId": l});
        }
        let events: Vec<&Value> = items.iter().map(|i| &i.row).collect();
        let mut body = json!({
            "destinations": [destination],
            "events": events,
            "validateOnly": p.cfg.validate_only,
        });
        if items.iter().any(|i| i.has_user_data) {
            body["encoding"] = json!("HEX");
        }
        let url = format!("{}/v1/events:ingest", p.cfg.datamanager_base_url);
        match p.post(Api::DataManager, &url, None, &body).await {
            Ok((status, text)) => classify_datamanager(status, &text),
            Err(o) => Answer::Whole(o),
        }
    }
}

#[async_trait]
impl bridge_core::delivery::pipeline::Platform for GooglePlatform {
    type Item = GoogleItem;

    fn destination(&self) -> Destination {
        Destination::Google
    }

    fn max_batch(&self) -> usize {
        MAX_ROWS
    }

    fn request_timeout(&self) -> Duration {
        self.cfg.timeout
    }

    fn sent_as(&self, item: &GoogleItem) -> Option<String> {
        Some(item.action())
    }

    fn row_key(&self, item: &GoogleItem) -> Option<String> {
        item.order().map(|order| {
            format!(
                "{:?}|{}|{}|{order}",
                item.kind, item.customer_id, item.action_id
            )
        })
    }

    async fn confirm_original(
        &self,
        refund: &CanonicalEvent,
        order: &[CanonicalEvent],
    ) -> Result<(), Outcome> {
        self.confirm_processed(refund, order).await
    }

    fn prepare(
        &self,
        event: &CanonicalEvent,
        order: &[CanonicalEvent],
        now: Timestamp,
    ) -> Result<(String, GoogleItem), ErrorInfo> {
        let item = build_item(event, order, &self.mapping, now)?;
        Ok((item.group(), item))
    }

    fn delivered_status(&self, item: &GoogleItem) -> DeliveryStatus {
        if item.restated_to_zero {
            DeliveryStatus::RetractionUnsupported
        } else {
            DeliveryStatus::Delivered
        }
    }

    async fn send(&self, _group: &str, items: &[GoogleItem], limits: Limits) -> Vec<Outcome> {
        if items.is_empty() {
            return Vec::new();
        }
        match items[0].kind {
            Kind::DataManager => {
                deliver_isolating(&DataManagerRequest { platform: self }, items, limits).await
            }
            Kind::Click | Kind::Adjustment => self.send_ads(items, limits).await,
        }
    }
}

impl GooglePlatform {
    /// A refund restated through Data Manager may only go once Google confirms it processed
    /// the won's request: a transactionId Google does not know creates a new conversion, so a
    /// restatement sent too early (or after a won Google refused) adds a conversion of its own.
    /// SUCCESS: go. PROCESSING: look again later. PARTIAL_SUCCESS, FAILED or unknown: the won's
    /// row cannot be confirmed; the refund waits until its deadline and ends `unconfirmed`.
    async fn confirm_processed(
        &self,
        refund: &CanonicalEvent,
        order: &[CanonicalEvent],
    ) -> Result<(), Outcome> {
        if self.cfg.validate_only {
            return Ok(());
        }
        let Ok(item) = build_item(refund, order, &self.mapping, Timestamp::now()) else {
            return Ok(()); // prepare will say why it cannot go
        };
        if item.kind != Kind::DataManager {
            return Ok(());
        }
        let won = order
            .iter()
            .filter(|e| e.event_name == EventName::Won)
            .filter_map(|e| Some((e, e.destinations.get(&Destination::Google)?)))
            .filter(|(_, s)| s.status.is_delivered())
            .max_by_key(|(e, _)| (e.occurred_at, e.key.clone()));
        let unconfirmed = |why: String, after: Duration| Outcome::Wait {
            error: err("original_unconfirmed", why),
            after,
            on_deadline: Some(DeliveryStatus::Unconfirmed),
        };
        let Some((won, state)) = won else {
            return Ok(());
        };
        let Some(request_id) = state
            .delivered_ref()
            .and_then(|r| r.strip_prefix(REQUEST_ID_PREFIX))
        else {
            return Err(unconfirmed(
                format!(
                    "the won event {} has no Data Manager request id to confirm",
                    won.event_id
                ),
                UNCONFIRMED_WAIT,
            ));
        };
        let status = self.request_status_of(request_id).await?;
        match status.as_str() {
            "SUCCESS" => Ok(()),
            "PROCESSING" => Err(Outcome::Wait {
                error: err(
                    "original_processing",
                    format!("Data Manager is still processing the won's request {request_id}"),
                ),
                after: PROCESSING_WAIT,
                on_deadline: Some(DeliveryStatus::Unconfirmed),
            }),
            other => Err(unconfirmed(
                format!(
                    "Data Manager answered {other} for the won's request {request_id}: the won's row cannot be confirmed, so the refund is not sent"
                ),
                UNCONFIRMED_WAIT,
            )),
        }
    }

    /// The status of a Data Manager request at its (only) destination, cached once final.
    async fn request_status_of(&self, request_id: &str) -> Result<String, Outcome> {
        if let Ok(cache) = self.statuses.lock()
            && let Some(s) = cache.get(request_id)
        {
            return Ok(s.clone());
        }
        let v = self.request_status(request_id).await?;
        let status = v["requestStatusPerDestination"][0]["requestStatus"]
            .as_str()
            .unwrap_or("REQUEST_STATUS_UNKNOWN")
            .to_string();
        if matches!(status.as_str(), "SUCCESS" | "PARTIAL_SUCCESS" | "FAILED")
            && let Ok(mut cache) = self.statuses.lock()
        {
            cache.insert(request_id.to_string(), status.clone());
        }
        Ok(status)
    }

    /// Data Manager processes asynchronously: the per-destination status of a request whose
    /// requestId was recorded on its events (for reconciliation).
    pub async fn request_status(&self, request_id: &str) -> Result<Value, Outcome> {
        let url = format!(
            "{}/v1/requestStatus:retrieve?requestId={request_id}",
            self.cfg.datamanager_base_url
        );
        let token = self.tokens.token().await?;
        let resp = self
            .http
            .get(url)
            .bearer_auth(token)
            .timeout(self.cfg.timeout)
            .send()
            .await
            .map_err(|e| retry("network", e.to_string(), None))?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| retry("response_read", e.to_string(), None))?;
        if !(200..300).contains(&status) {
            return Err(match classify_datamanager(status, &text) {
                Answer::Whole(o) => o,
                _ => rejected(&format!("http_{status}"), text),
            });
        }
        serde_json::from_str(&text).map_err(|e| rejected("unreadable_status", e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_core::delivery::DestinationState;
    use bridge_core::event::{ValidationContext, parse_event_json, validate};
    use bridge_core::hashing::sha256_hex;

    fn now() -> Timestamp {
        Timestamp::parse_rfc3339("2026-11-28T12:00:00Z").unwrap()
    }

    fn event(v: Value, status: Option<DeliveryStatus>) -> CanonicalEvent {
        let ctx = ValidationContext::for_tests(now());
        let mut e = validate(&parse_event_json(&v.to_string()).unwrap(), &ctx).unwrap();
        if let Some(s) = status {
            e.destinations
                .insert(Destination::Google, DestinationState::new(s, now()));
        }
        e
    }

    fn won(identity: Value) -> Value {
        json!({"source": "hubspot", "event_name": "won", "occurred_at": "2026-11-27T10:00:00Z", "entity_type": "opportunity",
               "entity_id": "D-1", "order_id": "O-1", "value": 100, "currency": "EUR", "identity": identity})
    }

    fn refund(value: f64, at: &str) -> Value {
        json!({"source": "hubspot", "event_name": "refund", "occurred_at": at, "entity_type": "order",
               "entity_id": format!("R-{at}"), "order_id": "O-1", "value": value, "currency": "EUR", "identity": {}})
    }

    fn mapping(backend: GoogleBackend) -> Mapping {
        let mut m = Mapping::bundled().unwrap();
        m.google.as_mut().unwrap().backend = backend;
        m
    }

    #[test]
    fn won_with_gclid_becomes_a_click_conversion() {
        let e = event(
            won(
                json!({"email": "John.Doe+x@gmail.com", "phone": "+44 20 7946 0958", "gclid": "Cj0KCQ", "wbraid": "w"}),
            ),
            None,
        );
        let item = build_item(&e, &[], &mapping(GoogleBackend::AdsApi), now()).unwrap();
        assert_eq!(item.kind, Kind::Click);
        assert_eq!(item.group(), "ads-click/1234567890/-");
        assert!(item.has_user_data);
        assert_eq!(
            item.row,
            json!({
                "gclid": "Cj0KCQ",
                "conversionAction": "customers/1234567890/conversionActions/987654321",
                "conversionDateTime": "2026-11-27 10:00:00+00:00",
                "conversionValue": 100.0,
                "currencyCode": "EUR",
                "orderId": "O-1",
                "userIdentifiers": [
                    {"hashedEmail": sha256_hex("johndoe@gmail.com"), "userIdentifierSource": "FIRST_PARTY"},
                    {"hashedPhoneNumber": sha256_hex("+442079460958"), "userIdentifierSource": "FIRST_PARTY"}
                ],
                "consent": {"adUserData": "GRANTED"}
            }),
            "gclid wins over a braid; one identifier per object; Google's email and phone forms"
        );
    }

    #[test]
    fn click_ids_and_enhanced_conversions_for_leads() {
        let m = mapping(GoogleBackend::AdsApi);
        let both = event(won(json!({"gbraid": "g", "wbraid": "w"})), None);
        let row = build_item(&both, &[], &m, now()).unwrap().row;
        assert_eq!(
            (row["gbraid"].as_str(), row.get("wbraid")),
            (Some("g"), None)
        );
        let no_click = event(won(json!({"email": "a@example.com"})), None);
        assert_eq!(
            build_item(&no_click, &[], &m, now()).unwrap_err().code,
            "no_click_id",
            "won's action is not set up for leads without a click id"
        );
        let mut sql = won(json!({"email": "a@example.com"}));
        sql["event_name"] = json!("sql");
        sql["entity_type"] = json!("lead");
        sql["value"] = Value::Null;
        sql["currency"] = Value::Null;
        sql["order_id"] = Value::Null;
        let e = event(sql.clone(), None);
        let item = build_item(&e, &[], &m, now()).unwrap();
        assert_eq!(
            item.row["orderId"],
            e.event_id.as_str(),
            "leads dedupe on event id"
        );
        assert!(item.row.get("gclid").is_none());
        sql["identity"] = json!({});
        assert_eq!(
            build_item(&event(sql, None), &[], &m, now())
                .unwrap_err()
                .code,
            "no_identifier"
        );
        let mut mql = won(json!({"gclid": "x"}));
        mql["event_name"] = json!("mql");
        assert_eq!(
            build_item(&event(mql, None), &[], &m, now())
                .unwrap_err()
                .code,
            "not_mapped"
        );
    }

    #[test]
    fn data_manager_event() {
        let e = event(
            won(
                json!({"email": "a@example.com", "first_name": "Ann", "last_name": "Lee", "zip": "94105", "country": "US", "gclid": "G"}),
            ),
            None,
        );
        let item = build_item(&e, &[], &mapping(GoogleBackend::DataManager), now()).unwrap();
        assert_eq!(item.kind, Kind::DataManager);
        assert_eq!(item.group(), "datamanager/1234567890/-/987654321");
        assert_eq!(item.row["transactionId"], "O-1");
        assert_eq!(item.row["eventTimestamp"], "2026-11-27T10:00:00.000Z");
        assert_eq!(item.row["adIdentifiers"], json!({"gclid": "G"}));
        assert_eq!(
            item.row["consent"],
            json!({"adUserData": "CONSENT_GRANTED"})
        );
        let ids = item.row["userData"]["userIdentifiers"].as_array().unwrap();
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[0], json!({"emailAddress": sha256_hex("a@example.com")}));
        assert_eq!(ids[1]["address"]["givenName"], sha256_hex("ann"));
        assert_eq!(ids[1]["address"]["postalCode"], "94105", "not hashed");
    }

    #[test]
    fn partial_refunds_restate_to_the_new_total_strictly_later() {
        let m = mapping(GoogleBackend::AdsApi);
        let w = event(won(json!({"gclid": "G"})), Some(DeliveryStatus::Delivered));
        let r1 = event(
            refund(20.0, "2026-11-27T12:00:00Z"),
            Some(DeliveryStatus::Pending),
        );
        let r2 = event(
            refund(30.0, "2026-11-27T13:00:00Z"),
            Some(DeliveryStatus::Pending),
        );
        // The first refund alone.
        let a = build_item(&r1, &[w.clone(), r1.clone()], &m, now()).unwrap();
        assert_eq!(a.kind, Kind::Adjustment);
        assert_eq!(
            a.row,
            json!({"conversionAction": "customers/1234567890/conversionActions/987654321", "adjustmentType": "RESTATEMENT",
                   "adjustmentDateTime": "2026-11-27 12:00:00+00:00", "orderId": "O-1",
                   "restatementValue": {"adjustedValue": 80.0, "currencyCode": "EUR"}})
        );
        // Both known: the total counts both, and the time is later than the first's.
        let order = [w.clone(), r1.clone(), r2.clone()];
        let b = build_item(&r2, &order, &m, now()).unwrap();
        assert_eq!(b.row["restatementValue"]["adjustedValue"], 50.0);
        assert_eq!(b.row["adjustmentDateTime"], "2026-11-27 13:00:01+00:00");
        // Out of order: the earlier refund delivered last still states the full picture, and
        // is identical to the later one's restatement (a duplicate, not a regression).
        let c = build_item(&r1, &order, &m, now()).unwrap();
        assert_eq!(c.row, b.row);
        // A refund arriving after the later one was sent moves the time on.
        let r0 = event(
            refund(5.0, "2026-11-27T11:00:00Z"),
            Some(DeliveryStatus::Pending),
        );
        let d = build_item(&r0, &[w, r1, r2, r0.clone()], &m, now()).unwrap();
        assert_eq!(d.row["restatementValue"]["adjustedValue"], 45.0);
        assert_eq!(d.row["adjustmentDateTime"], "2026-11-27 13:00:02+00:00");
    }

    #[test]
    fn full_refunds_retract_or_restate_to_zero() {
        let w = event(won(json!({"gclid": "G"})), Some(DeliveryStatus::Delivered));
        let r = event(
            refund(100.0, "2026-11-27T12:00:00Z"),
            Some(DeliveryStatus::Pending),
        );
        let order = [w.clone(), r.clone()];
        let a = build_item(&r, &order, &mapping(GoogleBackend::AdsApi), now()).unwrap();
        assert_eq!(a.row["adjustmentType"], "RETRACTION");
        assert!(
            a.row.get("restatementValue").is_none(),
            "never on a RETRACTION"
        );
        let dm = mapping(GoogleBackend::DataManager);
        let b = build_item(&r, &order, &dm, now()).unwrap();
        assert_eq!((b.kind, b.restated_to_zero), (Kind::DataManager, true));
        assert_eq!(b.row["conversionValue"], 0.0);
        assert_eq!(b.row["transactionId"], "O-1");
        assert_eq!(
            b.row["adIdentifiers"]["gclid"], "G",
            "the original's identifiers"
        );
        let mut via_ads = dm.clone();
        via_ads.google.as_mut().unwrap().full_refund_policy = FullRefundPolicy::RetractViaAdsApi;
        let c = build_item(&r, &order, &via_ads, now()).unwrap();
        assert_eq!(
            (c.kind, c.row["adjustmentType"].as_str()),
            (Kind::Adjustment, Some("RETRACTION"))
        );
        // Partial on Data Manager: the same transaction restated to the new total.
        let p = event(
            refund(40.0, "2026-11-27T12:00:00Z"),
            Some(DeliveryStatus::Pending),
        );
        let d = build_item(&p, &[w, p.clone()], &dm, now()).unwrap();
        assert_eq!(
            (d.row["conversionValue"].as_f64(), d.restated_to_zero),
            (Some(60.0), false)
        );
        let mut usd = refund(1.0, "2026-11-27T12:00:00Z");
        usd["currency"] = json!("USD");
        let u = event(usd, Some(DeliveryStatus::Pending));
        assert_eq!(
            build_item(&u, &order, &mapping(GoogleBackend::AdsApi), now())
                .unwrap_err()
                .code,
            "currency_mismatch"
        );
    }

    #[test]
    fn per_account_backend() {
        let m = Mapping::load(&format!(
            "{}\n[google.accounts.\"123-456-7890\"]\nbackend = \"data_manager\"\nlogin_customer_id = \"1112223333\"\n",
            bridge_core::mapping::BUNDLED
        ))
        .unwrap();
        let g = m.google.as_ref().unwrap();
        assert_eq!(g.backend_for("1234567890"), GoogleBackend::DataManager);
        assert_eq!(g.login_for("1234567890"), Some("1112223333"));
        assert_eq!(g.backend_for("9999999999"), GoogleBackend::AdsApi);
        let e = event(won(json!({"gclid": "G"})), None);
        let item = build_item(&e, &[], &m, now()).unwrap();
        assert_eq!(item.group(), "datamanager/1234567890/1112223333/987654321");
    }

    fn failure(rows: &[(usize, &str, &str)]) -> Value {
        let errors: Vec<Value> = rows
            .iter()
            .map(|(i, kind, code)| json!({"errorCode": {*kind: code}, "message": format!("{code} message"),
                "location": {"fieldPathElements": [{"fieldName": "conversions", "index": i}, {"fieldName": "gclid"}]}}))
            .collect();
        json!({"code": 3, "message": "partial", "details": [{"@type": "type.googleapis.com/google.ads.googleads.v26.errors.GoogleAdsFailure", "errors": errors}]})
    }

    #[test]
    fn partial_failure_maps_each_error_to_its_row() {
        let body = json!({
            "results": [{"gclid": "a"}, {}, {}, {"gclid": "d"}, {}, {}, {}],
            "partialFailureError": failure(&[
                (1, "conversionUploadError", "CLICK_NOT_FOUND"),
                (2, "conversionUploadError", "ORDER_ID_ALREADY_IN_USE"),
                (4, "conversionUploadError", "TOO_RECENT_EVENT"),
                (5, "conversionAdjustmentUploadError", "CONVERSION_NOT_FOUND"),
                (6, "conversionUploadError", "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS"),
                (6, "conversionUploadError", "TOO_RECENT_EVENT"),
            ]),
            "jobId": "42"
        });
        let out = classify_partial(&body.to_string(), &[1, 1, 1, 1, 1, 1, 1], false);
        assert_eq!(
            out[0],
            Outcome::Delivered {
                platform_ref: Some("jobId:42".into()),
                replay: false
            }
        );
        assert!(
            matches!(&out[1], Outcome::Rejected { dead_letter: false, alert: false, error } if error.code == "CLICK_NOT_FOUND" && error.message == "CLICK_NOT_FOUND message")
        );
        assert_eq!(
            out[2],
            Outcome::Delivered {
                platform_ref: Some("jobId:42".into()),
                replay: true
            }
        );
        assert_eq!(out[3].result().as_str(), "delivered");
        assert_eq!(
            out[4],
            Outcome::Retryable {
                error: err("TOO_RECENT_EVENT", "TOO_RECENT_EVENT message"),
                after: Some(TOO_RECENT_WAIT)
            }
        );
        assert!(
            matches!(&out[5], Outcome::Retryable { after: Some(d), .. } if *d == CONVERSION_NOT_FOUND_WAIT)
        );
        assert!(
            matches!(&out[6], Outcome::Rejected { alert: true, .. }),
            "the worst error of a row wins"
        );
        let late = classify_partial(
            &body.to_string(),
            &[1, 1, 1, 1, 1, CONVERSION_NOT_FOUND_ATTEMPTS, 1],
            false,
        );
        assert!(
            matches!(
                &late[5],
                Outcome::Rejected {
                    dead_letter: true,
                    ..
                }
            ),
            "a few retries, then the DLQ"
        );
        // An empty result with no error is never counted as delivered.
        let odd = json!({"results": [{}, {"gclid": "b"}]});
        assert_eq!(
            classify_partial(&odd.to_string(), &[1, 1], false)[0]
                .result()
                .as_str(),
            "retry"
        );
    }

    #[test]
    fn whole_request_errors() {
        let quota = json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "quota",
            "details": [{"@type": "type.googleapis.com/google.ads.googleads.v26.errors.GoogleAdsFailure",
                "errors": [{"errorCode": {"quotaError": "RESOURCE_EXHAUSTED"}, "message": "Too many requests",
                    "details": {"quotaErrorDetails": {"rateScope": "DEVELOPER", "retryDelay": "120s"}}}]}]}});
        assert_eq!(
            classify_ads_error(429, &quota.to_string()),
            Outcome::Retryable {
                error: err("RESOURCE_EXHAUSTED", "Too many requests"),
                after: Some(Duration::from_secs(120))
            }
        );
        assert_eq!(classify_ads_error(503, "").result().as_str(), "retry");
        let allow = json!({"error": {"code": 403, "status": "PERMISSION_DENIED", "message": "no",
            "details": [{"errors": [{"errorCode": {"conversionUploadError": "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE"}, "message": "not allowlisted"}]}]}});
        assert!(
            matches!(classify_ads_error(403, &allow.to_string()), Outcome::Rejected { alert: true, ref error, .. } if error.code == "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE")
        );
        let unknown = json!({"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "Invalid JSON payload received. Unknown name \"debugEnabled\""}});
        assert!(matches!(
            classify_ads_error(400, &unknown.to_string()),
            Outcome::Rejected {
                alert: false,
                dead_letter: true,
                ..
            }
        ));
    }

    #[test]
    fn data_manager_answers() {
        assert_eq!(
            classify_datamanager(200, r#"{"requestId": "req-1"}"#),
            Answer::Whole(Outcome::Delivered {
                platform_ref: Some("requestId:req-1".into()),
                replay: false
            })
        );
        let bad = json!({"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "bad",
            "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "INVALID_ARGUMENT"},
                        {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [
                            {"field": "events[3].conversion_value", "description": "must not be negative"},
                            {"field": "events[7].user_data.user_identifiers[0]", "description": "not hex"}]}]}});
        match classify_datamanager(400, &bad.to_string()) {
            Answer::BadItems(b) => {
                assert_eq!(b.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [3, 7]);
                assert!(b[0].1.message.contains("must not be negative"));
            }
            other => panic!("{other:?}"),
        }
        let no_index =
            json!({"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "bad"}});
        assert!(matches!(
            classify_datamanager(400, &no_index.to_string()),
            Answer::Whole(Outcome::Rejected { alert: false, .. })
        ));
        assert!(matches!(
            classify_datamanager(503, "{}"),
            Answer::Whole(Outcome::Retryable { .. })
        ));
        assert!(matches!(
            classify_datamanager(403, "{}"),
            Answer::Whole(Outcome::Rejected { alert: true, .. })
        ));
    }

    #[test]
    fn credentials_never_print_secrets() {
        let c = GoogleCredentials::from_json(r#"{"client_id": "id", "client_secret": "s3cret", "refresh_token": "r3fresh", "developer_token": "d3v"}"#).unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("r3fresh") && !shown.contains("d3v"),
            "{shown}"
        );
        let e = GoogleCredentials::from_json(r#"{"client_id": "id"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("client_secret"), "{e}");
    }
}
