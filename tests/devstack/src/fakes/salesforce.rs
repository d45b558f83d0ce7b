//! A fake of the Salesforce REST API as reconciliation uses it: the OAuth 2.0 client
//! credentials token endpoint, and SOQL `query` / `queryAll` over opportunities, their stage
//! history and their contact roles, and leads with their field history (`LeadHistory`, written
//! for `Status` only while field history tracking is on for it), with paging by `nextRecordsUrl`, the org's API usage in
//! `Sforce-Limit-Info`, and the error shapes and codes Salesforce documents. The SOQL it reads
//! is the subset the bridge writes (SELECT fields FROM object WHERE conditions joined by AND,
//! ORDER BY), held to Salesforce's rules: field names unquoted, string values in single quotes
//! (double quotes are an error), dates and dateTimes unquoted and only against fields of their
//! type, string comparisons case-insensitive. Rules and shapes from crm-apis.md: SF-CC (token),
//! SF-QUERY / SF-QOPT / SF-CURSOR (paging), SF-QALL (queryAll), SF-LIMIT (usage header), SF-ERR
//! (error body and codes), SF-DATE / SF-OPP / SF-CUR (fields), SF-HIST (OpportunityHistory);
//! the Object Reference's LeadHistory (`Field` a filterable picklist, `OldValue` / `NewValue`
//! anyType and not filterable) and Lead field reference;
//! the SOQL comparison operators page (case-insensitive strings) and fieldExpression syntax
//! (quotes).

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bridge_core::timestamp::Timestamp;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// An opportunity: what the fake's queries read.
#[derive(Clone, Debug)]
pub struct Opportunity {
    pub stage: String,
    pub amount: Option<f64>,
    pub currency: String,
    /// `YYYY-MM-DD`.
    pub close_date: String,
    pub is_deleted: bool,
    /// The primary contact: (Email, Phone, FirstName, LastName).
    pub contact: Option<[Option<String>; 4]>,
}

/// A lead: what the fake's queries read.
#[derive(Clone, Debug, Default)]
pub struct Lead {
    pub status: String,
    pub created_ms: i64,
    pub email: Option<String>,
    pub is_deleted: bool,
}

/// A LeadHistory row: lead id, field, old value, new value, created at in Unix ms.
pub type LeadHistoryRow = (String, String, Option<String>, Option<String>, i64);

pub struct Data {
    pub leads: HashMap<String, Lead>,
    pub lead_history: Vec<LeadHistoryRow>,
    /// Field history tracking on `Lead.Status`: off, a status change writes no row.
    pub lead_status_tracked: bool,
    pub client_id: String,
    pub client_secret: String,
    pub opportunities: HashMap<String, Opportunity>,
    /// OpportunityHistory rows: (opportunity id, stage, created at in Unix ms).
    pub history: Vec<(String, String, i64)>,
    /// Access tokens the fake issued and still honours.
    pub tokens: Vec<String>,
    /// A multi-currency org has `CurrencyIsoCode`; a single-currency one refuses the field.
    pub multi_currency: bool,
    /// The most records a page holds (Salesforce: up to 2,000, "possibly fewer").
    pub page_size: usize,
    /// Open cursors: locator -> the remaining records.
    pub cursors: HashMap<String, Vec<Value>>,
    /// The org's daily API request limit and what is used of it.
    pub api_limit: u64,
    pub api_used: u64,
    /// Every request: `token`, `query`, `queryAll` or `next`, with the SOQL where there is one.
    pub requests: Vec<String>,
    /// What the token endpoint names as the REST base.
    pub instance_url: String,
}

impl Default for Data {
    fn default() -> Self {
        Data {
            leads: HashMap::new(),
            lead_history: Vec::new(),
            lead_status_tracked: true,
            client_id: "sf-client".into(),
            client_secret: "sf-client-secret".into(),
            opportunities: HashMap::new(),
            history: Vec::new(),
            tokens: Vec::new(),
            multi_currency: true,
            page_size: 2000,
            cursors: HashMap::new(),
            api_limit: 15_000,
            api_used: 0,
            requests: Vec::new(),
            instance_url: String::new(),
        }
    }
}

#[derive(Clone)]
pub struct FakeSalesforce {
    pub base_url: String,
    pub data: Arc<Mutex<Data>>,
}

fn lock(d: &Arc<Mutex<Data>>) -> MutexGuard<'_, Data> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

/// A REST error: a JSON array of `{message, errorCode}`. source: SF-ERR
fn rest_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!([{"message": message, "errorCode": code}])),
    )
        .into_response()
}

const API_VERSION_PREFIX: &str = "/services/data/";

async fn token(
    State(s): State<FakeSalesforce>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let mut d = lock(&s.data);
    d.requests.push("token".into());
    // source: SF-CC (grant_type=client_credentials&client_id&client_secret; answer fields),
    // RFC 6749 §5.2 (error codes)
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "unsupported_grant_type", "error_description": "grant type not supported"})),
        )
            .into_response();
    }
    if form.get("client_id") != Some(&d.client_id)
        || form.get("client_secret") != Some(&d.client_secret)
    {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_client", "error_description": "invalid client credentials"})),
        )
            .into_response();
    }
    let token = format!("00DFAKE!session-{}", d.tokens.len() + 1);
    d.tokens.push(token.clone());
    let issued = Timestamp::now().unix_ms().to_string();
    Json(json!({
        "access_token": token, "instance_url": d.instance_url, "id": format!("{}/id/00DFAKE/005FAKE", d.instance_url),
        "token_type": "Bearer", "issued_at": issued, "signature": "ZmFrZQ==", "scope": "api"
    }))
    .into_response()
}

/// The checks every REST call shares: the token, then the org's API limit. Counts the call.
fn gate(d: &mut Data, h: &HeaderMap) -> Result<(), Box<Response>> {
    let token = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !token.is_some_and(|t| d.tokens.iter().any(|k| k == t)) {
        // source: SF-ERR (401 INVALID_SESSION_ID)
        return Err(Box::new(rest_error(
            StatusCode::UNAUTHORIZED,
            "INVALID_SESSION_ID",
            "Session expired or invalid",
        )));
    }
    d.api_used += 1;
    if d.api_used > d.api_limit {
        // source: SF-ERR (403 REQUEST_LIMIT_EXCEEDED)
        return Err(Box::new(rest_error(
            StatusCode::FORBIDDEN,
            "REQUEST_LIMIT_EXCEEDED",
            "TotalRequests Limit exceeded.",
        )));
    }
    Ok(())
}

/// The next page of a query's records (`served` of them were on earlier pages), with the
/// usage header every REST response carries. source: SF-LIMIT
fn page(d: &mut Data, version: &str, mut records: Vec<Value>, served: usize) -> Response {
    let total = served + records.len();
    let size = d.page_size.clamp(1, 2000);
    let rest = if records.len() > size {
        records.split_off(size)
    } else {
        Vec::new()
    };
    let mut body = json!({"totalSize": total, "done": rest.is_empty(), "records": records});
    if !rest.is_empty() {
        // source: SF-QUERY (`/services/data/v65.0/query/01gD0000002HU6KIAW-2000`; queryAll's
        // next page is under `query` too, SF-QALL)
        let locator = format!("01gFAKE{:08}-{}", d.cursors.len() + 1, total - rest.len());
        body["nextRecordsUrl"] = json!(format!("{API_VERSION_PREFIX}{version}/query/{locator}"));
        d.cursors.insert(locator, rest);
    }
    let usage = format!("api-usage={}/{}", d.api_used, d.api_limit);
    ([("sforce-limit-info", usage)], Json(body)).into_response()
}

async fn query(
    State(s): State<FakeSalesforce>,
    Path((version, resource)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let mut d = lock(&s.data);
    let all = match resource.as_str() {
        "query" => false,
        "queryAll" => true,
        _ => {
            return rest_error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "The requested resource does not exist",
            );
        }
    };
    if let Err(r) = gate(&mut d, &headers) {
        return *r;
    }
    let Some(soql) = q.get("q") else {
        return rest_error(StatusCode::BAD_REQUEST, "MALFORMED_QUERY", "q is required");
    };
    d.requests.push(format!("{resource} {soql}"));
    let parsed = match parse(soql).and_then(|p| check(&p, d.multi_currency).map(|()| p)) {
        Ok(p) => p,
        Err((code, message)) => return rest_error(StatusCode::BAD_REQUEST, code, &message),
    };
    let records = run(&d, &parsed, all, &version);
    page(&mut d, &version, records, 0)
}

async fn next_page(
    State(s): State<FakeSalesforce>,
    Path((version, locator)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut d = lock(&s.data);
    if let Err(r) = gate(&mut d, &headers) {
        return *r;
    }
    d.requests.push("next".into());
    let Some(records) = d.cursors.remove(&locator) else {
        // source: SF-CURSOR
        return rest_error(
            StatusCode::BAD_REQUEST,
            "INVALID_QUERY_LOCATOR",
            "invalid query locator",
        );
    };
    let served: usize = locator
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    page(&mut d, &version, records, served)
}

// ---- the SOQL subset ----

#[derive(Clone, Debug, PartialEq)]
enum Lit {
    Str(String),
    Bool(bool),
    Num(f64),
    Date(String),
    DateTime(String),
    Null,
}

#[derive(Clone, Debug)]
struct Cond {
    field: String,
    op: String,
    values: Vec<Lit>,
}

#[derive(Debug)]
struct Soql {
    fields: Vec<String>,
    object: String,
    conds: Vec<Cond>,
    order: Vec<String>,
}

type SoqlError = (&'static str, String);

fn malformed(m: impl Into<String>) -> SoqlError {
    ("MALFORMED_QUERY", m.into())
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    Sym(String),
}

fn tokens(s: &str) -> Result<Vec<Tok>, SoqlError> {
    let cs: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < cs.len() {
        let c = cs[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '\'' {
            let mut v = String::new();
            i += 1;
            loop {
                match cs.get(i) {
                    None => return Err(malformed("unterminated string literal")),
                    Some('\\') => {
                        match cs.get(i + 1) {
                            Some('n') => v.push('\n'),
                            Some('r') => v.push('\r'),
                            Some(&e) => v.push(e),
                            None => return Err(malformed("unterminated escape")),
                        }
                        i += 2;
                    }
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some(&ch) => {
                        v.push(ch);
                        i += 1;
                    }
                }
            }
            out.push(Tok::Str(v));
        } else if c == '"' {
            // source: fieldExpression syntax ("Double quotes result in an error")
            return Err(malformed("unexpected token: '\"'"));
        } else if "(),".contains(c) {
            out.push(Tok::Sym(c.to_string()));
            i += 1;
        } else if "=!<>".contains(c) {
            let two: String = cs[i..cs.len().min(i + 2)].iter().collect();
            if ["!=", "<=", ">="].contains(&two.as_str()) {
                out.push(Tok::Sym(two));
                i += 2;
            } else if c == '!' {
                return Err(malformed("unexpected token: '!'"));
            } else {
                out.push(Tok::Sym(c.to_string()));
                i += 1;
            }
        } else {
            let start = i;
            while i < cs.len() && !cs[i].is_whitespace() && !"(),'\"=!<>".contains(cs[i]) {
                i += 1;
            }
            out.push(Tok::Word(cs[start..i].iter().collect()));
        }
    }
    Ok(out)
}

fn literal(t: &Tok) -> Result<Lit, SoqlError> {
    Ok(match t {
        Tok::Str(s) => Lit::Str(s.clone()),
        Tok::Word(w) => {
            let lower = w.to_ascii_lowercase();
            if lower == "true" || lower == "false" {
                Lit::Bool(lower == "true")
            } else if lower == "null" {
                Lit::Null
            } else if w.len() == 10 && w.as_bytes()[4] == b'-' && w.as_bytes()[7] == b'-' {
                Lit::Date(w.clone())
            } else if w.len() > 10 && w.as_bytes().get(10) == Some(&b'T') {
                Lit::DateTime(w.clone())
            } else if let Ok(n) = w.parse::<f64>() {
                Lit::Num(n)
            } else {
                return Err(malformed(format!("unexpected token: '{w}'")));
            }
        }
        Tok::Sym(s) => return Err(malformed(format!("unexpected token: '{s}'"))),
    })
}

fn kw(t: Option<&Tok>, word: &str) -> bool {
    matches!(t, Some(Tok::Word(w)) if w.eq_ignore_ascii_case(word))
}

fn parse(soql: &str) -> Result<Soql, SoqlError> {
    let t = tokens(soql)?;
    let mut i = 0;
    if !kw(t.first(), "SELECT") {
        return Err(malformed("expecting SELECT"));
    }
    i += 1;
    let mut fields = Vec::new();
    loop {
        match t.get(i) {
            Some(Tok::Word(w)) if !w.eq_ignore_ascii_case("FROM") => fields.push(w.clone()),
            _ => return Err(malformed("expecting a field name")),
        }
        i += 1;
        if t.get(i) == Some(&Tok::Sym(",".into())) {
            i += 1;
            continue;
        }
        break;
    }
    if !kw(t.get(i), "FROM") {
        return Err(malformed("expecting FROM"));
    }
    let Some(Tok::Word(object)) = t.get(i + 1) else {
        return Err(malformed("expecting an object name"));
    };
    i += 2;
    let mut conds = Vec::new();
    if kw(t.get(i), "WHERE") {
        i += 1;
        loop {
            let Some(Tok::Word(field)) = t.get(i) else {
                return Err(malformed("expecting a field name"));
            };
            let op = match t.get(i + 1) {
                Some(Tok::Sym(s)) if ["=", "!=", "<", "<=", ">", ">="].contains(&s.as_str()) => {
                    s.clone()
                }
                Some(Tok::Word(w)) if w.eq_ignore_ascii_case("IN") => "IN".into(),
                _ => return Err(malformed(format!("unexpected token after {field}"))),
            };
            i += 2;
            let mut values = Vec::new();
            if op == "IN" {
                if t.get(i) != Some(&Tok::Sym("(".into())) {
                    return Err(malformed("expecting '(' after IN"));
                }
                i += 1;
                loop {
                    values.push(literal(
                        t.get(i).ok_or_else(|| malformed("unexpected end"))?,
                    )?);
                    i += 1;
                    match t.get(i) {
                        Some(Tok::Sym(s)) if s == "," => i += 1,
                        Some(Tok::Sym(s)) if s == ")" => {
                            i += 1;
                            break;
                        }
                        _ => return Err(malformed("expecting ',' or ')'")),
                    }
                }
            } else {
                values.push(literal(
                    t.get(i).ok_or_else(|| malformed("unexpected end"))?,
                )?);
                i += 1;
            }
            conds.push(Cond {
                field: field.clone(),
                op,
                values,
            });
            if kw(t.get(i), "AND") {
                i += 1;
                continue;
            }
            break;
        }
    }
    let mut order = Vec::new();
    if kw(t.get(i), "ORDER") {
        if !kw(t.get(i + 1), "BY") {
            return Err(malformed("expecting BY"));
        }
        i += 2;
        loop {
            let Some(Tok::Word(f)) = t.get(i) else {
                return Err(malformed("expecting a field to order by"));
            };
            order.push(f.clone());
            i += 1;
            if kw(t.get(i), "ASC") {
                i += 1;
            }
            if t.get(i) == Some(&Tok::Sym(",".into())) {
                i += 1;
                continue;
            }
            break;
        }
    }
    if i != t.len() {
        return Err(malformed(format!("unexpected token: '{:?}'", t[i])));
    }
    Ok(Soql {
        fields,
        object: object.clone(),
        conds,
        order,
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Id,
    Text,
    Number,
    Bool,
    Date,
    DateTime,
    /// `anyType` (history values): selectable and sortable, never filterable.
    Any,
}

/// The fields of each object the fake knows, with their types. source: SF-OPP, SF-HIST, SF-CUR
fn schema(object: &str, field: &str, multi_currency: bool) -> Option<Kind> {
    Some(match (object, field) {
        ("Opportunity", "Id") => Kind::Id,
        ("Opportunity", "StageName") => Kind::Text,
        ("Opportunity", "Amount") => Kind::Number,
        ("Opportunity", "CurrencyIsoCode") if multi_currency => Kind::Text,
        ("Opportunity", "CloseDate") => Kind::Date,
        ("Opportunity", "IsDeleted") => Kind::Bool,
        ("OpportunityHistory", "OpportunityId") => Kind::Id,
        ("OpportunityHistory", "StageName") => Kind::Text,
        ("OpportunityHistory", "CreatedDate") => Kind::DateTime,
        ("Lead", "Id") => Kind::Id,
        ("Lead", "Status" | "Email" | "Phone" | "FirstName" | "LastName") => Kind::Text,
        ("Lead", "CreatedDate") => Kind::DateTime,
        ("Lead", "IsDeleted") => Kind::Bool,
        ("LeadHistory", "LeadId") => Kind::Id,
        ("LeadHistory", "Field") => Kind::Text,
        ("LeadHistory", "OldValue" | "NewValue") => Kind::Any,
        ("LeadHistory", "CreatedDate") => Kind::DateTime,
        ("OpportunityContactRole", "OpportunityId") => Kind::Id,
        ("OpportunityContactRole", "IsPrimary") => Kind::Bool,
        (
            "OpportunityContactRole",
            "Contact.Email" | "Contact.Phone" | "Contact.FirstName" | "Contact.LastName",
        ) => Kind::Text,
        _ => return None,
    })
}

fn check(q: &Soql, multi_currency: bool) -> Result<(), SoqlError> {
    if ![
        "Opportunity",
        "OpportunityHistory",
        "OpportunityContactRole",
        "Lead",
        "LeadHistory",
    ]
    .contains(&q.object.as_str())
    {
        return Err((
            "INVALID_TYPE",
            format!("sObject type '{}' is not supported.", q.object),
        ));
    }
    let no_column = |f: &str| {
        (
            "INVALID_FIELD",
            format!("No such column '{f}' on entity '{}'.", q.object),
        )
    };
    for f in q.fields.iter().chain(&q.order) {
        schema(&q.object, f, multi_currency).ok_or_else(|| no_column(f))?;
    }
    for c in &q.conds {
        let kind =
            schema(&q.object, &c.field, multi_currency).ok_or_else(|| no_column(&c.field))?;
        if kind == Kind::Any {
            return Err((
                "INVALID_FIELD",
                format!("field '{}' can not be filtered in a query call", c.field),
            ));
        }
        for v in &c.values {
            let fits = matches!(
                (kind, v),
                (_, Lit::Null)
                    | (Kind::Id | Kind::Text, Lit::Str(_))
                    | (Kind::Number, Lit::Num(_))
                    | (Kind::Bool, Lit::Bool(_))
                    | (Kind::Date, Lit::Date(_))
                    | (Kind::DateTime, Lit::DateTime(_))
            );
            if !fits {
                // source: SF-DATE (date literals only for date fields, dateTime for dateTime;
                // unquoted); Salesforce's own wording for the quoted-date mistake.
                let want = match kind {
                    Kind::Date => "date",
                    Kind::Any => "anyType",
                    Kind::DateTime => "dateTime",
                    Kind::Bool => "boolean",
                    Kind::Number => "double",
                    _ => "string",
                };
                return Err((
                    "INVALID_FIELD",
                    format!(
                        "value of filter criterion for field '{}' must be of type {want} and should not be enclosed in quotes",
                        c.field
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Salesforce writes dateTimes as 2026-11-27T15:00:00.000+0000. source: SF-DATE
fn sf_datetime(at_ms: i64) -> String {
    let t = Timestamp::from_unix_ms(at_ms).canonical();
    format!("{}.{:03}+0000", &t[..19], at_ms.rem_euclid(1000))
}

/// A row's fields, as the query's columns name them.
fn row(d: &Data, object: &str, key: &str, index: usize) -> HashMap<&'static str, Lit> {
    let mut r = HashMap::new();
    let text = |s: &Option<String>| s.clone().map(Lit::Str).unwrap_or(Lit::Null);
    match object {
        "Opportunity" => {
            if let Some(o) = d.opportunities.get(key) {
                r.insert("Id", Lit::Str(key.to_string()));
                r.insert("StageName", Lit::Str(o.stage.clone()));
                r.insert("Amount", o.amount.map(Lit::Num).unwrap_or(Lit::Null));
                r.insert("CurrencyIsoCode", Lit::Str(o.currency.clone()));
                r.insert("CloseDate", Lit::Date(o.close_date.clone()));
                r.insert("IsDeleted", Lit::Bool(o.is_deleted));
            }
        }
        "OpportunityHistory" => {
            if let Some((id, stage, at)) = d.history.get(index) {
                r.insert("OpportunityId", Lit::Str(id.clone()));
                r.insert("StageName", Lit::Str(stage.clone()));
                r.insert("CreatedDate", Lit::DateTime(sf_datetime(*at)));
            }
        }
        "Lead" => {
            if let Some(l) = d.leads.get(key) {
                r.insert("Id", Lit::Str(key.to_string()));
                r.insert("Status", Lit::Str(l.status.clone()));
                r.insert("CreatedDate", Lit::DateTime(sf_datetime(l.created_ms)));
                r.insert("Email", text(&l.email));
                for f in ["Phone", "FirstName", "LastName"] {
                    r.insert(f, Lit::Null);
                }
                r.insert("IsDeleted", Lit::Bool(l.is_deleted));
            }
        }
        "LeadHistory" => {
            if let Some((id, field, old, new, at)) = d.lead_history.get(index) {
                r.insert("LeadId", Lit::Str(id.clone()));
                r.insert("Field", Lit::Str(field.clone()));
                r.insert("OldValue", text(old));
                r.insert("NewValue", text(new));
                r.insert("CreatedDate", Lit::DateTime(sf_datetime(*at)));
            }
        }
        _ => {
            if let Some(o) = d.opportunities.get(key) {
                r.insert("OpportunityId", Lit::Str(key.to_string()));
                r.insert("IsPrimary", Lit::Bool(o.contact.is_some()));
                let c = o.contact.clone().unwrap_or_default();
                r.insert("Contact.Email", text(&c[0]));
                r.insert("Contact.Phone", text(&c[1]));
                r.insert("Contact.FirstName", text(&c[2]));
                r.insert("Contact.LastName", text(&c[3]));
            }
        }
    }
    r
}

fn compare(a: &Lit, b: &Lit) -> Option<std::cmp::Ordering> {
    match (a, b) {
        // source: SOQL comparison operators (case-insensitive for all but unique
        // case-sensitive fields)
        (Lit::Str(x), Lit::Str(y)) => Some(x.to_lowercase().cmp(&y.to_lowercase())),
        (Lit::Num(x), Lit::Num(y)) => x.partial_cmp(y),
        (Lit::Bool(x), Lit::Bool(y)) => Some(x.cmp(y)),
        (Lit::Date(x), Lit::Date(y)) => Some(x.cmp(y)),
        (Lit::DateTime(x), Lit::DateTime(y)) => {
            let t = |s: &str| {
                let s = s.replacen("+0000", "Z", 1);
                Timestamp::parse_rfc3339(&s).map(|t| t.unix_ms()).ok()
            };
            Some(t(x)?.cmp(&t(y)?))
        }
        _ => None,
    }
}

fn holds(r: &HashMap<&'static str, Lit>, c: &Cond) -> bool {
    let Some(v) = r.get(c.field.as_str()) else {
        return false;
    };
    use std::cmp::Ordering::*;
    match c.op.as_str() {
        "IN" => c.values.iter().any(|x| compare(v, x) == Some(Equal)),
        op => {
            let Some(o) = compare(v, &c.values[0]) else {
                return op == "!=";
            };
            match op {
                "=" => o == Equal,
                "!=" => o != Equal,
                "<" => o == Less,
                "<=" => o != Greater,
                ">" => o == Greater,
                _ => o != Less,
            }
        }
    }
}

fn json_of(l: &Lit) -> Value {
    match l {
        Lit::Str(s) | Lit::Date(s) | Lit::DateTime(s) => json!(s),
        Lit::Num(n) => json!(n),
        Lit::Bool(b) => json!(b),
        Lit::Null => Value::Null,
    }
}

fn run(d: &Data, q: &Soql, all: bool, version: &str) -> Vec<Value> {
    let keys: Vec<(String, usize)> = match q.object.as_str() {
        "OpportunityHistory" => d
            .history
            .iter()
            .enumerate()
            .map(|(i, (id, _, _))| (id.clone(), i))
            .collect(),
        "LeadHistory" => d
            .lead_history
            .iter()
            .enumerate()
            .map(|(i, h)| (h.0.clone(), i))
            .collect(),
        "Lead" => d.leads.keys().map(|k| (k.clone(), 0)).collect(),
        _ => d.opportunities.keys().map(|k| (k.clone(), 0)).collect(),
    };
    let mut rows: Vec<(String, HashMap<&'static str, Lit>)> = keys
        .into_iter()
        .filter(|(key, _)| {
            // `query` leaves deleted records out; `queryAll` includes them. source: SF-QALL
            all || (d.opportunities.get(key).is_none_or(|o| !o.is_deleted)
                && d.leads.get(key).is_none_or(|l| !l.is_deleted))
        })
        .map(|(key, i)| (key.clone(), row(d, &q.object, &key, i)))
        .filter(|(_, r)| !r.is_empty() && q.conds.iter().all(|c| holds(r, c)))
        .collect();
    rows.sort_by(|(ka, a), (kb, b)| {
        for f in &q.order {
            if let (Some(x), Some(y)) = (a.get(f.as_str()), b.get(f.as_str()))
                && let Some(o) = compare(x, y)
                && o != std::cmp::Ordering::Equal
            {
                return o;
            }
        }
        ka.cmp(kb)
    });
    rows.into_iter()
        .map(|(key, r)| {
            let mut m = Map::new();
            m.insert(
                "attributes".into(),
                json!({"type": q.object, "url": format!("{API_VERSION_PREFIX}{version}/sobjects/{}/{key}", q.object)}),
            );
            for f in &q.fields {
                let v = r.get(f.as_str()).map(json_of).unwrap_or(Value::Null);
                if let Some((rel, field)) = f.split_once('.') {
                    let entry = m
                        .entry(rel.to_string())
                        .or_insert_with(|| json!({"attributes": {"type": rel}}));
                    entry[field] = v;
                } else {
                    m.insert(f.clone(), v);
                }
            }
            Value::Object(m)
        })
        .collect()
}

impl FakeSalesforce {
    pub async fn start() -> FakeSalesforce {
        let data = Arc::new(Mutex::new(Data::default()));
        let app = Router::new()
            .route("/services/oauth2/token", post(token))
            .route("/services/data/{version}/query/{locator}", get(next_page))
            .route("/services/data/{version}/{resource}", get(query))
            .with_state(FakeSalesforce {
                base_url: String::new(),
                data: data.clone(),
            });
        let base_url = super::serve(app).await;
        // The token endpoint names the REST base (`instance_url`): this fake's own address.
        lock(&data).instance_url = base_url.clone();
        FakeSalesforce { base_url, data }
    }

    /// The token endpoint, for the credentials JSON.
    pub fn token_url(&self) -> String {
        format!("{}/services/oauth2/token", self.base_url)
    }

    /// The `salesforce-oauth` JSON the bridge reads.
    pub fn credentials_json(&self) -> String {
        let d = lock(&self.data);
        json!({"token_url": self.token_url(), "client_id": d.client_id, "client_secret": d.client_secret})
            .to_string()
    }

    /// Opportunity `id` moves to `stage` at `at_ms` (a history row, as Salesforce writes one on
    /// every stage change), with `amount` in `currency`; its close date is that day.
    pub fn stage_change(&self, id: &str, stage: &str, amount: f64, currency: &str, at_ms: i64) {
        let mut d = lock(&self.data);
        let close_date: String = Timestamp::from_unix_ms(at_ms)
            .canonical()
            .chars()
            .take(10)
            .collect();
        let contact = d.opportunities.get(id).and_then(|o| o.contact.clone());
        d.opportunities.insert(
            id.to_string(),
            Opportunity {
                stage: stage.into(),
                amount: Some(amount),
                currency: currency.into(),
                close_date,
                is_deleted: false,
                contact,
            },
        );
        d.history.push((id.to_string(), stage.to_string(), at_ms));
    }

    /// Gives opportunity `id` a primary contact with this email.
    pub fn primary_contact(&self, id: &str, email: &str, first_name: &str) {
        if let Some(o) = lock(&self.data).opportunities.get_mut(id) {
            o.contact = Some([
                Some(email.to_string()),
                None,
                Some(first_name.to_string()),
                None,
            ]);
        }
    }

    /// Moves opportunity `id` to the recycle bin.
    pub fn delete(&self, id: &str) {
        if let Some(o) = lock(&self.data).opportunities.get_mut(id) {
            o.is_deleted = true;
        }
    }

    /// A lead created at `at_ms` in `status`, with an email (Lead's `created` history row is
    /// not a `Status` row: the status a lead starts in has none).
    pub fn lead(&self, id: &str, status: &str, email: &str, at_ms: i64) {
        let mut d = lock(&self.data);
        d.leads.insert(
            id.to_string(),
            Lead {
                status: status.into(),
                created_ms: at_ms,
                email: Some(email.into()),
                is_deleted: false,
            },
        );
        d.lead_history
            .push((id.to_string(), "created".into(), None, None, at_ms));
    }

    /// Lead `id`'s status changes at `at_ms`: a `Status` history row while tracking is on.
    pub fn lead_status(&self, id: &str, status: &str, at_ms: i64) {
        let mut d = lock(&self.data);
        let tracked = d.lead_status_tracked;
        let Some(lead) = d.leads.get_mut(id) else {
            return;
        };
        let old = std::mem::replace(&mut lead.status, status.to_string());
        if tracked {
            d.lead_history.push((
                id.to_string(),
                "Status".into(),
                Some(old),
                Some(status.into()),
                at_ms,
            ));
        }
    }

    /// Revokes every issued token, as an expired session is.
    pub fn expire_sessions(&self) {
        lock(&self.data).tokens.clear();
    }

    pub fn requests(&self) -> Vec<String> {
        lock(&self.data).requests.clone()
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut Data) -> T) -> T {
        f(&mut lock(&self.data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soql_subset_follows_salesforce_s_rules() {
        let q = parse("SELECT Id, StageName FROM Opportunity WHERE StageName IN ('closed won', 'It\\'s won') AND CloseDate >= 2026-11-01 ORDER BY CloseDate, Id").unwrap();
        assert_eq!(q.fields, ["Id", "StageName"]);
        assert_eq!(q.conds[0].values[1], Lit::Str("It's won".into()));
        assert_eq!(q.conds[1].values[0], Lit::Date("2026-11-01".into()));
        assert!(check(&q, true).is_ok());
        // A quoted date, a dateTime against a date field, double quotes, an unknown column.
        let quoted = parse("SELECT Id FROM Opportunity WHERE CloseDate >= '2026-11-01'").unwrap();
        assert_eq!(check(&quoted, true).unwrap_err().0, "INVALID_FIELD");
        let dt =
            parse("SELECT Id FROM Opportunity WHERE CloseDate >= 2026-11-01T00:00:00Z").unwrap();
        assert!(check(&dt, true).unwrap_err().1.contains("type date"));
        assert_eq!(
            parse("SELECT Id FROM Opportunity WHERE StageName = \"x\"")
                .unwrap_err()
                .0,
            "MALFORMED_QUERY"
        );
        let single = parse("SELECT Id, CurrencyIsoCode FROM Opportunity").unwrap();
        assert!(
            check(&single, false)
                .unwrap_err()
                .1
                .contains("CurrencyIsoCode")
        );
        assert_eq!(
            check(&parse("SELECT Id FROM Account").unwrap(), true)
                .unwrap_err()
                .0,
            "INVALID_TYPE"
        );
        // History values are anyType: selectable, never filterable; the field name is.
        let by_value =
            parse("SELECT LeadId FROM LeadHistory WHERE NewValue = 'Qualified'").unwrap();
        let e = check(&by_value, true).unwrap_err();
        assert_eq!(e.0, "INVALID_FIELD");
        assert!(e.1.contains("can not be filtered"), "{}", e.1);
        let by_field = parse("SELECT LeadId, NewValue FROM LeadHistory WHERE Field = 'Status' AND CreatedDate >= 2026-11-01T00:00:00Z").unwrap();
        assert!(check(&by_field, true).is_ok());
    }
}
