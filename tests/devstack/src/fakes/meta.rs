//! A strict fake of the Graph API's Conversions API endpoint (`POST /{version}/{pixel}/events`):
//! it takes its parameters from the query with a JSON body or from a form body, checks the
//! token, appsecret_proof and dataset, refuses a whole request for one bad event (`rules`),
//! records every event it receives raw, and offers what Meta's deduplication by
//! (pixel, event_name, event_id) within 48 hours would leave.

mod rules;
#[cfg(test)]
mod tests;

use super::{Chaos, Clock, Controls, Reply};
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use bridge_core::timestamp::Timestamp;
use hmac::{KeyInit, Mac};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

pub use super::Fault;

/// The dataset (pixel) id the local stack and the tests configure; `start` knows it.
pub const DEFAULT_PIXEL: &str = "1234567890";

// source: M-DEDUP ("If we find a match between events sent within 48 hours of each other, we only
// consider the first one")
const DEDUP_WINDOW_MS: i64 = 48 * 3600 * 1000;

/// What an access token can do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenState {
    Valid,
    /// 190 with subcode 463 (source: M-ERR, 190 "Access token has expired", subcodes 458-467).
    Expired,
    /// 102 without subcode (source: M-ERR, 102 "If no subcode is present, the login status or
    /// access token has expired, been revoked, or is otherwise invalid").
    Revoked,
    /// 190 without subcode (source: M-ERR).
    Invalid,
}

/// How a request carried its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `access_token` (and `appsecret_proof`) in the URL query, `data` in a JSON body
    /// (source: M-USE path `?access_token=`; the Node SDK src/api.js).
    QueryJson,
    /// `application/x-www-form-urlencoded` body (source: Ads Pixel Events reference
    /// `data=%5B...`; the Python SDK facebook_business/api.py posts `data=params`).
    Form,
    /// `multipart/form-data` body (source: M-USE and M-SEC curl `-F`; the PHP SDK CurlAdapter).
    Multipart,
}

/// One event as Meta received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub pixel: String,
    pub event: Value,
    /// The fake's clock at receipt: the 48 h dedup window runs from here.
    pub at: Timestamp,
    pub test_event_code: Option<String>,
}

pub struct Data {
    /// Strictness covers the rules labelled UNCONFIRMED in `rules`.
    pub controls: Controls,
    /// In strict mode, refuse Conversion Leads events (custom_data.event_source "crm") without
    /// user_data.lead_id (M-LEADS: "Required"; the refusal is UNCONFIRMED). On by default.
    pub require_lead_id: bool,
    /// Datasets that exist and the tokens can reach; any other id gets 100/33.
    pub pixels: HashSet<String>,
    /// Known access tokens; any other token is invalid (190).
    pub tokens: HashMap<String, TokenState>,
    /// When set, every request must carry `appsecret_proof` = hex(HMAC-SHA256(app_secret, token)).
    pub app_secret: Option<String>,
    /// Every event of every accepted request, in order of receipt.
    pub received: Vec<Received>,
    /// Every request, faulted or refused ones included.
    pub requests: usize,
    pub batch_sizes: Vec<usize>,
    pub transports: Vec<Transport>,
    /// Requests, faulted ones included, whose URL carried the token or the proof. Graph accepts
    /// them there (M-USE `?access_token=`), but a URL ends up in proxy logs and in reqwest's error
    /// text, so the bridge must never put them there: the harness asserts this stays 0.
    pub secrets_in_url: usize,
    /// Event ids the fake treats as invalid (a whole-request 400, as Meta does).
    pub poison: HashSet<String>,
    pub test_event_codes: Vec<String>,
}

impl Default for Data {
    fn default() -> Self {
        Data {
            controls: Controls::default(),
            require_lead_id: true,
            pixels: HashSet::from([DEFAULT_PIXEL.to_string()]),
            tokens: HashMap::new(),
            app_secret: None,
            received: Vec::new(),
            requests: 0,
            batch_sizes: Vec::new(),
            transports: Vec::new(),
            secrets_in_url: 0,
            poison: HashSet::new(),
            test_event_codes: Vec::new(),
        }
    }
}

#[derive(Clone)]
pub struct FakeMeta {
    pub base_url: String,
    pub token: String,
    pub data: Arc<Mutex<Data>>,
}

fn lock(d: &Arc<Mutex<Data>>) -> MutexGuard<'_, Data> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

/// A Graph API error (source: M-ERR shape `{"error": {message, type, code, error_subcode, fbtrace_id}}`;
/// M-SDK-EXC reads `is_transient`).
fn meta_error(code: i64, subcode: Option<i64>, kind: &str, message: &str) -> Reply {
    let mut e = json!({"message": message, "type": kind, "code": code, "fbtrace_id": "FakeTrace", "is_transient": false});
    if let Some(s) = subcode {
        e["error_subcode"] = json!(s);
    }
    (StatusCode::BAD_REQUEST, Json(json!({"error": e})))
}

fn invalid_parameter(subcode: Option<i64>, message: &str) -> Reply {
    meta_error(100, subcode, "OAuthException", message)
}

/// The request's parameters, wherever they came from.
#[derive(Default)]
struct Params {
    access_token: Option<String>,
    appsecret_proof: Option<String>,
    test_event_code: Option<String>,
    data: Option<Value>,
}

/// Reads the parameters from the query and the body, by the body's Content-Type.
fn params(
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
    strict: bool,
) -> Result<(Params, Transport), Reply> {
    // The media type is case-insensitive; the multipart boundary is not.
    let header = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let content_type = header.to_ascii_lowercase();
    // Graph takes parameters from the query string too (source: M-USE `?access_token=`).
    let mut p = Params {
        access_token: query.get("access_token").cloned(),
        appsecret_proof: query.get("appsecret_proof").cloned(),
        test_event_code: query.get("test_event_code").cloned(),
        data: query.get("data").map(|d| Value::String(d.clone())),
    };
    let fields: Vec<(String, String)>;
    let transport = if content_type.starts_with("application/x-www-form-urlencoded") {
        // source: Ads Pixel Events reference (form body `data=%5B...`); Python SDK api.py
        fields = serde_urlencoded::from_bytes(body)
            .map_err(|_| invalid_parameter(None, "the form body cannot be parsed"))?;
        Transport::Form
    } else if content_type.starts_with("multipart/form-data") {
        // source: M-USE and M-SEC curl examples (`-F access_token=... -F data=[...]`); PHP SDK
        fields = multipart_fields(header, body)
            .ok_or_else(|| invalid_parameter(None, "the multipart body cannot be parsed"))?;
        Transport::Multipart
    } else {
        fields = Vec::new();
        if !body.is_empty() {
            let Ok(Value::Object(v)) = serde_json::from_slice::<Value>(body) else {
                return Err(invalid_parameter(None, "the body is not a JSON object"));
            };
            if let Some(d) = v.get("data") {
                p.data = Some(d.clone());
            }
            if let Some(c) = v.get("test_event_code").and_then(Value::as_str) {
                p.test_event_code = Some(c.to_string());
            }
            // the fake's own rule (UNCONFIRMED: no Meta doc or SDK puts the token in a JSON
            // body, research meta.md Q1): only outside strict mode.
            if !strict {
                for (k, slot) in [
                    ("access_token", &mut p.access_token),
                    ("appsecret_proof", &mut p.appsecret_proof),
                ] {
                    if let Some(s) = v.get(k).and_then(Value::as_str) {
                        *slot = Some(s.to_string());
                    }
                }
            }
        }
        Transport::QueryJson
    };
    for (k, v) in fields {
        match k.as_str() {
            "access_token" => p.access_token = Some(v),
            "appsecret_proof" => p.appsecret_proof = Some(v),
            "test_event_code" => p.test_event_code = Some(v),
            // source: Ads Pixel Events reference (`data`: list<JSON-encoded string>)
            "data" => p.data = Some(Value::String(v)),
            _ => {}
        }
    }
    Ok((p, transport))
}

/// The text fields of a `multipart/form-data` body (files are not expected here).
fn multipart_fields(content_type: &str, body: &[u8]) -> Option<Vec<(String, String)>> {
    let boundary = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))?
        .trim_matches('"');
    let text = std::str::from_utf8(body).ok()?;
    let delimiter = format!("--{boundary}");
    let mut out = Vec::new();
    for part in text.split(delimiter.as_str()).skip(1) {
        if part.starts_with("--") {
            break;
        }
        let part = part.strip_prefix("\r\n").unwrap_or(part);
        let (head, value) = part.split_once("\r\n\r\n")?;
        let name = head
            .split(';')
            .find_map(|p| p.trim().strip_prefix("name="))?
            .split("\r\n")
            .next()?
            .trim_matches('"');
        let value = value.strip_suffix("\r\n").unwrap_or(value);
        out.push((name.to_string(), value.to_string()));
    }
    Some(out)
}

/// hex(HMAC-SHA256(key = app secret, message = access token)) (source: M-SEC; SDK session.py).
pub fn appsecret_proof(app_secret: &str, token: &str) -> String {
    match <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(app_secret.as_bytes()) {
        Ok(mut m) => {
            m.update(token.as_bytes());
            bridge_core::hashing::hex(&m.finalize().into_bytes())
        }
        Err(_) => String::new(),
    }
}

/// Token, proof and dataset, in the order Graph checks them.
fn check_access(d: &Data, p: &Params, pixel: &str) -> Result<(), Reply> {
    // the fake's own rule (UNCONFIRMED: a missing token gets Graph's own code; 190 is the
    // nearest documented one, M-ERR)
    let Some(token) = p.access_token.as_deref() else {
        return Err(meta_error(
            190,
            None,
            "OAuthException",
            "An access token is required to request this resource.",
        ));
    };
    match d.tokens.get(token) {
        Some(TokenState::Valid) => {}
        // source: M-ERR (190, subcode 463: expired)
        Some(TokenState::Expired) => {
            return Err(meta_error(
                190,
                Some(463),
                "OAuthException",
                "Error validating access token: Session has expired.",
            ));
        }
        // source: M-ERR (102: "access token has expired, been revoked, or is otherwise invalid")
        Some(TokenState::Revoked) => {
            return Err(meta_error(
                102,
                None,
                "OAuthException",
                "Error validating access token: The session has been invalidated.",
            ));
        }
        // source: M-ERR (190: invalid OAuth 2.0 access token)
        Some(TokenState::Invalid) | None => {
            return Err(meta_error(
                190,
                None,
                "OAuthException",
                "Invalid OAuth access token - Cannot parse access token",
            ));
        }
    }
    // source: M-SEC ("You add the result as an appsecret_proof parameter to each call"); the code
    // and message for a missing or wrong proof are UNCONFIRMED (100 is the likely one).
    if let Some(secret) = &d.app_secret {
        match p.appsecret_proof.as_deref() {
            None => {
                return Err(invalid_parameter(
                    None,
                    "API calls from the server require an appsecret_proof argument",
                ));
            }
            Some(proof) if proof != appsecret_proof(secret, token) => {
                return Err(invalid_parameter(
                    None,
                    "Invalid appsecret_proof provided in the API argument",
                ));
            }
            Some(_) => {}
        }
    }
    // observed, not documented (research meta.md Q2; RS-FB fixture): an unknown dataset, or one
    // the token cannot reach.
    if !d.pixels.contains(pixel) {
        return Err(meta_error(
            100,
            Some(33),
            "GraphMethodException",
            &format!(
                "Unsupported post request. Object with ID '{pixel}' does not exist, cannot be loaded due to missing permissions, or does not support this operation. Please read the Graph API documentation at https://developers.facebook.com/docs/graph-api"
            ),
        ));
    }
    Ok(())
}

/// The events of `data`: a JSON array, or a JSON-encoded string of one (form bodies).
fn events_of(data: Option<Value>) -> Result<Vec<Value>, Reply> {
    let data = match data {
        Some(Value::String(s)) => serde_json::from_str::<Value>(&s)
            .map_err(|_| invalid_parameter(None, "data must be a JSON-encoded array"))?,
        Some(v) => v,
        None => return Err(invalid_parameter(None, "The parameter data is required")),
    };
    let Value::Array(events) = data else {
        return Err(invalid_parameter(None, "data must be an array of events"));
    };
    // source: M-USE §Batch Requests (up to 1,000 events)
    if events.is_empty() || events.len() > 1000 {
        return Err(invalid_parameter(None, "data must hold 1 to 1000 events"));
    }
    Ok(events)
}

async fn events(
    State(s): State<FakeMeta>,
    Path((_version, pixel)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    let fault = {
        let mut d = lock(&s.data);
        d.requests += 1;
        let url_params =
            serde_urlencoded::from_str::<Vec<(String, String)>>(query.as_deref().unwrap_or(""))
                .unwrap_or_default();
        if url_params
            .iter()
            .any(|(k, _)| k == "access_token" || k == "appsecret_proof")
        {
            d.secrets_in_url += 1;
        }
        d.controls.next_fault(
            // source: M-ERR, meta-capi.md (80004 throttling, code 2 service down; both transient)
            || {
                (
                    400,
                    json!({"error": {"message": "(#80004) There have been too many calls", "type": "OAuthException", "code": 80004, "is_transient": true, "fbtrace_id": "FakeChaos"}}),
                )
            },
            || {
                (
                    500,
                    json!({"error": {"message": "An unexpected error has occurred.", "type": "OAuthException", "code": 2, "is_transient": true, "fbtrace_id": "FakeChaos"}}),
                )
            },
        )
    };
    let fault = match Fault::before(fault).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let strict = lock(&s.data).controls.strict;
    let Ok(query) =
        serde_urlencoded::from_str::<HashMap<String, String>>(query.as_deref().unwrap_or(""))
    else {
        return invalid_parameter(None, "the query string cannot be parsed");
    };
    let (p, transport) = match params(&query, &headers, &body, strict) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let n = {
        let mut d = lock(&s.data);
        if let Err(r) = check_access(&d, &p, &pixel) {
            return r;
        }
        let events = match events_of(p.data) {
            Ok(e) => e,
            Err(r) => return r,
        };
        let now = d.controls.clock.now();
        let cx = rules::Context {
            now: now.unix_secs(),
            strict: d.controls.strict,
            require_lead_id: d.require_lead_id,
            poison: &d.poison,
        };
        for (i, e) in events.iter().enumerate() {
            if let Err(r) = rules::check_event(e, &cx) {
                return meta_error(
                    r.code,
                    r.subcode,
                    "OAuthException",
                    &format!("(#{}) event {i}: {}", r.code, r.message),
                );
            }
        }
        d.batch_sizes.push(events.len());
        d.transports.push(transport);
        if let Some(code) = &p.test_event_code {
            // source: M-USE §Test Events: such events are still processed and counted.
            d.test_event_codes.push(code.clone());
        }
        let n = events.len();
        for event in events {
            d.received.push(Received {
                pixel: pixel.clone(),
                event,
                at: now,
                test_event_code: p.test_event_code.clone(),
            });
        }
        n
    };
    Fault::after(fault).await;
    // source: M-SDK-RESP (events_received counts events accepted, before dedup)
    (
        StatusCode::OK,
        Json(json!({"events_received": n, "messages": [], "fbtrace_id": "FakeTraceOk"})),
    )
}

/// What Meta's deduplication would leave of `received`: per (pixel, event_name, event_id), the
/// first receipt, and again a copy that arrives more than 48 h after the kept one. Events
/// without an event_id are never deduplicated by id.
// source: M-DEDUP (match on event_id and event_name within 48 h; the first one is kept). That two
// *server* copies dedup is UNCONFIRMED, which is why the raw record is kept beside this view.
fn deduplicate(received: &[Received]) -> Vec<Received> {
    let mut kept_at: HashMap<(String, String, String), i64> = HashMap::new();
    received
        .iter()
        .filter(|r| {
            let Some(id) = rules::event_id(&r.event) else {
                return true;
            };
            let name = r.event["event_name"].as_str().unwrap_or("").to_string();
            let key = (r.pixel.clone(), name, id);
            let at = r.at.unix_ms();
            match kept_at.get(&key) {
                Some(first) if at - first <= DEDUP_WINDOW_MS => false,
                _ => {
                    kept_at.insert(key, at);
                    true
                }
            }
        })
        .cloned()
        .collect()
}

fn purchases(events: Vec<Received>) -> Vec<(String, Value)> {
    events
        .into_iter()
        .filter(|r| r.event["event_name"] == "Purchase")
        .map(|r| (r.pixel, r.event))
        .collect()
}

/// Purchase value per currency. Meta does not net a custom Refund event against Purchase
/// revenue (no doc says it does; research meta.md Q4), so only Purchase counts.
fn revenue(purchases: &[(String, Value)]) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for (_, e) in purchases {
        let cd = &e["custom_data"];
        if let (Some(v), Some(c)) = (cd["value"].as_f64(), cd["currency"].as_str()) {
            // ISO 4217 codes; the SDK lowercases them (custom_data.py), so compare in one case.
            *m.entry(c.to_ascii_uppercase()).or_insert(0.0) += v;
        }
    }
    m
}

impl FakeMeta {
    /// Starts in strict mode, knowing `token` (valid) and the dataset `DEFAULT_PIXEL`.
    pub async fn start(token: &str) -> FakeMeta {
        Self::start_on("127.0.0.1:0", token).await
    }

    /// Serves on `addr` (the local stack uses a fixed port).
    pub async fn start_on(addr: &str, token: &str) -> FakeMeta {
        let mut data = Data::default();
        data.tokens.insert(token.to_string(), TokenState::Valid);
        let fake = FakeMeta {
            base_url: String::new(),
            token: token.into(),
            data: Arc::new(Mutex::new(data)),
        };
        let app = Router::new()
            .route("/{version}/{pixel}/events", post(events))
            .with_state(fake.clone());
        let base_url = super::serve_on(addr, app).await;
        FakeMeta { base_url, ..fake }
    }

    super::state_controls!();

    /// Whether strict mode refuses Conversion Leads events without a lead_id.
    pub fn set_require_lead_id(&self, required: bool) {
        self.with(|d| d.require_lead_id = required);
    }

    /// Requires `appsecret_proof` on every request, computed with `secret`.
    pub fn set_app_secret(&self, secret: Option<&str>) {
        self.with(|d| d.app_secret = secret.map(str::to_string));
    }

    pub fn add_pixel(&self, pixel: &str) {
        self.with(|d| d.pixels.insert(pixel.to_string()));
    }

    /// The dataset no longer exists for the token (100/33).
    pub fn remove_pixel(&self, pixel: &str) {
        self.with(|d| d.pixels.remove(pixel));
    }

    pub fn set_token_state(&self, token: &str, state: TokenState) {
        self.with(|d| d.tokens.insert(token.to_string(), state));
    }

    pub fn unpoison_all(&self) {
        self.with(|d| d.poison.clear());
    }

    pub fn poison(&self, event_id: &str) {
        self.with(|d| d.poison.insert(event_id.to_string()));
    }

    /// Every event received, raw, in order.
    pub fn received(&self) -> Vec<Received> {
        self.with(|d| d.received.clone())
    }

    /// Every event received, raw (all pixels and names), in order.
    pub fn accepted(&self) -> Vec<Value> {
        self.with(|d| d.received.iter().map(|r| r.event.clone()).collect())
    }

    /// Raw receipts per (event_name, event_id), all pixels together, with how often each came.
    /// An event without an id counts under the id "".
    pub fn distinct(&self) -> HashMap<(String, String), usize> {
        let mut m = HashMap::new();
        for r in self.received() {
            let k = (
                r.event["event_name"].as_str().unwrap_or("").to_string(),
                rules::event_id(&r.event).unwrap_or_default(),
            );
            *m.entry(k).or_insert(0) += 1;
        }
        m
    }

    /// What deduplication by (pixel, event_name, event_id) within 48 h leaves: (pixel, event).
    pub fn deduped(&self) -> Vec<(String, Value)> {
        deduplicate(&self.received())
            .into_iter()
            .map(|r| (r.pixel, r.event))
            .collect()
    }

    /// Every Purchase received: (pixel, event).
    pub fn purchases_raw(&self) -> Vec<(String, Value)> {
        purchases(self.received())
    }

    /// The Purchases deduplication leaves: (pixel, event).
    pub fn purchases_deduped(&self) -> Vec<(String, Value)> {
        purchases(deduplicate(&self.received()))
    }

    /// Purchase value per currency over every Purchase received.
    pub fn revenue_raw(&self) -> BTreeMap<String, f64> {
        revenue(&self.purchases_raw())
    }

    /// Purchase value per currency over the Purchases deduplication leaves.
    pub fn revenue_deduped(&self) -> BTreeMap<String, f64> {
        revenue(&self.purchases_deduped())
    }

    pub fn batch_sizes(&self) -> Vec<usize> {
        self.with(|d| d.batch_sizes.clone())
    }

    /// How each accepted request carried its parameters.
    pub fn transports(&self) -> Vec<Transport> {
        self.with(|d| d.transports.clone())
    }

    /// Requests whose URL carried the access token or the proof (see `Data::secrets_in_url`).
    pub fn secrets_in_url(&self) -> usize {
        self.with(|d| d.secrets_in_url)
    }

    pub fn test_event_codes(&self) -> Vec<String> {
        self.with(|d| d.test_event_codes.clone())
    }

    pub fn requests(&self) -> usize {
        self.with(|d| d.requests)
    }
}
