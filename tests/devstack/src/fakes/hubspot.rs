//! A fake of the HubSpot CRM objects API: contacts and deals by id (deals with their
//! associated contacts), a required private-app bearer token, and a log of requests.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct Data {
    pub contacts: HashMap<String, Value>,
    /// Deal properties and the associated contact id.
    pub deals: HashMap<String, (Value, Option<String>)>,
    pub requests: Vec<String>,
}

#[derive(Clone)]
pub struct FakeHubSpot {
    pub base_url: String,
    pub token: String,
    pub data: Arc<Mutex<Data>>,
}

#[derive(Clone)]
struct AppState {
    token: String,
    data: Arc<Mutex<Data>>,
}

fn authorized(h: &HeaderMap, token: &str) -> bool {
    h.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {token}"))
}

async fn contact(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    h: HeaderMap,
) -> (StatusCode, Json<Value>) {
    if !authorized(&h, &s.token) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"status": "error", "category": "INVALID_AUTHENTICATION"})),
        );
    }
    let mut d = s.data.lock().unwrap_or_else(|p| p.into_inner());
    d.requests.push(format!(
        "contact {id} properties={}",
        q.get("properties").cloned().unwrap_or_default()
    ));
    match d.contacts.get(&id) {
        Some(props) => (StatusCode::OK, Json(json!({"id": id, "properties": props}))),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"status": "error", "category": "OBJECT_NOT_FOUND"})),
        ),
    }
}

async fn deal(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    h: HeaderMap,
) -> (StatusCode, Json<Value>) {
    if !authorized(&h, &s.token) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"status": "error", "category": "INVALID_AUTHENTICATION"})),
        );
    }
    let mut d = s.data.lock().unwrap_or_else(|p| p.into_inner());
    d.requests.push(format!(
        "deal {id} associations={}",
        q.get("associations").cloned().unwrap_or_default()
    ));
    match d.deals.get(&id) {
        Some((props, contact)) => {
            let assoc = contact
                .iter()
                .map(|c| json!({"id": c, "type": "deal_to_contact"}))
                .collect::<Vec<_>>();
            (
                StatusCode::OK,
                Json(
                    json!({"id": id, "properties": props, "associations": {"contacts": {"results": assoc}}}),
                ),
            )
        }
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"status": "error", "category": "OBJECT_NOT_FOUND"})),
        ),
    }
}

impl FakeHubSpot {
    /// Serves on an ephemeral loopback port until the test process ends.
    pub async fn start(token: &str) -> FakeHubSpot {
        Self::start_on("127.0.0.1:0", token).await
    }

    /// Serves on `addr` until the process ends.
    pub async fn start_on(addr: &str, token: &str) -> FakeHubSpot {
        let data = Arc::new(Mutex::new(Data::default()));
        let state = AppState {
            token: token.to_string(),
            data: data.clone(),
        };
        let app = Router::new()
            .route("/crm/v3/objects/contacts/{id}", get(contact))
            .route("/crm/v3/objects/deals/{id}", get(deal))
            .with_state(state);
        let base_url = super::serve_on(addr, app).await;
        FakeHubSpot {
            base_url,
            token: token.to_string(),
            data,
        }
    }

    pub fn requests(&self) -> Vec<String> {
        self.data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .requests
            .clone()
    }
}
