//! Meta Conversions API: event building per the mapping contract, checks before batching,
//! response classification, and the HTTP client (batches of up to 1,000, bisected on a
//! whole-request rejection so one bad event never blocks the others). The access token and
//! appsecret_proof travel in the form-encoded body, never in a URL, so no error text or log
//! line can carry them.

use crate::credentials::Deferred;
use async_trait::async_trait;
use bridge_core::delivery::pipeline::Platform;
use bridge_core::delivery::{Answer, Attempt, Limits, Outcome, deliver_isolating};
use bridge_core::delivery::{Destination, ErrorCode, ErrorInfo};
use bridge_core::event::{CanonicalEvent, EventName};
use bridge_core::mapping::{Mapping, MetaRefundPolicy};
use bridge_core::timestamp::Timestamp;
use hmac::{KeyInit, Mac};
use serde_json::{Map, Value, json};
use std::time::Duration;

/// Meta accepts at most 1,000 events per request.
pub const MAX_EVENTS: usize = 1000;
const DAY: i64 = 86_400;

#[derive(Clone, Debug)]
pub struct MetaConfig {
    pub base_url: String,
    pub api_version: String,
    pub pixel_id: String,
    /// Dry runs: events go to Events Manager's Test Events tool.
    pub test_event_code: Option<String>,
    pub timeout: Duration,
}

fn err(code: ErrorCode, message: impl Into<String>) -> ErrorInfo {
    ErrorInfo::new(code, message)
}

/// The CAPI event for one stored event, or why it can never be valid.
pub fn build_event(
    e: &CanonicalEvent,
    mapping: &Mapping,
    now: Timestamp,
) -> Result<Value, ErrorInfo> {
    let Some(meta) = &mapping.meta else {
        return Err(err(
            ErrorCode::NotMapped,
            "Meta is not enabled in the mapping",
        ));
    };
    let mapped = match (e.event_name, meta.refund_policy) {
        (EventName::Refund, MetaRefundPolicy::Skip) => None,
        (name, _) => meta.events.get(&name),
    };
    let value = e.value.map(|v| v.as_f64());
    let Some(mapped) = mapped else {
        return Err(err(
            ErrorCode::NotMapped,
            format!("{} is not mapped to a Meta event", e.event_name),
        ));
    };
    let age = now.secs_since(&e.occurred_at);
    let window = if mapped.action_source == "physical_store" {
        62 * DAY
    } else {
        7 * DAY
    };
    if age > window {
        return Err(err(
            ErrorCode::EventTooOld,
            format!(
                "event_time is {} days old; Meta accepts {} days for {}",
                age / DAY,
                window / DAY,
                mapped.action_source
            ),
        ));
    }
    if age < -60 {
        return Err(err(ErrorCode::EventInFuture, "event_time is in the future"));
    }
    if mapped.action_source == "website" {
        return Err(err(
            ErrorCode::WebsiteFieldsMissing,
            "website events need client_user_agent and event_source_url, which CRM events lack",
        ));
    }

    let mut ud = Map::new();
    let m = &e.identity.meta;
    for (k, v) in [
        ("em", &m.em),
        ("ph", &m.ph),
        ("fn", &m.first_name),
        ("ln", &m.ln),
        ("ct", &m.ct),
        ("st", &m.st),
        ("zp", &m.zp),
        ("country", &m.country),
        ("external_id", &m.external_id),
    ] {
        if let Some(v) = v {
            ud.insert(k.into(), json!([v]));
        }
    }
    let c = &e.identity.click;
    for (k, v) in [
        ("fbc", &c.fbc),
        ("fbp", &c.fbp),
        ("client_ip_address", &c.client_ip_address),
        ("client_user_agent", &c.client_user_agent),
    ] {
        if let Some(v) = v {
            ud.insert(k.into(), json!(v));
        }
    }
    // Meta's lead id is an integer (15-16 digits), not a string.
    // source: Conversion Leads payload specification (user_data.lead_id: "integer")
    if let Some(id) = c.lead_id.as_deref().and_then(|v| v.parse::<u64>().ok()) {
        ud.insert("lead_id".into(), json!(id));
    }
    // Checked here so a weak event is rejected alone instead of sinking its batch: Meta asks for
    // at least one strong key, or both the IP address and the user agent.
    // source: https://developers.facebook.com/docs/marketing-api/conversions-api/parameters/customer-information-parameters
    let strong = ["em", "ph", "external_id", "fbc", "fbp", "lead_id"]
        .iter()
        .any(|k| ud.contains_key(*k));
    let browser = ud.contains_key("client_ip_address") && ud.contains_key("client_user_agent");
    if !strong && !browser {
        return Err(err(
            ErrorCode::NoCustomerInformation,
            "Meta needs an email, phone, external id, fbc, fbp or lead id, or both the client IP address and user agent",
        ));
    }

    let mut cd = Map::new();
    if let Some(v) = value {
        cd.insert("value".into(), json!(v));
    }
    if let Some(cur) = &e.currency {
        cd.insert("currency".into(), json!(cur));
    }
    if mapped.event_name == "Purchase"
        && (cd.get("value").is_none() || cd.get("currency").is_none())
    {
        return Err(err(
            ErrorCode::PurchaseWithoutValue,
            "Purchase needs value and currency",
        ));
    }
    if let Some(o) = &e.order_id {
        cd.insert("order_id".into(), json!(o));
    }
    // Meta lists lead_id as required for Conversion Leads events; without one the event goes as
    // an ordinary CRM conversion rather than a Conversion Leads event Meta would refuse.
    // source: https://developers.facebook.com/docs/marketing-api/conversions-api/conversion-leads-integration/payload-specification
    if let Some(src) = &meta.lead_event_source
        && meta.conversion_leads_stages.contains(&e.event_name)
        && ud.contains_key("lead_id")
    {
        cd.insert("event_source".into(), json!("crm"));
        cd.insert("lead_event_source".into(), json!(src));
    }

    let mut ev = json!({
        "event_name": mapped.event_name,
        "event_time": e.occurred_at.unix_secs(),
        "event_id": e.event_id,
        "action_source": mapped.action_source,
        "user_data": ud,
    });
    if !cd.is_empty() {
        ev["custom_data"] = Value::Object(cd);
    }
    if let Some((country, state)) = meta.limited_data_use {
        ev["data_processing_options"] = json!(["LDU"]);
        ev["data_processing_options_country"] = json!(country);
        ev["data_processing_options_state"] = json!(state);
    }
    Ok(ev)
}

const TRANSIENT_CODES: &[i64] = &[1, 2, 4, 17, 341, 368, 613, 80003, 80004];

/// Reads Meta's answer for a whole request into one outcome for all of its events.
pub fn classify(status: u16, body: &str, sent: usize) -> Outcome {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    if (200..300).contains(&status) {
        let received = v["events_received"].as_u64().unwrap_or(0) as usize;
        let trace = v["fbtrace_id"].as_str().map(str::to_string);
        if received == sent {
            return Outcome::Delivered {
                platform_ref: trace,
                replay: false,
            };
        }
        return Outcome::Retryable {
            error: err(
                ErrorCode::EventsReceivedMismatch,
                format!("sent {sent}, Meta received {received}"),
            ),
            after: None,
        };
    }
    let e = &v["error"];
    let code = e["code"].as_i64();
    let message = e["error_user_msg"]
        .as_str()
        .or(e["message"].as_str())
        .unwrap_or("no error message")
        .to_string();
    let label = match code {
        Some(c) => ErrorCode::meta(c, e["error_subcode"].as_i64()),
        None => ErrorCode::http(status),
    };
    let info = err(label, message);
    let transient = e["is_transient"].as_bool() == Some(true)
        || code.is_some_and(|c| TRANSIENT_CODES.contains(&c))
        || status == 429
        || status >= 500;
    if transient {
        return Outcome::Retryable {
            error: info,
            after: None,
        };
    }
    // Configuration, not data: a person must fix the token, the permissions or the pixel id,
    // and splitting the batch cannot help. source: M-ERR (190 access token, 102 API session,
    // 10 and 200-299 permissions, 3 capability); 100 with subcode 33 is the Graph API's
    // "object does not exist, cannot be loaded due to missing permissions" (a wrong pixel id),
    // as recorded in real responses (rudder-transformer's networkHandler).
    let subcode = e["error_subcode"].as_i64();
    let config = code == Some(190)
        || code == Some(102)
        || code.is_some_and(|c| (200..300).contains(&c))
        || code == Some(10)
        || code == Some(3)
        || (code == Some(100) && subcode == Some(33));
    Outcome::Rejected {
        error: info,
        dead_letter: true,
        alert: config,
    }
}

/// What Meta's requests are authorised with: the access token and, when the app secret is
/// configured, its `appsecret_proof` (HMAC-SHA256 of the token keyed by the app secret).
pub struct MetaAccess {
    token: String,
    proof: Option<String>,
}

impl MetaAccess {
    pub fn new(access_token: String, app_secret: Option<&str>) -> Self {
        let proof = app_secret.and_then(|secret| {
            let mut m =
                <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).ok()?;
            m.update(access_token.as_bytes());
            Some(bridge_core::hashing::hex(&m.finalize().into_bytes()))
        });
        MetaAccess {
            token: access_token,
            proof,
        }
    }

    /// The access from SSM parameters as one `GetParameters` answered them (`values`, by
    /// name): the token from `token_param`, the app secret from `secret_param` when one is
    /// configured. A token parameter without a value is permanent: a person must set it.
    pub fn from_parameters(
        mut values: std::collections::HashMap<String, String>,
        token_param: &str,
        secret_param: Option<&str>,
    ) -> Result<Self, crate::credentials::ReadError> {
        let token = values
            .remove(token_param)
            .ok_or_else(|| crate::credentials::ReadError {
                message: format!("SSM parameter {token_param} has no value"),
                permanent: true,
            })?;
        let app_secret = secret_param.and_then(|p| values.remove(p));
        Ok(MetaAccess::new(token, app_secret.as_deref()))
    }
}

/// The Meta destination over HTTP.
pub struct MetaPlatform {
    http: reqwest::Client,
    cfg: MetaConfig,
    mapping: Mapping,
    access: Deferred<MetaAccess>,
}

impl MetaPlatform {
    pub fn new(
        http: reqwest::Client,
        cfg: MetaConfig,
        mapping: Mapping,
        access: impl Into<Deferred<MetaAccess>>,
    ) -> Self {
        MetaPlatform {
            http,
            cfg,
            mapping,
            access: access.into(),
        }
    }

    async fn post(&self, pixel: &str, events: &[Value]) -> Outcome {
        let url = format!(
            "{}/{}/{}/events",
            self.cfg.base_url, self.cfg.api_version, pixel
        );
        // Meta's own examples post the token, the proof and the events as form fields, and the
        // Python SDK sends the body form-encoded: nothing secret goes into the URL, so no
        // transport error, log line or stored message can carry it.
        // source: M-USE (curl -F data=... -F access_token=...), facebook_business/api.py
        let access = match self.access.get().await {
            Ok(a) => a,
            Err(e) => return e.outcome(),
        };
        let data = serde_json::to_string(events).unwrap_or_else(|_| "[]".into());
        let mut form: Vec<(&str, &str)> = vec![
            ("data", data.as_str()),
            ("access_token", access.token.as_str()),
        ];
        if let Some(p) = &access.proof {
            form.push(("appsecret_proof", p.as_str()));
        }
        if let Some(code) = &self.cfg.test_event_code {
            form.push(("test_event_code", code.as_str()));
        }
        let resp = self
            .http
            .post(url)
            .form(&form)
            .timeout(self.cfg.timeout)
            .send()
            .await;
        match resp {
            Ok(r) => {
                let status = r.status().as_u16();
                match r.text().await {
                    Ok(text) => classify(status, &text, events.len()),
                    Err(e) => Outcome::Retryable {
                        error: err(ErrorCode::ResponseRead, crate::http::error_text(e)),
                        after: None,
                    },
                }
            }
            // A timeout may come after Meta accepted the batch: the retry sends the same
            // event ids (the bridge never relies on Meta deduplicating them for counting).
            Err(e) if e.is_timeout() => Outcome::Retryable {
                error: err(ErrorCode::Timeout, "no answer in time"),
                after: None,
            },
            Err(e) => Outcome::Retryable {
                error: err(ErrorCode::Network, crate::http::error_text(e)),
                after: None,
            },
        }
    }
}

/// One request for one pixel: Meta answers for the whole request.
struct PixelRequest<'a> {
    platform: &'a MetaPlatform,
    pixel: &'a str,
}

#[async_trait]
impl Attempt<Value> for PixelRequest<'_> {
    async fn attempt(&self, events: &[Value]) -> Answer {
        Answer::Whole(self.platform.post(self.pixel, events).await)
    }
}

#[async_trait]
impl Platform for MetaPlatform {
    type Item = Value;

    fn destination(&self) -> Destination {
        Destination::Meta
    }

    fn max_batch(&self) -> usize {
        MAX_EVENTS
    }

    fn request_timeout(&self) -> Duration {
        self.cfg.timeout
    }

    fn sent_as(&self, item: &Value) -> Option<String> {
        item["event_name"].as_str().map(str::to_string)
    }

    fn prepare(
        &self,
        event: &CanonicalEvent,
        _order: &[CanonicalEvent],
        now: Timestamp,
    ) -> Result<(String, Value), ErrorInfo> {
        Ok((
            self.cfg.pixel_id.clone(),
            build_event(event, &self.mapping, now)?,
        ))
    }

    /// A whole-request rejection holding more than one event is bisected, so the bad event
    /// ends alone with its own error and the rest are delivered.
    async fn send(&self, pixel: &str, items: &[Value], limits: Limits) -> Vec<Outcome> {
        if let Some(outcomes) = self.access.unavailable("meta", items.len()).await {
            return outcomes;
        }
        let request = PixelRequest {
            platform: self,
            pixel,
        };
        deliver_isolating(&request, items, limits).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_core::event::{ValidationContext, parse_event_json, validate};
    use bridge_core::hashing::sha256_hex;

    fn now() -> Timestamp {
        Timestamp::parse_rfc3339("2026-11-28T12:00:00Z").unwrap()
    }

    fn event(v: Value) -> CanonicalEvent {
        let ctx = ValidationContext::for_tests(now());
        validate(&parse_event_json(&v.to_string()).unwrap(), &ctx).unwrap()
    }

    #[test]
    fn access_from_parameters_needs_the_token_and_proves_it_with_the_app_secret() {
        let values = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::HashMap<_, _>>()
        };
        let a = MetaAccess::from_parameters(
            values(&[("/m/token", "EAAB"), ("/m/secret", "app-secret")]),
            "/m/token",
            Some("/m/secret"),
        )
        .unwrap();
        assert_eq!(a.token, "EAAB");
        let mut m = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(b"app-secret").unwrap();
        m.update(b"EAAB");
        assert_eq!(
            a.proof.as_deref(),
            Some(bridge_core::hashing::hex(&m.finalize().into_bytes()).as_str())
        );
        let no_secret =
            MetaAccess::from_parameters(values(&[("/m/token", "EAAB")]), "/m/token", None).unwrap();
        assert_eq!(no_secret.proof, None);
        let e = MetaAccess::from_parameters(values(&[]), "/m/token", Some("/m/secret"))
            .err()
            .unwrap();
        assert!(e.permanent);
        assert_eq!(e.message, "SSM parameter /m/token has no value");
    }

    fn won() -> Value {
        json!({"source": "hubspot", "event_name": "won", "occurred_at": "2026-11-27T10:00:00Z", "entity_type": "opportunity",
               "entity_id": "D-1", "order_id": "O-1", "value": 99.5, "currency": "EUR",
               "identity": {"email": "a@example.com", "phone": "+1 650 555 1234", "fbclid": "IwAR", "client_ip_address": "203.0.113.1"}})
    }

    #[test]
    fn won_becomes_a_purchase_with_hashes_and_crm_fields() {
        let m = Mapping::bundled().unwrap();
        let e = event(won());
        let v = build_event(&e, &m, now()).unwrap();
        assert_eq!(v["event_name"], "Purchase");
        assert_eq!(v["event_id"], e.event_id.as_str());
        assert_eq!(v["event_time"], e.occurred_at.unix_secs());
        assert_eq!(v["action_source"], "system_generated");
        assert_eq!(v["user_data"]["em"], json!([sha256_hex("a@example.com")]));
        assert_eq!(v["user_data"]["ph"], json!([sha256_hex("16505551234")]));
        assert_eq!(
            v["user_data"]["client_ip_address"], "203.0.113.1",
            "never hashed"
        );
        assert!(v["user_data"]["fbc"].as_str().unwrap().starts_with("fb.1."));
        assert_eq!(
            v["custom_data"],
            json!({"value": 99.5, "currency": "EUR", "order_id": "O-1"}),
            "Conversion Leads fields are for lead-funnel events only"
        );
        assert!(v.get("data_processing_options").is_none());
    }

    #[test]
    fn refund_policies() {
        let mut r = won();
        r["event_name"] = json!("refund");
        r["value"] = json!(20);
        let e = event(r);
        let mut m = Mapping::bundled().unwrap();
        let v = build_event(&e, &m, now()).unwrap();
        assert_eq!(
            (v["event_name"].as_str(), v["custom_data"]["value"].as_f64()),
            (Some("Refund"), Some(20.0))
        );
        assert!(
            v["custom_data"].get("event_source").is_none(),
            "no Conversion Leads fields on a refund"
        );
        m.meta.as_mut().unwrap().refund_policy = MetaRefundPolicy::Skip;
        assert_eq!(build_event(&e, &m, now()).unwrap_err().code, "not_mapped");
    }

    #[test]
    fn events_that_cannot_be_valid_are_rejected_before_batching() {
        let m = Mapping::bundled().unwrap();
        let e = event(won());
        assert_eq!(
            build_event(&e, &m, now().plus_secs(8 * DAY))
                .unwrap_err()
                .code,
            "event_too_old"
        );
        let mut bare = won();
        bare["identity"] = json!({});
        assert_eq!(
            build_event(&event(bare), &m, now()).unwrap_err().code,
            "no_customer_information"
        );
        let mut ldu = m.clone();
        ldu.meta.as_mut().unwrap().limited_data_use = Some((1, 1000));
        let v = build_event(&e, &ldu, now()).unwrap();
        assert_eq!(
            (
                v["data_processing_options"].clone(),
                v["data_processing_options_state"].clone()
            ),
            (json!(["LDU"]), json!(1000))
        );
    }

    #[test]
    fn conversion_leads_fields_go_on_lead_stages_only_with_a_numeric_lead_id() {
        let m = Mapping::bundled().unwrap();
        let lead = event(
            json!({"source": "hubspot", "event_name": "lead", "occurred_at": "2026-11-27T10:00:00Z",
            "entity_type": "lead", "entity_id": "L-1", "identity": {"lead_id": "1234567890123456"}}),
        );
        let v = build_event(&lead, &m, now()).unwrap();
        assert_eq!(v["custom_data"]["event_source"], "crm");
        assert_eq!(v["custom_data"]["lead_event_source"], "HubSpot");
        assert_eq!(v["action_source"], "system_generated");
        assert_eq!(v["user_data"]["lead_id"], json!(1234567890123456u64));
        assert!(
            v["user_data"]["lead_id"].is_u64(),
            "an integer, not a string"
        );
        // Without a lead id the lead is an ordinary CRM conversion: no Conversion Leads fields.
        let plain = event(
            json!({"source": "hubspot", "event_name": "lead", "occurred_at": "2026-11-27T10:00:00Z",
            "entity_type": "lead", "entity_id": "L-2", "identity": {"email": "a@example.com"}}),
        );
        let v = build_event(&plain, &m, now()).unwrap();
        assert!(v["custom_data"].get("event_source").is_none());
        assert!(v["custom_data"].get("lead_event_source").is_none());
    }

    #[test]
    fn the_customer_information_rule_is_checked_before_batching() {
        let m = Mapping::bundled().unwrap();
        let with = |identity: Value| {
            let mut v = won();
            v["identity"] = identity;
            build_event(&event(v), &m, now()).map(|_| ())
        };
        // Names, city and zip alone are not enough for Meta.
        let weak = with(
            json!({"first_name": "Ada", "last_name": "L", "city": "X", "zip": "94105", "country": "US"}),
        );
        assert_eq!(weak.unwrap_err().code, "no_customer_information");
        assert_eq!(
            with(json!({"client_ip_address": "203.0.113.1"}))
                .unwrap_err()
                .code,
            "no_customer_information",
            "an IP address needs the user agent too"
        );
        assert!(
            with(json!({"client_ip_address": "203.0.113.1", "client_user_agent": "Mozilla/5.0"}))
                .is_ok()
        );
        assert!(with(json!({"external_id": "crm-7"})).is_ok());
        assert!(with(json!({"fbp": "fb.1.1700000000000.123"})).is_ok());
    }

    #[test]
    fn classification() {
        let ok = classify(
            200,
            r#"{"events_received": 3, "messages": [], "fbtrace_id": "AbC"}"#,
            3,
        );
        assert_eq!(
            ok,
            Outcome::Delivered {
                platform_ref: Some("AbC".into()),
                replay: false
            }
        );
        for (status, body) in [
            (500, "{}"),
            (429, "{}"),
            (400, r#"{"error": {"message": "x", "code": 613}}"#),
            (
                400,
                r#"{"error": {"message": "x", "code": 100, "is_transient": true}}"#,
            ),
            (200, r#"{"events_received": 2}"#),
        ] {
            assert!(
                matches!(classify(status, body, 3), Outcome::Retryable { .. }),
                "{status} {body}"
            );
        }
        let token = classify(
            400,
            r#"{"error": {"message": "Invalid OAuth access token.", "type": "OAuthException", "code": 190}}"#,
            1,
        );
        assert!(
            matches!(token, Outcome::Rejected { dead_letter: true, alert: true, ref error } if error.code == "meta_190")
        );
        for body in [
            r#"{"error": {"message": "Unsupported post request. Object with ID '1' does not exist, cannot be loaded due to missing permissions, or does not support this operation.", "type": "GraphMethodException", "code": 100, "error_subcode": 33}}"#,
            r#"{"error": {"message": "Session key invalid or no longer valid", "type": "OAuthException", "code": 102}}"#,
        ] {
            assert!(
                matches!(
                    classify(400, body, 1000),
                    Outcome::Rejected { alert: true, .. }
                ),
                "a wrong pixel id or a dead session is configuration: {body}"
            );
        }
        let old = classify(
            400,
            r#"{"error": {"message": "bad", "code": 100, "error_subcode": 2804003, "error_user_msg": "too old"}}"#,
            1,
        );
        assert!(
            matches!(old, Outcome::Rejected { dead_letter: true, alert: false, ref error } if error.code == "meta_100_2804003" && error.message == "too old")
        );
    }
}
