//! The fake Google Ads API's front: routing, the headers every call needs, the GAQL terms
//! pre-flight, the frame both uploads share (partial failure, row limits, job ids, the
//! positional answer), and the checks both kinds of row share (conversion action, user
//! identifiers).

use super::oauth::{ADWORDS_SCOPE, authorized};
use super::shared::{
    RowError, ads_error, ads_failure, ads_request_error, lock, parse, row_error, rpc_error,
};
use super::{Data, FakeGoogle, ads_adjustments, ads_clicks};
use crate::fakes::{Fault, Reply};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

/// A job id Google assigns when the client gives none: in [2^31, 2^63-1] (source: G-SVC-UP).
const FIRST_DEFAULT_JOB: i64 = 1 << 31;

pub(super) async fn handle(
    State(s): State<FakeGoogle>,
    Path((version, rest)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    // source: google-ads-api.md (the v26 endpoints); another version is not served here.
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
        return search(&s, customer, &body);
    }
    let (customer, method) = match rest.split_once(':') {
        Some((c, m)) if c.len() == 10 && c.bytes().all(|b| b.is_ascii_digit()) => {
            (c.to_string(), m.to_string())
        }
        _ => return rpc_error(StatusCode::NOT_FOUND, "NOT_FOUND", "unknown method", vec![]),
    };
    let fault = {
        let mut d = lock(&s.data);
        d.controls.next_fault(
            // source: google-ads-api.md (quota errors carry quotaErrorDetails.retryDelay)
            || {
                (
                    429,
                    json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "quota",
                "details": [ads_failure(vec![json!({"errorCode": {"quotaError": "RESOURCE_EXHAUSTED"}, "message": "Too many requests. Retry in 1 seconds.",
                    "details": {"quotaErrorDetails": {"rateScope": "DEVELOPER", "retryDelay": "1s"}}})])]}}),
                )
            },
            || {
                (
                    503,
                    json!({"error": {"code": 503, "status": "UNAVAILABLE", "message": "The service is currently unavailable."}}),
                )
            },
        )
    };
    let fault = match Fault::before(fault).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let answer = match method.as_str() {
        "uploadClickConversions" => ads_clicks::upload(&s, &customer, &body),
        "uploadConversionAdjustments" => ads_adjustments::upload(&s, &customer, &body),
        _ => return rpc_error(StatusCode::NOT_FOUND, "NOT_FOUND", "unknown method", vec![]),
    };
    Fault::after(fault).await;
    answer
}

fn ads_headers(s: &FakeGoogle, headers: &HeaderMap) -> Result<(), Reply> {
    // source: research google-ads.md Q4 (oauth_scopes adwords on both upload services)
    authorized(s, headers, ADWORDS_SCOPE)?;
    // source: google-ads-api.md (headers), AuthenticationErrorEnum DEVELOPER_TOKEN_INVALID
    let dev = headers.get("developer-token").and_then(|v| v.to_str().ok());
    if dev != Some(s.developer_token.as_str()) {
        return Err(ads_request_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            &RowError {
                kind: "authenticationError",
                code: "DEVELOPER_TOKEN_INVALID",
                message: "The developer token is not valid.".into(),
                field: None,
            },
        ));
    }
    // source: google-ads-api.md (`login-customer-id: <10 digits, no dashes>`); HeaderErrorEnum
    if let Some(l) = headers
        .get("login-customer-id")
        .and_then(|v| v.to_str().ok())
        && !(l.len() == 10 && l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(ads_request_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            &RowError {
                kind: "headerError",
                code: "INVALID_LOGIN_CUSTOMER_ID",
                message: "login-customer-id must be 10 digits without dashes".into(),
                field: None,
            },
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Search {
    query: String,
    page_size: Option<Value>,
    page_token: Option<String>,
}

/// Answers the terms pre-flight only (source: G-ERR-UP #48 "You can check your setting by
/// querying conversion_tracking_setting.accepted_customer_data_terms on Customer").
fn search(s: &FakeGoogle, customer: &str, body: &[u8]) -> Reply {
    let q: Search = match parse(body) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let _ = (&q.page_size, &q.page_token);
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
    // The conversion customer is the customer itself: cross-account tracking is not modelled.
    (
        StatusCode::OK,
        Json(
            json!({"results": [{"customer": {"resourceName": format!("customers/{customer}"),
            "conversionTrackingSetting": {"acceptedCustomerDataTerms": accepted, "googleAdsConversionCustomer": format!("customers/{customer}")}}}],
            "fieldMask": "customer.conversionTrackingSetting.acceptedCustomerDataTerms,customer.conversionTrackingSetting.googleAdsConversionCustomer"}),
        ),
    )
}

/// The enum a row error of one upload belongs to, and its request-level codes.
#[derive(Clone, Copy)]
pub(super) struct Upload {
    /// `conversionUploadError` or `conversionAdjustmentUploadError`.
    pub kind: &'static str,
    /// The request's list: `conversions` or `conversion_adjustments`.
    pub list: &'static str,
    pub too_many: &'static str,
}

/// The frame of both uploads: partial failure required, 1..2000 rows, the job id. Returns the
/// job id to answer with.
pub(super) fn frame(
    d: &mut Data,
    u: Upload,
    rows: usize,
    partial: Option<bool>,
    job_id: Option<&Value>,
) -> Result<i64, Reply> {
    let bad =
        |code: RowError| ads_request_error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", &code);
    // source: G-PF (PartialFailureErrorEnum.PARTIAL_FAILURE_MODE_REQUIRED); G-SVC-UP
    // ("This should always be set to true")
    if partial != Some(true) {
        return Err(bad(RowError {
            kind: "partialFailureError",
            code: "PARTIAL_FAILURE_MODE_REQUIRED",
            message: "The partial failure field was false in the request.".into(),
            field: None,
        }));
    }
    // source: G-ERR-UP #2 ("Upload fewer than 2001 events in a single request"), G-ERR-ADJ #11
    if rows > 2000 {
        return Err(bad(RowError {
            kind: u.kind,
            code: u.too_many,
            message: format!("{} holds more than 2000 rows", u.list),
            field: None,
        }));
    }
    // the fake's own code (UNCONFIRMED: an empty list's error is not documented)
    if rows == 0 {
        return Err(bad(RowError {
            kind: "fieldError",
            code: "REQUIRED",
            message: format!("{} is empty", u.list),
            field: None,
        }));
    }
    d.batch_sizes.push(rows);
    match job_id {
        None | Some(Value::Null) => Ok(FIRST_DEFAULT_JOB + d.requests.len() as i64),
        // source: G-ERR-UP #52 / G-ERR-ADJ #26 ("A job ID must be a positive integer in the
        // range [1, 2^31)"); int64 arrives as a JSON string or number (G-REST).
        Some(v) => {
            let j = v
                .as_i64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()));
            match j {
                Some(j) if (1..FIRST_DEFAULT_JOB).contains(&j) => Ok(j),
                _ => Err(bad(RowError {
                    kind: u.kind,
                    code: "INVALID_JOB_ID",
                    message: "A job ID must be a positive integer in the range [1, 2^31).".into(),
                    field: None,
                })),
            }
        }
    }
}

/// The answer of an upload: positional results (`{}` for a failed row), the row errors in
/// `partialFailureError`, and the job id as an int64 string (source: G-SVC-UP, G-REST).
pub(super) fn partial_reply(
    u: Upload,
    results: Vec<Value>,
    errors: Vec<(usize, RowError)>,
    job: i64,
) -> Reply {
    let mut out = json!({"results": results, "jobId": job.to_string()});
    if !errors.is_empty() {
        let first = &errors[0];
        let details: Vec<Value> = errors
            .iter()
            .map(|(i, e)| ads_error(e, u.list, Some(*i)))
            .collect();
        out["partialFailureError"] = json!({"code": 3,
            "message": format!("{}, at {}[{}]", first.1.message, u.list, first.0),
            "details": [ads_failure(details)]});
    }
    (StatusCode::OK, Json(out))
}

/// The conversion action's id. Validation ignores the customer id inside the resource name:
/// the action id alone identifies it (source: G-SVC-UP, G-SVC-ADJ).
pub(super) fn action_id(d: &Data, u: Upload, action: Option<&str>) -> Result<String, RowError> {
    let Some(action) = action else {
        // the fake's own code (UNCONFIRMED)
        return row_error(
            "fieldError",
            "REQUIRED",
            Some("conversion_action"),
            "conversionAction is required",
        );
    };
    let id = action
        .strip_prefix("customers/")
        .and_then(|r| r.split_once("/conversionActions/"))
        .filter(|(c, id)| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_digit())
                && !id.is_empty()
                && id.bytes().all(|b| b.is_ascii_digit())
        })
        .map(|(_, id)| id.to_string());
    match id {
        // source: G-ERR-UP #53 / G-ERR-ADJ #27 ("cannot be found")
        Some(id) if d.conversion_actions.is_empty() || d.conversion_actions.contains_key(&id) => {
            Ok(id)
        }
        _ => row_error(
            u.kind,
            "NO_CONVERSION_ACTION_FOUND",
            Some("conversion_action"),
            "The conversion action specified in the upload request cannot be found.",
        ),
    }
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub(super) enum IdentifierSource {
    Unspecified,
    Unknown,
    FirstParty,
    ThirdParty,
}

/// A UserIdentifier: a oneof of identifiers plus its source (source: G-SVC-UP common/offline_user_data).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct UserIdentifier {
    pub hashed_email: Option<String>,
    pub hashed_phone_number: Option<String>,
    pub address_info: Option<Value>,
    pub mobile_id: Option<String>,
    pub third_party_user_id: Option<String>,
    pub user_identifier_source: Option<IdentifierSource>,
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

/// The identifier rules both uploads share; `only_hashed` for click conversions.
pub(super) fn check_identifiers(
    u: Upload,
    ids: &[UserIdentifier],
    only_hashed: bool,
) -> Result<(), RowError> {
    // source: G-SVC-UP user_identifiers ("The maximum number of user identifiers for each
    // conversion is 5"); the code is the fake's own (UNCONFIRMED).
    if ids.len() > 5 {
        return row_error(
            "collectionSizeError",
            "TOO_MANY",
            Some("user_identifiers"),
            "at most 5 user identifiers",
        );
    }
    for id in ids {
        let _ = id.user_identifier_source;
        // source: google-ads-api.md ("UserIdentifier is a oneof"); a second member is derived
        // to be an invalid identifier.
        if id.set() != 1 {
            return row_error(
                u.kind,
                "INVALID_USER_IDENTIFIER",
                Some("user_identifiers"),
                "each UserIdentifier carries exactly one identifier",
            );
        }
        // source: G-SVC-UP ("Only hashed_email and hashed_phone_number are supported for
        // conversion uploads"); G-ERR-UP #36 UNSUPPORTED_USER_IDENTIFIER
        if only_hashed && id.hashed_email.is_none() && id.hashed_phone_number.is_none() {
            return row_error(
                u.kind,
                "UNSUPPORTED_USER_IDENTIFIER",
                Some("user_identifiers"),
                "The provided user identifiers are not supported. Use only hashed email or phone number and try again.",
            );
        }
        // source: G-ERR-UP #34 / G-ERR-ADJ #17 ("hash user provided data using SHA-256")
        for h in [&id.hashed_email, &id.hashed_phone_number]
            .into_iter()
            .flatten()
        {
            if !crate::fakes::is_sha256_lower_hex(h) {
                return row_error(
                    u.kind,
                    "INVALID_USER_IDENTIFIER",
                    Some("user_identifiers"),
                    "Make sure you hash user provided data using SHA-256 and ensure you are normalizing according to the guidelines.",
                );
            }
        }
    }
    Ok(())
}
