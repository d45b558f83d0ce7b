//! Reading the Google Ads API's answers: each error code as an outcome for its row (replays,
//! waits, configuration errors, terminal refusals), partial failures spread over their rows,
//! whole-request errors.

use super::{CONVERSION_NOT_FOUND_ATTEMPTS, Waits, err, rejected, retry};
use bridge_core::delivery::{ErrorCode, Outcome};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::time::Duration;

// Every list below is read from google-ads-python's v25 enums
// (google/ads/googleads/v25/errors/types/conversion_upload_error.py and
// conversion_adjustment_upload_error.py, identical in v21-v25; G-ERR-UP / G-ERR-ADJ).

/// The platform already has what this row says: a replay of a row that landed earlier.
/// ORDER_ID_ALREADY_IN_USE: "includes an order ID that was previously recorded, so the event
/// was not processed" (the order guard never sends a second won, so this is our own replay).
pub(super) const REPLAY: &[&str] = &[
    "ORDER_ID_ALREADY_IN_USE",
    "CLICK_CONVERSION_ALREADY_EXISTS",
    "CONVERSION_ALREADY_RETRACTED",
    "CONVERSION_ALREADY_ENHANCED",
    "RESTATEMENT_ALREADY_EXISTS",
];
/// No click to attribute the row to: final, and nothing for a person to fix.
/// CLICK_NOT_FOUND: "... you can safely ignore this warning"; EVENT_NOT_FOUND: "could not be
/// attributed to a click ... did not come from a Google Ads campaign".
pub(super) const NO_CLICK: &[&str] = &["CLICK_NOT_FOUND", "EVENT_NOT_FOUND"];
/// Transient: the API's own retryable errors (QuotaError, InternalError, DatabaseError).
pub(super) const TRANSIENT: &[&str] = &[
    "RESOURCE_EXHAUSTED",
    "RESOURCE_TEMPORARILY_EXHAUSTED",
    "INTERNAL_ERROR",
    "TRANSIENT_ERROR",
    "DEADLINE_EXCEEDED",
    "CONCURRENT_MODIFICATION",
    "UNAVAILABLE",
    "ABORTED",
    "UNKNOWN",
];
/// Google's code for a customer that has not accepted the customer data terms (the Ads API's
/// `ConversionUploadError`); the terms pre-flight answers it too, in Google's words.
pub(super) const TERMS_NOT_ACCEPTED: &str = "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS";

/// Configuration of the account, the action or the credentials: parked for a person, with an
/// alert. The DUPLICATE_* codes are here too: they mean the bridge's own batching broke its
/// one-row-per-order rule, which a person must look at.
pub(super) const CONFIGURATION: &[&str] = &[
    TERMS_NOT_ACCEPTED,
    "CUSTOMER_DATA_POLICY_PROHIBITS_ENHANCED_CONVERSIONS",
    "CUSTOMER_DATA_POLICY_PROHIBITS_ENHANCEMENT",
    "CUSTOMER_NOT_ENABLED_ENHANCED_CONVERSIONS_FOR_LEADS",
    "CONVERSION_ACTION_NOT_ELIGIBLE_FOR_ENHANCEMENT",
    "ONE_PER_CLICK_CONVERSION_ACTION_NOT_PERMITTED_WITH_BRAID",
    "INVALID_CUSTOMER_FOR_CLICK",
    "UNAUTHORIZED_CUSTOMER",
    "NO_CONVERSION_ACTION_FOUND",
    "INVALID_CONVERSION_ACTION_TYPE",
    "CANNOT_RESTATE_CONVERSION_ACTION_THAT_ALWAYS_USES_DEFAULT_CONVERSION_VALUE",
    // NotAllowlistedError (v25 not_allowlisted_error.proto): since 2026-06-15 for developer
    // tokens new to offline imports (G-BLOG-OCI).
    "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE",
    "CUSTOMER_NOT_ENABLED",
    "DEVELOPER_TOKEN_NOT_APPROVED",
    "DEVELOPER_TOKEN_PROHIBITED",
    "USER_PERMISSION_DENIED",
    "NOT_ACTIVE",
    "PARTIAL_FAILURE_MODE_REQUIRED",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "DUPLICATE_ORDER_ID",
    "DUPLICATE_CLICK_CONVERSION_IN_REQUEST",
    "DUPLICATE_ADJUSTMENT_IN_REQUEST",
    "DUPLICATE_ENHANCEMENT_IN_REQUEST",
];

/// One Google error code (the enum value, e.g. `CLICK_NOT_FOUND`) as an outcome for its row.
pub fn classify_code(
    code: &str,
    message: &str,
    attempt: u32,
    retry_after: Option<Duration>,
    waits: &Waits,
) -> Outcome {
    let info = err(ErrorCode::platform(code), message);
    match code {
        c if REPLAY.contains(&c) => Outcome::Delivered {
            platform_ref: None,
            replay: true,
        },
        c if NO_CLICK.contains(&c) => Outcome::Rejected {
            error: info,
            dead_letter: false,
            alert: false,
        },
        // "Retry after 6 hours have passed" / "Try importing again in 6 hours."
        "TOO_RECENT_EVENT" | "TOO_RECENT_CONVERSION_ACTION" => Outcome::Retryable {
            error: info,
            after: Some(waits.too_recent),
        },
        "CONVERSION_NOT_FOUND" if attempt < CONVERSION_NOT_FOUND_ATTEMPTS => Outcome::Retryable {
            error: info,
            after: Some(waits.conversion_not_found),
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
pub(super) fn severity(o: &Outcome) -> u8 {
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
pub(super) fn error_code(v: &Value) -> Option<&str> {
    v.as_object()?.values().find_map(Value::as_str)
}

/// `"3600s"` (a protobuf Duration in JSON) to a Duration; `None` for anything else, however
/// large or odd (a delay from an answer must never panic the sender).
fn proto_duration(v: &Value) -> Option<Duration> {
    let s = v.as_str()?.strip_suffix('s')?;
    let secs: f64 = s.parse().ok()?;
    Duration::try_from_secs_f64(secs).ok()
}

/// The retry delay Google asked for anywhere in a status's details (quota errors carry
/// `quotaErrorDetails.retryDelay`; a google.rpc.RetryInfo carries `retryDelay`).
pub(super) fn retry_delay(status: &Value) -> Option<Duration> {
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
pub(super) fn ads_errors(status: &Value) -> Vec<(Option<usize>, String, String)> {
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
pub fn classify_partial(
    body: &str,
    attempts: &[u32],
    validate_only: bool,
    waits: &Waits,
) -> Vec<Outcome> {
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
        let o = classify_code(&code, &message, attempt, retry_after, waits);
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
                    retry(
                        ErrorCode::NoResult,
                        "Google returned no result for this row",
                        None,
                    )
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
pub fn classify_ads_error(status: u16, body: &str, waits: &Waits) -> Outcome {
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
        ErrorCode::http(status)
    } else {
        ErrorCode::platform(code)
    };
    if errors
        .iter()
        .any(|(_, c, _)| CONFIGURATION.contains(&c.as_str()))
        || status == 401
        || status == 403
    {
        return Outcome::Rejected {
            error: err(label, msg),
            dead_letter: true,
            alert: true,
        };
    }
    if status == 429 || status >= 500 || TRANSIENT.contains(&rpc) {
        return retry(label, msg, after);
    }
    if let Some((_, c, m)) = errors.first() {
        return classify_code(c, m, 1, after, waits);
    }
    rejected(label, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::google::{CONVERSION_NOT_FOUND_WAIT, TOO_RECENT_WAIT};

    fn classify_partial_t(body: &str, attempts: &[u32], validate_only: bool) -> Vec<Outcome> {
        classify_partial(body, attempts, validate_only, &Waits::default())
    }

    fn classify_ads_error_t(status: u16, body: &str) -> Outcome {
        classify_ads_error(status, body, &Waits::default())
    }
    use serde_json::json;

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
        let out = classify_partial_t(&body.to_string(), &[1, 1, 1, 1, 1, 1, 1], false);
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
                error: err(
                    ErrorCode::platform("TOO_RECENT_EVENT"),
                    "TOO_RECENT_EVENT message"
                ),
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
        let late = classify_partial_t(
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
            classify_partial_t(&odd.to_string(), &[1, 1], false)[0]
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
            classify_ads_error_t(429, &quota.to_string()),
            Outcome::Retryable {
                error: err(
                    ErrorCode::platform("RESOURCE_EXHAUSTED"),
                    "Too many requests"
                ),
                after: Some(Duration::from_secs(120))
            }
        );
        assert_eq!(classify_ads_error_t(503, "").result().as_str(), "retry");
        let allow = json!({"error": {"code": 403, "status": "PERMISSION_DENIED", "message": "no",
            "details": [{"errors": [{"errorCode": {"conversionUploadError": "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE"}, "message": "not allowlisted"}]}]}});
        assert!(
            matches!(classify_ads_error_t(403, &allow.to_string()), Outcome::Rejected { alert: true, ref error, .. } if error.code == "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE")
        );
        let unknown = json!({"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "Invalid JSON payload received. Unknown name \"debugEnabled\""}});
        assert!(matches!(
            classify_ads_error_t(400, &unknown.to_string()),
            Outcome::Rejected {
                alert: false,
                dead_letter: true,
                ..
            }
        ));
    }

    #[test]
    fn codes_google_documents() {
        let w = Waits::default();
        let class = |code: &str| classify_code(code, "m", 1, None, &w);
        for code in ["CLICK_NOT_FOUND", "EVENT_NOT_FOUND"] {
            assert!(
                matches!(
                    class(code),
                    Outcome::Rejected {
                        dead_letter: false,
                        alert: false,
                        ..
                    }
                ),
                "{code}: terminal, nothing to fix"
            );
        }
        for code in [
            "CUSTOMER_NOT_ENABLED_ENHANCED_CONVERSIONS_FOR_LEADS",
            "CONVERSION_ACTION_NOT_ELIGIBLE_FOR_ENHANCEMENT",
            "CUSTOMER_DATA_POLICY_PROHIBITS_ENHANCEMENT",
            "ONE_PER_CLICK_CONVERSION_ACTION_NOT_PERMITTED_WITH_BRAID",
            "INVALID_CUSTOMER_FOR_CLICK",
            "UNAUTHORIZED_CUSTOMER",
            "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE",
            "DUPLICATE_ORDER_ID",
            "DUPLICATE_ADJUSTMENT_IN_REQUEST",
            "DUPLICATE_CLICK_CONVERSION_IN_REQUEST",
        ] {
            assert!(
                matches!(class(code), Outcome::Rejected { alert: true, .. }),
                "{code}: configuration (or our batching), an alert"
            );
        }
        assert!(matches!(class("ABORTED"), Outcome::Retryable { .. }));
    }
}
