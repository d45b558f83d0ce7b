//! Shapes and parsers the fake Google APIs share: the google.rpc.Status error, the Ads API's
//! GoogleAdsFailure, the Ads datetime format, and JSON bodies parsed as the proto3 JSON mapping
//! does (unknown fields refused for the whole request).

use super::Data;
use crate::fakes::Reply;
use axum::Json;
use axum::http::StatusCode;
use bridge_core::timestamp::Timestamp;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex, MutexGuard};

pub(super) fn lock(d: &Arc<Mutex<Data>>) -> MutexGuard<'_, Data> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

/// A REST error: google.rpc.Status as JSON (source: DM-ERR; G-SVC-UP).
pub(super) fn rpc_error(
    status: StatusCode,
    rpc: &str,
    message: &str,
    details: Vec<Value>,
) -> Reply {
    (
        status,
        Json(
            json!({"error": {"code": status.as_u16(), "message": message, "status": rpc, "details": details}}),
        ),
    )
}

/// A GoogleAdsFailure detail (source: G-ERRORS; google-ads-api.md §Response).
pub(super) fn ads_failure(errors: Vec<Value>) -> Value {
    json!({"@type": "type.googleapis.com/google.ads.googleads.v26.errors.GoogleAdsFailure",
           "errors": errors, "requestId": "fake-ads-request"})
}

/// One GoogleAdsError. `errorCode` is a oneof: one key naming the enum (source: G-ERRORS).
pub(super) fn ads_error(code: &RowError, list: &str, index: Option<usize>) -> Value {
    let mut e = json!({"errorCode": {code.kind: code.code}, "message": code.message});
    if let Some(i) = index {
        // source: G-SVC-UP / research platform-semantics §2 sample: the row, then the field.
        let mut path = vec![json!({"fieldName": list, "index": i})];
        if let Some(f) = code.field {
            path.push(json!({"fieldName": f}));
        }
        e["location"] = json!({"fieldPathElements": path});
    }
    e
}

/// A whole-request Ads API error carrying one GoogleAdsError.
pub(super) fn ads_request_error(status: StatusCode, rpc: &str, code: &RowError) -> Reply {
    rpc_error(
        status,
        rpc,
        &code.message,
        vec![ads_failure(vec![ads_error(code, "", None)])],
    )
}

/// An Ads API error code for one row: the error enum's JSON key, the value, a message and the
/// row's field it concerns.
#[derive(Clone, Debug)]
pub(super) struct RowError {
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
    pub field: Option<&'static str>,
}

pub(super) fn row_error<T>(
    kind: &'static str,
    code: &'static str,
    field: Option<&'static str>,
    message: impl Into<String>,
) -> Result<T, RowError> {
    Err(RowError {
        kind,
        code,
        message: message.into(),
        field,
    })
}

/// Parses a body as the proto3 JSON mapping does: a bad or unknown field fails the whole
/// request with 400 INVALID_ARGUMENT (source: google-ads-api.md "Unknown name"; the proto3 JSON
/// mapping for enum strings, derived).
pub(super) fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Reply> {
    serde_json::from_slice(body).map_err(|e| {
        rpc_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            &format!("Invalid JSON payload received. {e}"),
            vec![],
        )
    })
}

/// `yyyy-mm-dd hh:mm:ss+hh:mm` as an instant; the only form the Ads API takes (source: G-SVC-UP,
/// "The date time at which the conversion occurred ... The format is yyyy-mm-dd hh:mm:ss+|-hh:mm").
pub(super) fn ads_datetime(s: &str) -> Option<Timestamp> {
    let b = s.as_bytes();
    let digit =
        |r: std::ops::Range<usize>| r.clone().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    let shaped = b.len() == 25
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
        && digit(23..25);
    if !shaped {
        return None;
    }
    Timestamp::parse_rfc3339(&format!("{}T{}{}", &s[..10], &s[11..19], &s[19..])).ok()
}
