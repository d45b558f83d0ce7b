//! A fake of the HubSpot CRM objects API: contacts and deals by id (deals with their
//! associated contact), each property's history (`propertiesWithHistory`), the deal and contact
//! searches (filters, paging, their limits), batch reads (archived deals; contacts with their
//! histories), a required private-app bearer token, injected 429s, and a log of requests. Rules and shapes from crm-apis.md: HS-DEALS / HS-BASIC (GET by id, history
//! entries `{value, timestamp (ISO), sourceType}`), HS-SEARCH (search), HS-ERR (error body),
//! HS-USAGE / HS-REC (429 `RATE_LIMIT` body).

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bridge_core::timestamp::Timestamp;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// The sample records behind `events/webhooks/hubspot-*.json`: contact 101 (Ada) and deal 9001
/// won for 1,200.50 GBP, the one place the local stack and the tests seed them.
pub const SAMPLE_CONTACT: &str = "101";
pub const SAMPLE_DEAL: &str = "9001";

#[derive(Default)]
pub struct Data {
    pub contacts: HashMap<String, Value>,
    /// Deal properties and the associated contact id.
    pub deals: HashMap<String, (Value, Option<String>)>,
    /// (object type, id, property) -> every value it had, with when (Unix ms).
    pub history: HashMap<(String, String, String), Vec<(String, i64)>>,
    pub requests: Vec<String>,
    /// Deleted (archived) deals: GET answers 404 and the search never lists them (HS-SEARCH).
    pub archived: std::collections::HashSet<String>,
    /// The next this many reads answer 429, with this Retry-After (seconds) when set.
    pub throttle: usize,
    pub retry_after: Option<u64>,
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

fn error(status: StatusCode, category: &str, message: &str) -> Response {
    // source: HS-ERR {status: "error", message, correlationId, category}
    (
        status,
        Json(
            json!({"status": "error", "message": message, "correlationId": "fake-correlation",
                    "category": category}),
        ),
    )
        .into_response()
}

/// The checks every read shares: the token, then an injected throttle.
fn gate(d: &mut Data, h: &HeaderMap, token: &str) -> Option<Response> {
    if !authorized(h, token) {
        return Some(error(
            StatusCode::UNAUTHORIZED,
            "INVALID_AUTHENTICATION",
            "Authentication credentials not found.",
        ));
    }
    if d.throttle > 0 {
        d.throttle -= 1;
        // source: HS-USAGE / HS-REC (429 body; HubSpot's own 429s may omit Retry-After)
        let mut r = (
            StatusCode::TOO_MANY_REQUESTS,
            Json(
                json!({"status": "error", "message": "You have reached your secondly limit.",
                        "errorType": "RATE_LIMIT", "correlationId": "fake-correlation",
                        "policyName": "TEN_SECONDLY_ROLLING"}),
            ),
        )
            .into_response();
        if let Some(secs) = d.retry_after
            && let Ok(v) = secs.to_string().parse()
        {
            r.headers_mut().insert("retry-after", v);
        }
        return Some(r);
    }
    None
}

/// Opens a read: the data locked, `gate`'s checks passed, and the request recorded as `line`.
/// The error is the handler's answer, returned as is (hence its size).
#[allow(clippy::result_large_err)]
fn open<'a>(
    s: &'a AppState,
    h: &HeaderMap,
    line: String,
) -> Result<MutexGuard<'a, Data>, Response> {
    let mut d = s.data.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = gate(&mut d, h, &s.token) {
        return Err(r);
    }
    d.requests.push(line);
    Ok(d)
}

/// A single-object read's answer: the object with the `propertiesWithHistory` asked for, or
/// HubSpot's 404.
fn single(
    d: &Data,
    kind: &str,
    id: &str,
    q: &HashMap<String, String>,
    body: Option<Value>,
) -> Response {
    match body {
        Some(mut body) => {
            if q.contains_key("propertiesWithHistory") {
                body["propertiesWithHistory"] =
                    histories(d, kind, id, q.get("propertiesWithHistory"));
            }
            (StatusCode::OK, Json(body)).into_response()
        }
        None => not_found(),
    }
}

/// `propertiesWithHistory` for the properties asked, newest first.
fn histories(d: &Data, kind: &str, id: &str, wanted: Option<&String>) -> Value {
    let mut out = Map::new();
    for p in wanted.into_iter().flat_map(|w| w.split(',')) {
        let mut h = d
            .history
            .get(&(kind.to_string(), id.to_string(), p.to_string()))
            .cloned()
            .unwrap_or_default();
        h.sort_by_key(|b| std::cmp::Reverse(b.1));
        let entries: Vec<Value> = h
            .into_iter()
            .map(|(value, at)| {
                json!({"value": value, "timestamp": Timestamp::from_unix_ms(at).canonical(),
                       "sourceType": "CRM_UI", "updatedByUserId": 1})
            })
            .collect();
        out.insert(p.to_string(), Value::Array(entries));
    }
    Value::Object(out)
}

/// The object types this fake holds, as HubSpot's paths name them.
const OBJECTS: [&str; 2] = ["contacts", "deals"];

/// HubSpot's answer for an object or record it does not have.
fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "OBJECT_NOT_FOUND",
        "resource not found",
    )
}

/// `GET /crm/v3/objects/{contacts|deals}/{id}`: a contact with its properties, or a deal with
/// its associated contact; archived deals answer 404.
async fn record(
    State(s): State<AppState>,
    Path((object, id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    h: HeaderMap,
) -> Response {
    let asked = |k: &str| q.get(k).cloned().unwrap_or_default();
    let history = asked("propertiesWithHistory");
    let (kind, line) = match object.as_str() {
        "contacts" => (
            "contact",
            format!(
                "contact {id} properties={} history={history}",
                asked("properties")
            ),
        ),
        "deals" => (
            "deal",
            format!(
                "deal {id} associations={} history={history}",
                asked("associations")
            ),
        ),
        _ => return not_found(),
    };
    let d = match open(&s, &h, line) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let body = if kind == "contact" {
        d.contacts
            .get(&id)
            .map(|props| json!({"id": id, "properties": props, "archived": false}))
    } else {
        d.deals
            .get(&id)
            .filter(|_| !d.archived.contains(&id))
            .map(|(props, contact)| {
                let assoc = contact
                    .iter()
                    .map(|c| json!({"id": c, "type": "deal_to_contact"}))
                    .collect::<Vec<_>>();
                json!({"id": id, "properties": props, "archived": false,
                       "associations": {"contacts": {"results": assoc}}})
            })
    };
    single(&d, kind, &id, &q, body)
}

/// One search filter against one deal's properties. source: HS-SEARCH (enumeration properties
/// such as `dealstage` match case-sensitively; date filters take epoch-ms strings, `BETWEEN`
/// includes both ends).
fn matches(props: &Value, f: &Value) -> Result<bool, String> {
    let name = f["propertyName"]
        .as_str()
        .ok_or("a filter needs propertyName")?;
    let value = props[name].as_str();
    // Dates are ISO in responses and epoch ms in filters.
    let as_ms = |v: &str| {
        v.parse::<i64>()
            .ok()
            .or_else(|| Timestamp::parse_rfc3339(v).ok().map(|t| t.unix_ms()))
    };
    let bound = |k: &str| -> Result<i64, String> {
        f[k].as_str()
            .and_then(as_ms)
            .ok_or_else(|| format!("{name}: {k} must be an epoch-ms string"))
    };
    Ok(match f["operator"].as_str().unwrap_or("") {
        "IN" => {
            let values = f["values"].as_array().ok_or("IN needs values")?;
            value.is_some_and(|v| values.iter().any(|x| x.as_str() == Some(v)))
        }
        "EQ" => value.is_some() && value == f["value"].as_str(),
        "BETWEEN" => {
            let (lo, hi) = (bound("value")?, bound("highValue")?);
            value.and_then(as_ms).is_some_and(|v| lo <= v && v <= hi)
        }
        "GTE" => {
            let b = bound("value")?;
            value.and_then(as_ms).is_some_and(|v| v >= b)
        }
        "LT" => {
            let b = bound("value")?;
            value.and_then(as_ms).is_some_and(|v| v < b)
        }
        "HAS_PROPERTY" => value.is_some(),
        other => return Err(format!("operator {other} is not supported by this fake")),
    })
}

async fn search_objects(
    s: State<AppState>,
    Path(object): Path<String>,
    h: HeaderMap,
    body: Json<Value>,
) -> Response {
    match OBJECTS.iter().find(|o| **o == object) {
        Some(o) => search(s, h, body, o),
        None => not_found(),
    }
}

/// `POST /crm/v3/objects/{deals|contacts}/search`. source: HS-SEARCH (at most 5 filter groups
/// of 6 filters and 18 in all, one sort, `limit` at most 200, `after` an offset string, at most
/// 10,000 results per query and 400 past them, archived records never listed; contacts carry
/// `lastmodifieddate`, deals `hs_lastmodifieddate`).
fn search(
    State(s): State<AppState>,
    h: HeaderMap,
    Json(body): Json<Value>,
    object: &str,
) -> Response {
    let line = format!(
        "search {object} after={}",
        body["after"].as_str().unwrap_or("")
    );
    let d = match open(&s, &h, line) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let invalid = |m: &str| error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR", m);
    let groups = body["filterGroups"].as_array().cloned().unwrap_or_default();
    let filters: usize = groups
        .iter()
        .map(|g| g["filters"].as_array().map_or(0, Vec::len))
        .sum();
    if groups.len() > 5
        || groups
            .iter()
            .any(|g| g["filters"].as_array().is_some_and(|f| f.len() > 6))
        || filters > 18
    {
        return invalid("at most 5 filterGroups of 6 filters, 18 filters in all");
    }
    if body["sorts"].as_array().is_some_and(|v| v.len() > 1) {
        return invalid("only one sort is allowed");
    }
    let limit = body["limit"].as_u64().unwrap_or(10);
    if limit > 200 {
        return invalid("limit must be at most 200");
    }
    let after: u64 = match body["after"].as_str().map(str::parse) {
        None => 0,
        Some(Ok(a)) => a,
        Some(Err(_)) => return invalid("after must be an integer offset"),
    };
    let props_of = |id: &String| -> &Value {
        if object == "deals" {
            &d.deals[id].0
        } else {
            &d.contacts[id]
        }
    };
    let mut hits = Vec::new();
    let mut ids: Vec<&String> = if object == "deals" {
        d.deals
            .keys()
            .filter(|id| !d.archived.contains(*id))
            .collect()
    } else {
        d.contacts.keys().collect()
    };
    ids.sort_by_key(|id| (id.len(), id.to_string()));
    for id in ids {
        let props = props_of(id);
        let mut any = groups.is_empty();
        for g in &groups {
            let mut all = true;
            for f in g["filters"].as_array().into_iter().flatten() {
                match matches(props, f) {
                    Ok(m) => all &= m,
                    Err(e) => return invalid(&e),
                }
            }
            any |= all;
        }
        if any {
            hits.push(id.clone());
        }
    }
    let total = hits.len() as u64;
    if after >= 10_000 {
        return invalid("paging is limited to 10,000 results; narrow the query");
    }
    let wanted: Vec<String> = body["properties"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|p| p.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let results: Vec<Value> = hits
        .iter()
        .skip(after as usize)
        .take(limit as usize)
        .map(|id| {
            let props = props_of(id);
            let mut out = Map::new();
            out.insert("hs_object_id".into(), json!(id));
            for p in &wanted {
                // The search lists unset properties as null (HS-REC).
                out.insert(p.clone(), props.get(p).cloned().unwrap_or(Value::Null));
            }
            json!({"id": id, "properties": out, "archived": false})
        })
        .collect();
    let mut reply = json!({"total": total, "results": results});
    if after + limit < total {
        reply["paging"] = json!({"next": {"after": (after + limit).to_string()}});
    }
    (StatusCode::OK, Json(reply)).into_response()
}

async fn batch_read_objects(
    s: State<AppState>,
    Path(object): Path<String>,
    q: Query<HashMap<String, String>>,
    h: HeaderMap,
    body: Json<Value>,
) -> Response {
    match OBJECTS.iter().find(|o| **o == object) {
        Some(o) => batch_read(s, q, h, body, o),
        None => not_found(),
    }
}

/// `POST /crm/v3/objects/{deals|contacts}/batch/read[?archived=true]`. source: crm-apis.md
/// "Batch reads and associations" (body `properties`, `propertiesWithHistory`, at most 100
/// `inputs`; `?archived=true` is accepted; 200, or 207 with `errors` for partial failure),
/// HS-SEARCH / HS-BASIC (with `archived=true` only archived records come back, with `archived`
/// and `archivedAt`). The fake keeps no archived contacts.
fn batch_read(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
    h: HeaderMap,
    Json(body): Json<Value>,
    object: &str,
) -> Response {
    let archived = q.get("archived").map(String::as_str) == Some("true");
    let d = match open(&s, &h, format!("batch read {object} archived={archived}")) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let list = |k: &str| -> Vec<String> {
        body[k]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str().map(String::from))
            .collect()
    };
    let (wanted, with_history) = (list("properties"), list("propertiesWithHistory").join(","));
    let inputs: Vec<String> = body["inputs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["id"].as_str().map(String::from))
        .collect();
    if inputs.len() > 100 {
        return error(
            StatusCode::BAD_REQUEST,
            "VALIDATION_ERROR",
            "at most 100 inputs per batch",
        );
    }
    let mut results = Vec::new();
    let mut missing = Vec::new();
    for id in &inputs {
        let props = if object == "deals" {
            d.deals
                .get(id)
                .filter(|_| d.archived.contains(id) == archived)
                .map(|x| &x.0)
        } else {
            d.contacts.get(id).filter(|_| !archived)
        };
        let Some(props) = props else {
            missing.push(id.clone());
            continue;
        };
        let mut out = Map::new();
        out.insert("hs_object_id".into(), json!(id));
        for p in &wanted {
            if let Some(v) = props.get(p) {
                out.insert(p.clone(), v.clone());
            }
        }
        let mut r = json!({"id": id, "properties": out, "archived": archived});
        if archived {
            r["archivedAt"] = json!(Timestamp::now().canonical());
        }
        if !with_history.is_empty() {
            let kind = object.trim_end_matches('s');
            r["propertiesWithHistory"] = histories(&d, kind, id, Some(&with_history));
        }
        results.push(r);
    }
    let mut reply = json!({"status": "COMPLETE", "results": results});
    if missing.is_empty() {
        return (StatusCode::OK, Json(reply)).into_response();
    }
    reply["errors"] = json!([{"status": "error", "category": "OBJECT_NOT_FOUND",
        "message": format!("Could not get some {} objects, they may be deleted or not exist.",
            object.trim_end_matches('s').to_uppercase()),
        "context": {"ids": missing}}]);
    (StatusCode::MULTI_STATUS, Json(reply)).into_response()
}

/// Test control (not HubSpot's API): record property changes, as a person editing the CRM
/// would, so the stack's own tools (`bridge-local post-samples`) can seed the fake.
async fn changes(State(s): State<AppState>, Json(body): Json<Vec<Value>>) -> StatusCode {
    let mut d = s.data.lock().unwrap_or_else(|p| p.into_inner());
    for c in body {
        let (Some(kind), Some(id), Some(prop), Some(value), Some(at)) = (
            c["kind"].as_str(),
            c["id"].as_str(),
            c["property"].as_str(),
            c["value"].as_str(),
            c["at_ms"].as_i64(),
        ) else {
            return StatusCode::BAD_REQUEST;
        };
        record_change(&mut d, kind, id, prop, value, at);
    }
    StatusCode::NO_CONTENT
}

fn record_change(d: &mut Data, kind: &str, id: &str, prop: &str, value: &str, at_ms: i64) {
    let (props, modified) = match kind {
        "deal" => (
            &mut d.deals.entry(id.to_string()).or_insert((json!({}), None)).0,
            "hs_lastmodifieddate",
        ),
        _ => (
            d.contacts.entry(id.to_string()).or_insert(json!({})),
            "lastmodifieddate",
        ),
    };
    props[prop] = json!(value);
    // Every change moves the record's last-modified date. source: HS-SEARCH
    let newer = props[modified]
        .as_str()
        .and_then(|t| Timestamp::parse_rfc3339(t).ok())
        .is_none_or(|t| t.unix_ms() < at_ms);
    if newer {
        props[modified] = json!(Timestamp::from_unix_ms(at_ms).canonical());
    }
    d.history
        .entry((kind.to_string(), id.to_string(), prop.to_string()))
        .or_default()
        .push((value.to_string(), at_ms));
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
            .route("/crm/v3/objects/{object}/{id}", get(record))
            .route("/crm/v3/objects/{object}/search", post(search_objects))
            .route(
                "/crm/v3/objects/{object}/batch/read",
                post(batch_read_objects),
            )
            .route("/_fake/changes", post(changes))
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

    /// A property change made in the CRM at `at_ms`: the record's value and its history.
    pub fn change(&self, kind: &str, id: &str, prop: &str, value: &str, at_ms: i64) {
        let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        record_change(&mut d, kind, id, prop, value, at_ms);
    }

    /// Seeds the sample records (contact 101, deal 9001 won and closed at `at_ms`, its
    /// contact's MQL stage at `at_ms`), as `events/webhooks/hubspot-delivery.json` expects them.
    pub fn seed_samples(&self, at_ms: i64) {
        {
            let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
            d.contacts.insert(
                SAMPLE_CONTACT.into(),
                json!({"email": "Ada@Example.com", "firstname": "Ada", "lastname": "Lovelace",
                       "phone": "+44 20 7946 0958", "hs_google_click_id": "Cj0KCQ-ada",
                       "ads_consent_status": "granted", "hs_legal_basis": "Freely given consent"}),
            );
            d.deals.insert(
                SAMPLE_DEAL.into(),
                (
                    json!({"amount": "1200.50", "deal_currency_code": "GBP"}),
                    Some(SAMPLE_CONTACT.into()),
                ),
            );
        }
        self.change(
            "deal",
            SAMPLE_DEAL,
            "dealstage",
            "appointmentscheduled",
            at_ms - 86_400_000,
        );
        self.change(
            "deal",
            SAMPLE_DEAL,
            "closedate",
            &Timestamp::from_unix_ms(at_ms).canonical(),
            at_ms,
        );
        self.change("deal", SAMPLE_DEAL, "dealstage", "closedwon", at_ms);
        self.change(
            "contact",
            SAMPLE_CONTACT,
            "lifecyclestage",
            "marketingqualifiedlead",
            at_ms,
        );
    }

    /// A deal of the sample contact won (and closed) at `at_ms` for `amount` in `currency`, as a
    /// person closing it in HubSpot would record it.
    pub fn won_deal(&self, id: &str, amount: &str, currency: &str, at_ms: i64) {
        self.change("deal", id, "amount", amount, at_ms);
        self.change("deal", id, "deal_currency_code", currency, at_ms);
        self.change(
            "deal",
            id,
            "closedate",
            &Timestamp::from_unix_ms(at_ms).canonical(),
            at_ms,
        );
        self.change("deal", id, "dealstage", "closedwon", at_ms);
        let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(deal) = d.deals.get_mut(id) {
            deal.1 = Some(SAMPLE_CONTACT.into());
        }
    }

    /// The next `n` reads answer 429 (with `retry_after` seconds when given).
    pub fn throttle(&self, n: usize, retry_after: Option<u64>) {
        let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        d.throttle = n;
        d.retry_after = retry_after;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn search_deals(fake: &FakeHubSpot, body: Value) -> (u16, Value) {
        let http = bridge_platforms::http::client().unwrap();
        let r = http
            .post(format!("{}/crm/v3/objects/deals/search", fake.base_url))
            .bearer_auth(&fake.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    fn won_in(stages: Value) -> Value {
        json!({"filterGroups": [{"filters": [
            {"propertyName": "dealstage", "operator": "IN", "values": stages},
            {"propertyName": "closedate", "operator": "BETWEEN", "value": "0", "highValue": "4102444800000"}]}],
            "properties": ["amount"], "limit": 2})
    }

    #[tokio::test]
    async fn the_deal_search_filters_pages_and_enforces_its_limits() {
        let fake = FakeHubSpot::start("t").await;
        for (id, stage) in [
            ("1", "closedwon"),
            ("2", "closedwon"),
            ("3", "closedwon"),
            ("4", "closedlost"),
        ] {
            fake.change("deal", id, "amount", "10", 1_000);
            fake.change("deal", id, "closedate", "2026-11-01T00:00:00.000Z", 1_000);
            fake.change("deal", id, "dealstage", stage, 1_000);
        }
        fake.data.lock().unwrap().archived.insert("3".into());
        // Enumeration values match case-sensitively; archived deals are never listed.
        let (s, b) = search_deals(&fake, won_in(json!(["ClosedWon"]))).await;
        assert_eq!((s, b["total"].clone()), (200, json!(0)));
        let (s, b) = search_deals(&fake, won_in(json!(["closedwon"]))).await;
        assert_eq!((s, b["total"].clone()), (200, json!(2)), "{b}");
        assert!(b["paging"].is_null(), "two results fit one page of 2: {b}");
        let mut one = won_in(json!(["closedwon"]));
        one["limit"] = json!(1);
        let (_, b) = search_deals(&fake, one.clone()).await;
        assert_eq!(b["results"][0]["id"], "1");
        assert_eq!(b["paging"]["next"]["after"], "1");
        one["after"] = json!("1");
        let (_, b) = search_deals(&fake, one.clone()).await;
        assert_eq!(b["results"][0]["id"], "2");
        assert!(b["paging"].is_null());
        // The documented limits: 200 a page, 10,000 a query.
        one["limit"] = json!(201);
        assert_eq!(search_deals(&fake, one.clone()).await.0, 400);
        one["limit"] = json!(100);
        one["after"] = json!("10000");
        let (s, b) = search_deals(&fake, one).await;
        assert_eq!((s, b["category"].as_str()), (400, Some("VALIDATION_ERROR")));
    }

    /// The HubSpot client's funnel reads against this fake: the contacts search by
    /// `lastmodifieddate` over more than one page, and the batch read with the
    /// `lifecyclestage` history, 50 ids a request.
    #[tokio::test]
    async fn contacts_modified_since_and_their_lifecycle_histories() {
        use bridge_core::crm_check::HubSpotSearch;
        let fake = FakeHubSpot::start("t").await;
        let t = 1_764_000_000_000i64;
        for i in 0..260 {
            let id = (1000 + i).to_string();
            fake.change("contact", &id, "lifecyclestage", "lead", t - 86_400_000);
            if i % 2 == 0 {
                fake.change(
                    "contact",
                    &id,
                    "lifecyclestage",
                    "marketingqualifiedlead",
                    t + i,
                );
            }
        }
        let client = bridge_platforms::hubspot::HubSpotClient::new(
            bridge_platforms::http::client().unwrap(),
            &fake.base_url,
            "t",
        );
        let ids = client
            .contacts_modified(Timestamp::from_unix_ms(t))
            .await
            .unwrap();
        assert_eq!(ids.len(), 130, "only the contacts changed since t");
        let searches = fake
            .requests()
            .iter()
            .filter(|r| r.starts_with("search contacts"))
            .count();
        assert_eq!(searches, 1, "130 results fit one page of 200");
        let histories = client.lifecycle_histories(&ids).await.unwrap();
        assert_eq!(histories.len(), 130);
        let h = &histories["1002"];
        assert_eq!(h.len(), 2, "{h:?}");
        assert!(
            h.iter()
                .any(|e| e.value == "marketingqualifiedlead"
                    && e.at == Timestamp::from_unix_ms(t + 2))
        );
        let reads = fake
            .requests()
            .iter()
            .filter(|r| r.starts_with("batch read contacts"))
            .count();
        assert_eq!(reads, 3, "50 ids a read");
        // Over one page: every contact, each once.
        let all = client
            .contacts_modified(Timestamp::from_unix_ms(t - 86_400_000))
            .await
            .unwrap();
        assert_eq!(all.len(), 260);
    }
}
