//! A strict fake of the Graph API's Conversions API endpoint, enforcing the rules of the
//! reference (batch size, whole-request failure on any invalid event, the 7-day window,
//! action_source values, website fields, 64-hex hashes, access token), answering in Meta's
//! response and error shapes, recording what it accepts, and injecting faults on demand.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone)]
pub enum Fault {
    /// Answer with this status and body instead of processing.
    Respond(u16, Value),
    /// Process normally after a delay.
    Slow(Duration),
    /// Accept and record the events, then answer only after this delay (past the client's timeout).
    AcceptThenTimeout(Duration),
    /// Accept and record the events, then run the callback (which kills the sender) before answering.
    AcceptThenCrash(std::sync::Arc<dyn Fn() + Send + Sync>),
}

#[derive(Default)]
pub struct Data {
    pub faults: VecDeque<Fault>,
    /// Every accepted event: (pixel, event).
    pub accepted: Vec<(String, Value)>,
    pub requests: usize,
    pub batch_sizes: Vec<usize>,
    /// Event ids the fake treats as invalid (a whole-request 400, as Meta does).
    pub poison: HashSet<String>,
    pub test_event_codes: Vec<String>,
    pub chaos: Option<super::Chaos>,
}

#[derive(Clone)]
pub struct FakeMeta {
    pub base_url: String,
    pub token: String,
    pub data: Arc<Mutex<Data>>,
}

const ACTION_SOURCES: &[&str] = &[
    "email",
    "website",
    "app",
    "phone_call",
    "chat",
    "physical_store",
    "system_generated",
    "business_messaging",
    "other",
];
const HASHED: &[&str] = &[
    "em",
    "ph",
    "fn",
    "ln",
    "ge",
    "db",
    "ct",
    "st",
    "zp",
    "country",
    "external_id",
];

fn meta_error(code: i64, subcode: Option<i64>, message: &str) -> (StatusCode, Json<Value>) {
    let mut e = json!({"message": message, "type": "OAuthException", "code": code, "fbtrace_id": "FakeTrace", "is_transient": false});
    if let Some(s) = subcode {
        e["error_subcode"] = json!(s);
    }
    (StatusCode::BAD_REQUEST, Json(json!({"error": e})))
}

fn is_hash(v: &Value) -> bool {
    let one = |s: &Value| {
        s.as_str().is_some_and(|s| {
            s.len() == 64
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
    };
    match v {
        Value::Array(a) => !a.is_empty() && a.iter().all(one),
        other => one(other),
    }
}

fn check_event(
    e: &Value,
    now: i64,
    poison: &HashSet<String>,
) -> Result<(), (i64, Option<i64>, String)> {
    let invalid = |m: &str| Err((100, None, m.to_string()));
    let Some(name) = e["event_name"].as_str().filter(|s| !s.is_empty()) else {
        return invalid("event_name is required");
    };
    let Some(t) = e["event_time"].as_i64() else {
        return invalid("event_time must be an integer");
    };
    let Some(source) = e["action_source"].as_str() else {
        return invalid("action_source is required");
    };
    if !ACTION_SOURCES.contains(&source) {
        return invalid("invalid action_source");
    }
    let window = if source == "physical_store" { 62 } else { 7 } * 86_400;
    if now - t > window {
        return Err((
            100,
            Some(2804003),
            "event_time is too far in the past".into(),
        ));
    }
    if t > now + 60 {
        return Err((100, Some(2804004), "event_time is in the future".into()));
    }
    let Some(ud) = e["user_data"].as_object().filter(|u| !u.is_empty()) else {
        return invalid("user_data is required");
    };
    for (k, v) in ud {
        if HASHED.contains(&k.as_str()) && !is_hash(v) {
            return invalid(&format!("user_data.{k} must be SHA-256 hashed"));
        }
    }
    if source == "website"
        && (ud.get("client_user_agent").is_none() || e.get("event_source_url").is_none())
    {
        return invalid("website events need client_user_agent and event_source_url");
    }
    if name == "Purchase"
        && (e["custom_data"]["value"].as_f64().is_none()
            || e["custom_data"]["currency"].as_str().is_none())
    {
        return invalid("Purchase needs value and currency");
    }
    if e["event_id"].as_str().is_some_and(|id| poison.contains(id)) {
        return invalid("invalid parameter");
    }
    Ok(())
}

async fn events(
    State(s): State<FakeMeta>,
    Path((_version, pixel)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> (StatusCode, Json<Value>) {
    let fault = {
        let mut d = s.data.lock().unwrap_or_else(|p| p.into_inner());
        d.requests += 1;
        let chaos = d.chaos.clone();
        d.faults.pop_front().or_else(|| {
            let c = chaos?;
            Some(match c.roll()? {
                super::ChaosKind::Throttled => Fault::Respond(400, json!({"error": {"message": "(#80004) There have been too many calls", "type": "OAuthException", "code": 80004, "is_transient": true, "fbtrace_id": "FakeChaos"}})),
                super::ChaosKind::ServerError => Fault::Respond(500, json!({"error": {"message": "An unexpected error has occurred.", "type": "OAuthException", "code": 2, "is_transient": true, "fbtrace_id": "FakeChaos"}})),
                super::ChaosKind::Slow => Fault::Slow(c.hold),
                super::ChaosKind::AcceptThenTimeout => Fault::AcceptThenTimeout(c.hold),
                super::ChaosKind::AcceptThenCrash => Fault::AcceptThenCrash(c.crash?),
            })
        })
    };
    match &fault {
        Some(Fault::Respond(status, body)) => {
            return (
                StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                Json(body.clone()),
            );
        }
        Some(Fault::Slow(d)) => tokio::time::sleep(*d).await,
        _ => {}
    }
    if q.get("access_token") != Some(&s.token) {
        return meta_error(
            190,
            None,
            "Invalid OAuth access token - Cannot parse access token",
        );
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return meta_error(100, None, "invalid JSON");
    };
    let Some(data) = v["data"].as_array() else {
        return meta_error(100, None, "data is required");
    };
    if data.is_empty() || data.len() > 1000 {
        return meta_error(100, None, "data must hold 1 to 1000 events");
    }
    let now = bridge_core::timestamp::Timestamp::now().unix_secs();
    {
        let d = s.data.lock().unwrap_or_else(|p| p.into_inner());
        for (i, e) in data.iter().enumerate() {
            if let Err((code, sub, m)) = check_event(e, now, &d.poison) {
                return meta_error(code, sub, &format!("event {i}: {m}"));
            }
        }
    }
    {
        let mut d = s.data.lock().unwrap_or_else(|p| p.into_inner());
        d.batch_sizes.push(data.len());
        d.accepted
            .extend(data.iter().map(|e| (pixel.clone(), e.clone())));
        if let Some(code) = v["test_event_code"].as_str() {
            d.test_event_codes.push(code.to_string());
        }
    }
    match fault {
        Some(Fault::AcceptThenTimeout(d)) => tokio::time::sleep(d).await,
        Some(Fault::AcceptThenCrash(crash)) => {
            crash();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        _ => {}
    }
    (
        StatusCode::OK,
        Json(json!({"events_received": data.len(), "messages": [], "fbtrace_id": "FakeTraceOk"})),
    )
}

impl FakeMeta {
    pub async fn start(token: &str) -> FakeMeta {
        Self::start_on("127.0.0.1:0", token).await
    }

    /// Serves on `addr` (the local stack uses a fixed port).
    pub async fn start_on(addr: &str, token: &str) -> FakeMeta {
        let fake = FakeMeta {
            base_url: String::new(),
            token: token.into(),
            data: Arc::new(Mutex::new(Data::default())),
        };
        let app = Router::new()
            .route("/{version}/{pixel}/events", post(events))
            .with_state(fake.clone());
        let base_url = super::serve_on(addr, app).await;
        FakeMeta { base_url, ..fake }
    }

    pub fn inject(&self, f: Fault) {
        self.data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .faults
            .push_back(f);
    }

    pub fn set_chaos(&self, chaos: Option<super::Chaos>) {
        self.data.lock().unwrap_or_else(|p| p.into_inner()).chaos = chaos;
    }

    pub fn unpoison_all(&self) {
        self.data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .poison
            .clear();
    }

    pub fn poison(&self, event_id: &str) {
        self.data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .poison
            .insert(event_id.to_string());
    }

    /// Accepted events by Meta's dedupe key (event_name, event_id), with how often each came.
    pub fn distinct(&self) -> HashMap<(String, String), usize> {
        let d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let mut m = HashMap::new();
        for (_, e) in &d.accepted {
            let k = (
                e["event_name"].as_str().unwrap_or("").to_string(),
                e["event_id"].as_str().unwrap_or("").to_string(),
            );
            *m.entry(k).or_insert(0) += 1;
        }
        m
    }

    pub fn accepted(&self) -> Vec<Value> {
        self.data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .accepted
            .iter()
            .map(|(_, e)| e.clone())
            .collect()
    }

    pub fn batch_sizes(&self) -> Vec<usize> {
        self.data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .batch_sizes
            .clone()
    }

    pub fn test_event_codes(&self) -> Vec<String> {
        self.data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .test_event_codes
            .clone()
    }

    pub fn requests(&self) -> usize {
        self.data.lock().unwrap_or_else(|p| p.into_inner()).requests
    }
}
