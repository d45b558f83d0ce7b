//! The fake Data Manager API's asynchronous side: a pending job per ingest, processed after a
//! number of polls and/or a delay on the fake's clock; records that pass processing are merged
//! into the counted conversions by transactionId (DM-ADJ), and `requestStatus:retrieve`
//! answers PROCESSING, then SUCCESS / PARTIAL_SUCCESS / FAILED per destination.

use super::data_manager::{bad_request, permission_denied};
use super::oauth::{DATAMANAGER_SCOPE, authorized};
use super::shared::lock;
use super::{Data, FakeGoogle};
use crate::fakes::Reply;
use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use bridge_core::timestamp::Timestamp;
use serde_json::{Value, json};
use std::collections::BTreeMap;

// source: G-ERR-UP #44 (6 hours). Data Manager's TOO_RECENT_CLICK threshold is UNCONFIRMED: the
// Ads API's is used.
const TOO_RECENT_MS: i64 = 6 * 3600 * 1000;

/// A Data Manager conversion's identity: transactionId within one conversion action of one
/// operating account (source: DM-ADJ, "Within the same conversion action, Google Ads matches
/// events using transactionId").
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DmKey {
    pub operating_account: String,
    pub product_destination_id: String,
    pub transaction_id: String,
}

impl DmKey {
    pub fn new(
        operating_account: &str,
        product_destination_id: &str,
        transaction_id: &str,
    ) -> DmKey {
        DmKey {
            operating_account: operating_account.into(),
            product_destination_id: product_destination_id.into(),
            transaction_id: transaction_id.into(),
        }
    }
}

/// One conversion Data Manager holds after processing.
#[derive(Clone, Debug, PartialEq)]
pub struct DmConversion {
    /// The latest conversionValue.
    pub value: Option<f64>,
    pub currency: Option<String>,
    /// The original event, with the adjusted value/currency and user data merged in.
    pub event: Value,
    /// Records processed for this key: 1 for the original, +1 per adjustment.
    pub ingests: usize,
    pub request_ids: Vec<String>,
}

/// When the enhanced-conversions terms check fires: at ingest (ErrorReason) or in processing
/// (ProcessingErrorReason). Which one Google uses is UNCONFIRMED (fakes-audit §4.2 d).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EcTermsCheck {
    #[default]
    Sync,
    Async,
}

/// One operating account's configuration.
#[derive(Clone, Debug)]
pub struct DmAccount {
    /// Enhanced-conversions customer data terms accepted (DM-ERRENUM 35 / DM-PERR 14).
    pub ec_terms_signed: bool,
    pub ec_terms_check: EcTermsCheck,
    /// Required terms and conditions accepted (DM-ERRENUM 26).
    pub terms_signed: bool,
    /// Allowlisted for the feature (DM-ERRENUM 47).
    pub allowlisted: bool,
    /// The token's user can reach the account (PERMISSION_DENIED otherwise).
    pub reachable: bool,
}

impl Default for DmAccount {
    fn default() -> Self {
        DmAccount {
            ec_terms_signed: true,
            ec_terms_check: EcTermsCheck::Sync,
            terms_signed: true,
            allowlisted: true,
            reachable: true,
        }
    }
}

/// One destination of an ingest, with the events it received.
#[derive(Clone, Debug)]
pub struct DmJobDestination {
    /// The destination as the request sent it.
    pub destination: Value,
    pub operating_account: String,
    pub product_destination_id: String,
    pub events: Vec<Value>,
}

/// A destination's result once processing completed.
#[derive(Clone, Debug, PartialEq)]
pub struct DmOutcome {
    /// SUCCESS, PARTIAL_SUCCESS or FAILED.
    pub status: String,
    pub record_count: usize,
    /// PROCESSING_ERROR_REASON_... -> records.
    pub errors: BTreeMap<String, usize>,
}

/// One accepted ingest.
#[derive(Clone, Debug)]
pub struct DmJob {
    pub request_id: String,
    pub received_at: Timestamp,
    /// PROCESSING answers given so far.
    pub polls: u32,
    /// Completed by the test (`dm_complete_all`) whatever the polls and delay.
    pub(crate) forced: bool,
    /// The request-level consent.
    pub consent: Value,
    pub destinations: Vec<DmJobDestination>,
    /// None while processing.
    pub outcome: Option<Vec<DmOutcome>>,
}

/// Completes every job that is due: polled enough and old enough on the clock, or forced.
pub(super) fn process_due(d: &mut Data) {
    let now = d.controls.clock.now();
    for i in 0..d.dm_jobs.len() {
        let j = &d.dm_jobs[i];
        let due = j.outcome.is_none()
            && (j.forced
                || (j.polls >= d.dm_processing_polls
                    && now.unix_ms() >= j.received_at.plus(d.dm_processing_delay).unix_ms()));
        if due {
            let outcome = process(d, i);
            d.dm_jobs[i].outcome = Some(outcome);
        }
    }
}

fn process(d: &mut Data, i: usize) -> Vec<DmOutcome> {
    let job = d.dm_jobs[i].clone();
    job.destinations
        .iter()
        .map(|dest| {
            let mut errors = BTreeMap::new();
            for e in &dest.events {
                match failure(d, &job, dest, e) {
                    Some(reason) => *errors.entry(reason).or_insert(0) += 1,
                    None => apply(d, &job.request_id, dest, e),
                }
            }
            let failed: usize = errors.values().sum();
            // source: DM-RS RequestStatus (SUCCESS: all records; FAILED: all failed; PARTIAL_SUCCESS)
            let status = match failed {
                0 => "SUCCESS",
                n if n == dest.events.len() => "FAILED",
                _ => "PARTIAL_SUCCESS",
            };
            DmOutcome {
                status: status.into(),
                record_count: dest.events.len(),
                errors,
            }
        })
        .collect()
}

fn reason(r: &str) -> Option<String> {
    Some(format!("PROCESSING_ERROR_REASON_{r}"))
}

/// Why a record fails processing, if it does (source: DM-PERR for every reason).
fn failure(d: &Data, job: &DmJob, dest: &DmJobDestination, e: &Value) -> Option<String> {
    let txn = e["transactionId"].as_str().unwrap_or_default();
    // The test's hook.
    if let Some(r) = d.dm_fail.get(txn) {
        return Some(r.clone());
    }
    let has_user_data = e["userData"]["userIdentifiers"]
        .as_array()
        .is_some_and(|a| !a.is_empty());
    let acct = d.dm_accounts.get(&dest.operating_account);
    if has_user_data
        && acct.is_some_and(|a| !a.ec_terms_signed && a.ec_terms_check == EcTermsCheck::Async)
    {
        return reason("DESTINATION_ACCOUNT_ENHANCED_CONVERSIONS_TERMS_NOT_SIGNED");
    }
    // DENIED_CONSENT: ad_user_data denied on the event, or on the request when the event says nothing.
    let consent = |c: &Value| c["adUserData"].as_str().map(str::to_string);
    if consent(&e["consent"])
        .or_else(|| consent(&job.consent))
        .as_deref()
        == Some("CONSENT_DENIED")
    {
        return reason("DENIED_CONSENT");
    }
    if let Some(g) = e["adIdentifiers"]["gclid"].as_str() {
        // "A corresponding click can't be found that matches the provided attributes"
        if d.unknown_clicks.contains(g) {
            return reason("CLICK_NOT_FOUND");
        }
        if let Some(click) = d.clicks.get(g) {
            let at = e["eventTimestamp"]
                .as_str()
                .and_then(|t| Timestamp::parse_rfc3339(t).ok());
            if at.is_some_and(|t| t.unix_ms() < click.unix_ms()) {
                return reason("CONVERSION_PRECEDES_CLICK");
            }
            if d.controls.clock.now_ms() - click.unix_ms() < TOO_RECENT_MS {
                return reason("TOO_RECENT_CLICK");
            }
        }
    }
    // The test's hook beside `clicks`.
    if d.too_recent.contains(txn) {
        return reason("TOO_RECENT_CLICK");
    }
    None
}

/// Merges a processed record (source: DM-ADJ): a matching transactionId overwrites only
/// conversionValue and currency, adds userData only if the original had none, and adds no
/// conversion; an unmatched one creates a conversion.
fn apply(d: &mut Data, request_id: &str, dest: &DmJobDestination, e: &Value) {
    let key = DmKey {
        operating_account: dest.operating_account.clone(),
        product_destination_id: dest.product_destination_id.clone(),
        transaction_id: e["transactionId"].as_str().unwrap_or_default().to_string(),
    };
    let value = e["conversionValue"].as_f64();
    let currency = e["currency"].as_str().map(str::to_string);
    match d.dm_conversions.get_mut(&key) {
        Some(c) => {
            if let Some(v) = value {
                c.value = Some(v);
                c.event["conversionValue"] = json!(v);
            }
            if let Some(cur) = currency {
                c.event["currency"] = json!(cur);
                c.currency = Some(cur);
            }
            if c.event.get("userData").is_none_or(Value::is_null) && e.get("userData").is_some() {
                c.event["userData"] = e["userData"].clone();
            }
            c.ingests += 1;
            c.request_ids.push(request_id.to_string());
        }
        None => {
            d.dm_conversions.insert(
                key,
                DmConversion {
                    value,
                    currency,
                    event: e.clone(),
                    ingests: 1,
                    request_ids: vec![request_id.to_string()],
                },
            );
        }
    }
}

fn status_entry(dest: &DmJobDestination, outcome: Option<&DmOutcome>) -> Value {
    let count = dest.events.len();
    // source: DM-RS (recordCount is int64: a JSON string; errorInfo only for FAILED /
    // PARTIAL_SUCCESS, never while PROCESSING; warningInfo absent while PROCESSING)
    let mut v = json!({"destination": dest.destination,
        "requestStatus": outcome.map_or("PROCESSING", |o| o.status.as_str()),
        "eventsIngestionStatus": {"recordCount": count.to_string()}});
    if let Some(o) = outcome.filter(|o| !o.errors.is_empty()) {
        let counts: Vec<Value> = o
            .errors
            .iter()
            .map(|(r, n)| json!({"recordCount": n.to_string(), "reason": r}))
            .collect();
        v["errorInfo"] = json!({"errorCounts": counts});
    }
    v
}

pub(super) async fn retrieve(
    State(s): State<FakeGoogle>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Reply {
    // source: DM-RS (OAuth scope datamanager)
    if let Err(r) = authorized(&s, &headers, DATAMANAGER_SCOPE) {
        return r;
    }
    // The decoded value: a client that does not URL-encode '+' in the id sends a space.
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.as_deref().unwrap_or("")).unwrap_or_default();
    let id = pairs
        .into_iter()
        .find(|(k, _)| k == "requestId")
        .map(|(_, v)| v);
    let mut d = lock(&s.data);
    let Some(id) = id.filter(|i| !i.is_empty()) else {
        // source: DM-RS ("The requestId query parameter is Required")
        return bad_request(
            &[super::data_manager::Violation {
                field: "request_id".into(),
                description: "request_id is required".into(),
                reason: "REQUIRED_FIELD_MISSING",
            }],
            "t-fake-status",
        );
    };
    process_due(&mut d);
    let Some(i) = d.dm_jobs.iter().position(|j| j.request_id == id) else {
        // source: DM-ERRENUM INVALID_REQUEST_ID ("Status can only be retrieved for requests that
        // succeed and don't have validate_only=true"); HTTP 400 is UNCONFIRMED.
        return bad_request(
            &[super::data_manager::Violation {
                field: "request_id".into(),
                description:
                    "The request ID used to retrieve the status of a request is not valid.".into(),
                reason: "INVALID_REQUEST_ID",
            }],
            "t-fake-status",
        );
    };
    // source: research datamanager.md §6 ("The caller needs access to the original operating_account")
    let unreachable = d.dm_jobs[i].destinations.iter().any(|x| {
        d.dm_accounts
            .get(&x.operating_account)
            .is_some_and(|a| !a.reachable)
    });
    if unreachable {
        return permission_denied(
            "PERMISSION_DENIED",
            "The caller does not have permission",
            "t-fake-status",
        );
    }
    let job = &mut d.dm_jobs[i];
    if job.outcome.is_none() {
        job.polls += 1;
    }
    // source: DM-RS ("The order of the statuses matches the order of the destinations in the
    // original request")
    let entries: Vec<Value> = job
        .destinations
        .iter()
        .enumerate()
        .map(|(k, dest)| status_entry(dest, job.outcome.as_ref().and_then(|o| o.get(k))))
        .collect();
    (
        StatusCode::OK,
        Json(json!({"requestStatusPerDestination": entries})),
    )
}
