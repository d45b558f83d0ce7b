//! The Data Manager API: `events:ingest` requests and their fast-fail answers, and
//! `requestStatus:retrieve` to learn whether Google processed a request.

use super::codes::retry_delay;
use super::rows::{GoogleItem, Kind, build_item};
use super::{Api, GooglePlatform, REQUEST_ID_PREFIX, err, rejected, retry};
use async_trait::async_trait;
use bridge_core::correction::CorrectionStep;
use bridge_core::delivery::{
    Answer, Attempt, DeliveryStatus, Destination, ErrorCode, ErrorInfo, Outcome,
};
use bridge_core::event::{CanonicalEvent, EventName};
use bridge_core::timestamp::Timestamp;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

/// How long a refund waits before asking again whether Data Manager processed its won.
pub const PROCESSING_WAIT: Duration = Duration::from_secs(600);
/// How long before asking again about a won Google did not confirm (the operator may resend
/// it meanwhile); the refund ends `unconfirmed` at its wait deadline.
pub const UNCONFIRMED_WAIT: Duration = Duration::from_secs(3600);

/// ErrorReason values that are about the account, the destination or the credentials, not an
/// event: the whole request is refused, with an alert, and no bisection (a 2,000-event batch
/// with one of these costs one request, not 3,999).
/// source: google-ads-datamanager google/ads/datamanager_v1/types/error.py (ErrorReason)
const DM_CONFIGURATION: &[&str] = &[
    "NOT_FOUND",
    "PERMISSION_DENIED",
    "INVALID_DESTINATION",
    "DATA_PARTNER_USER_LIST_MUTATE_NOT_ALLOWED",
    "DIFFERENT_LOGIN_ACCOUNTS_NOT_ALLOWED_FOR_DATA_PARTNER",
    "TERMS_AND_CONDITIONS_NOT_SIGNED",
    "INVALID_CONVERSION_ACTION_ID",
    "INVALID_CONVERSION_ACTION_TYPE",
    "DESTINATION_ACCOUNT_NOT_ENABLED_ENHANCED_CONVERSIONS_FOR_LEADS",
    "DESTINATION_ACCOUNT_DATA_POLICY_PROHIBITS_ENHANCED_CONVERSIONS",
    "DESTINATION_ACCOUNT_ENHANCED_CONVERSIONS_TERMS_NOT_SIGNED",
    "DUPLICATE_DESTINATION_REFERENCE",
    "UNSUPPORTED_OPERATING_ACCOUNT_FOR_DATA_PARTNER",
    "UNSUPPORTED_LINKED_ACCOUNT_FOR_DATA_PARTNER",
    "INVALID_PROPERTY_TYPE",
    "INVALID_STREAM_TYPE",
    "LINKED_ACCOUNT_ONLY_ALLOWED_WITH_DATA_PARTNER_LOGIN_ACCOUNT",
    "OPERATING_ACCOUNT_LOGIN_ACCOUNT_MISMATCH",
    "NOT_ALLOWLISTED",
    "MULTIPLE_DESTINATIONS_FOR_GOOGLE_ANALYTICS_EVENT",
];

/// The canonical status codes the guide says to retry: "Retry only for transient server
/// errors such as UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, UNKNOWN, and ABORTED"; and
/// RESOURCE_EXHAUSTED (429), the per-project quota, after a wait.
/// source: https://developers.google.com/data-manager/api/devguides/concepts/understand-errors
const DM_TRANSIENT: &[&str] = &[
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "INTERNAL",
    "UNKNOWN",
    "ABORTED",
    "RESOURCE_EXHAUSTED",
];

/// The event index in a Data Manager field path: `events.events[3].user_data...` as the
/// guide's example writes it, `events[3]...`, or camelCase; wherever `events[N]` stands.
fn event_index(field: &str) -> Option<usize> {
    let at = field.find("events[")?;
    let rest = &field[at + "events[".len()..];
    rest[..rest.find(']')?].parse().ok()
}

/// A field path about the request's destinations (`destinations[0].login_account...`):
/// configuration, whatever its reason.
fn is_destination_path(field: &str) -> bool {
    field.starts_with("destinations")
}

/// A Data Manager answer: delivered with the requestId, bad events named by index (fast-fail),
/// or one outcome for the whole request. The cause of a refusal is each field violation's
/// `reason` (the ErrorReason, e.g. INVALID_HEX_ENCODING), else its description, not ErrorInfo's
/// generic INVALID_ARGUMENT.
pub fn classify_datamanager(status: u16, body: &str) -> Answer {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    if (200..300).contains(&status) {
        let _ = warn_fields(&v);
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
    let violations: Vec<(&str, &str, &str)> = details
        .iter()
        .flat_map(|d| d["fieldViolations"].as_array().into_iter().flatten())
        .map(|f| {
            (
                f["field"].as_str().unwrap_or(""),
                f["reason"].as_str().unwrap_or(""),
                f["description"].as_str().unwrap_or(""),
            )
        })
        .collect();
    // ErrorInfo's reason is generic (INVALID_ARGUMENT); a specific one (SERVICE_DISABLED...)
    // still says something.
    let info_reason = details
        .iter()
        .filter(|d| {
            d["@type"]
                .as_str()
                .is_some_and(|t| t.ends_with("ErrorInfo"))
        })
        .find_map(|d| d["reason"].as_str())
        .unwrap_or("");
    let label = |reason: &str| match reason {
        "" if rpc.is_empty() => ErrorCode::http(status),
        "" => ErrorCode::platform(rpc),
        r => ErrorCode::platform(r),
    };
    let config = violations
        .iter()
        .find(|(field, reason, _)| DM_CONFIGURATION.contains(reason) || is_destination_path(field));
    if let Some((field, reason, description)) = config {
        return Answer::Whole(Outcome::Rejected {
            error: err(
                label(reason),
                format!(
                    "{field}: {}",
                    if description.is_empty() {
                        message.as_str()
                    } else {
                        description
                    }
                ),
            ),
            dead_letter: true,
            alert: true,
        });
    }
    if status == 401 || status == 403 || DM_CONFIGURATION.contains(&info_reason) {
        return Answer::Whole(Outcome::Rejected {
            error: err(label(info_reason), message),
            dead_letter: true,
            alert: true,
        });
    }
    if status == 429 || status >= 500 || DM_TRANSIENT.contains(&rpc) {
        return Answer::Whole(retry(label(""), message, retry_delay(e)));
    }
    let mut bad: BTreeMap<usize, ErrorInfo> = BTreeMap::new();
    for (field, reason, description) in &violations {
        if let Some(i) = event_index(field) {
            let cause = if reason.is_empty() {
                label("")
            } else {
                ErrorCode::platform(reason)
            };
            let why = if description.is_empty() {
                message.as_str()
            } else {
                description
            };
            bad.entry(i)
                .or_insert_with(|| err(cause, format!("{field}: {why}")));
        }
    }
    if bad.is_empty() {
        Answer::Whole(rejected(label(info_reason), message))
    } else {
        Answer::BadItems(bad.into_iter().collect())
    }
}

/// Warnings for invalid optional fields on an accepted request (the Data Manager release
/// notes of 2026-07 describe `fieldWarnings`; the REST reference shows only `requestId`):
/// logged and counted (the `field_warnings` metric), never a failure. Returns the count.
fn warn_fields(v: &Value) -> usize {
    let warnings = v["fieldWarnings"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    for w in warnings {
        tracing::warn!(
            destination = "google",
            result = "field_warning",
            field = w["field"].as_str().unwrap_or(""),
            reason = w["reason"].as_str().unwrap_or(""),
            "Data Manager accepted the request with a warning"
        );
    }
    if !warnings.is_empty() {
        bridge_core::metrics::emit(&bridge_core::metrics::emf_line(
            Timestamp::now().unix_ms(),
            &[("destination", "google")],
            &[("field_warnings", warnings.len() as f64)],
        ));
    }
    warnings.len()
}

pub(super) struct DataManagerRequest<'a> {
    pub(super) platform: &'a GooglePlatform,
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

impl GooglePlatform {
    /// A refund restated through Data Manager may only go once Google confirms it processed
    /// the won's request: a transactionId Google does not know creates a new conversion, so a
    /// restatement sent too early (or after a won Google refused) adds a conversion of its own.
    /// SUCCESS: go. PROCESSING: look again later. PARTIAL_SUCCESS, FAILED or unknown: the won's
    /// row cannot be confirmed; the refund waits until its deadline and ends `unconfirmed`.
    pub(super) async fn confirm_processed(
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
        // After a correction moved the conversion, the upload that made it is the one to
        // confirm: a restatement processed before it would be overwritten by it.
        let won = won.map(|(w, s)| {
            order
                .iter()
                .filter(|e| {
                    e.correction
                        .as_ref()
                        .is_some_and(|c| c.of == w.key && c.step == CorrectionStep::Upload)
                })
                .filter_map(|e| Some((e, e.destinations.get(&Destination::Google)?)))
                .filter(|(_, s)| s.status.is_delivered())
                .max_by_key(|(e, _)| e.correction.as_ref().map(|c| c.made_at))
                .unwrap_or((w, s))
        });
        let unconfirmed = |why: String, after: Duration| Outcome::Wait {
            error: err(ErrorCode::OriginalUnconfirmed, why),
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
                    ErrorCode::OriginalProcessing,
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
        let token = self.tokens.token().await?;
        let resp = status_request(&self.http, &self.cfg.datamanager_base_url, request_id)
            .bearer_auth(token)
            .timeout(self.cfg.timeout)
            .send()
            .await
            .map_err(|e| retry(ErrorCode::Network, crate::http::error_text(e), None))?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| retry(ErrorCode::ResponseRead, crate::http::error_text(e), None))?;
        if !(200..300).contains(&status) {
            return Err(match classify_datamanager(status, &text) {
                Answer::Whole(o) => o,
                _ => rejected(ErrorCode::http(status), text),
            });
        }
        serde_json::from_str(&text)
            .map_err(|e| rejected(ErrorCode::UnreadableStatus, e.to_string()))
    }
}

/// `requestStatus:retrieve` for one request id. The id goes URL-encoded as the query parameter:
/// Google's ids may hold '+', '/' and '=', which a raw query would change.
fn status_request(
    http: &reqwest::Client,
    base_url: &str,
    request_id: &str,
) -> reqwest::RequestBuilder {
    http.get(format!("{base_url}/v1/requestStatus:retrieve"))
        .query(&[("requestId", request_id)])
}

/// The reconcile run's port for Data Manager's request statuses.
#[async_trait]
impl bridge_core::reconcile::run::RequestStatus for GooglePlatform {
    async fn retrieve(&self, request_id: &str) -> Result<Value, String> {
        self.request_status(request_id).await.map_err(|o| {
            let code = o.error().map(|e| e.code.to_string()).unwrap_or_default();
            format!("{} {code}", o.result().as_str()).trim().to_string()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_id_is_url_encoded_in_the_status_query() {
        let http = crate::http::client().unwrap();
        let req = status_request(&http, "https://dm.example", "Ab+c/d=e f")
            .build()
            .unwrap();
        assert_eq!(
            req.url().as_str(),
            "https://dm.example/v1/requestStatus:retrieve?requestId=Ab%2Bc%2Fd%3De+f"
        );
        let back: Vec<(String, String)> = req.url().query_pairs().into_owned().collect();
        assert_eq!(back, [("requestId".to_string(), "Ab+c/d=e f".to_string())]);
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

    /// The two error samples of Google's "understand API errors" guide, verbatim but for the
    /// request ids. source: https://developers.google.com/data-manager/api/devguides/concepts/understand-errors
    fn guide_error(violations: Value) -> String {
        json!({"error": {"code": 400, "message": "There was a problem with the request.", "status": "INVALID_ARGUMENT",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "INVALID_ARGUMENT",
                 "domain": "datamanager.googleapis.com", "metadata": {"requestId": "t-a8896317"}},
                {"@type": "type.googleapis.com/google.rpc.RequestInfo", "requestId": "t-a8896317"},
                {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": violations}]}})
        .to_string()
    }

    #[test]
    fn the_guides_error_shapes() {
        // Sample 2: bad events named by `events.events[i]`, the cause in each violation's reason.
        let hex = guide_error(json!([
            {"field": "events.events[0].user_data.user_identifiers[1]", "description": "The HEX encoded value is malformed.", "reason": "INVALID_HEX_ENCODING"},
            {"field": "events.events[1].user_data.user_identifiers[2]", "description": "The HEX encoded value is malformed.", "reason": "INVALID_HEX_ENCODING"}
        ]));
        match classify_datamanager(400, &hex) {
            Answer::BadItems(b) => {
                assert_eq!(b.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 1]);
                assert_eq!(b[0].1.code, "INVALID_HEX_ENCODING", "not INVALID_ARGUMENT");
            }
            other => panic!("{other:?}"),
        }
        // Sample 1: a destination's account id: configuration, the whole request, an alert.
        let account = guide_error(json!([
            {"field": "destinations[0].login_account.account_id", "description": "String is not a valid number.", "reason": "INVALID_NUMBER_FORMAT"}
        ]));
        assert!(matches!(
            classify_datamanager(400, &account),
            Answer::Whole(Outcome::Rejected { alert: true, ref error, .. }) if error.code == "INVALID_NUMBER_FORMAT"
        ));
        // Terms not signed on an event's user data: configuration, no bisection.
        let terms = guide_error(json!([
            {"field": "events.events[4].user_data", "description": "terms", "reason": "DESTINATION_ACCOUNT_ENHANCED_CONVERSIONS_TERMS_NOT_SIGNED"}
        ]));
        assert!(matches!(
            classify_datamanager(400, &terms),
            Answer::Whole(Outcome::Rejected { alert: true, .. })
        ));
        // ABORTED is in the guide's retry list.
        let aborted = json!({"error": {"code": 409, "status": "ABORTED", "message": "aborted"}});
        assert!(matches!(
            classify_datamanager(409, &aborted.to_string()),
            Answer::Whole(Outcome::Retryable { .. })
        ));
        // Warnings for optional fields do not fail an accepted request.
        assert!(matches!(
            classify_datamanager(
                200,
                r#"{"requestId": "r", "fieldWarnings": [{"field": "events.events[0].currency", "reason": "INVALID_CURRENCY_CODE", "description": "x"}]}"#
            ),
            Answer::Whole(Outcome::Delivered { .. })
        ));
        let two = json!({"requestId": "r", "fieldWarnings": [
            {"field": "events.events[0].currency", "reason": "INVALID_CURRENCY_CODE"},
            {"field": "events.events[1].event_source", "reason": "INVALID_EVENT_SOURCE"}]});
        assert_eq!(warn_fields(&two), 2, "each warning counted");
        assert_eq!(warn_fields(&json!({"requestId": "r"})), 0);
    }
}
