//! The HubSpot CRM API client: the records a HubSpot webhook names (a contact, a deal and its
//! contact) with the property histories that confirm a change, and for reconciliation against
//! the CRM the search for the won deals of a period, the contacts modified since it began with
//! their lifecycle stage histories, and the archived deals; over HTTPS with a private-app
//! token. The base URL is configurable so tests and the local stack use a fake.

use async_trait::async_trait;
use bridge_core::crm_check::{CrmDeal, HubSpotSearch};
use bridge_core::timestamp::{Timestamp, Window};
use bridge_core::webhook::hubspot::{
    CONTACT_HISTORY, CONTACT_PROPERTIES, CrmError, DEAL_HISTORY, DEAL_PROPERTIES, HistoryEntry,
    HubSpotRecord, HubSpotRecords, Properties,
};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// HubSpot gives a webhook receiver 5 seconds (HS-WH): the reads must fit well inside.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// The HubSpot CRM API over HTTPS with a private-app token.
pub struct HubSpotClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecordBody {
    #[serde(default)]
    properties: Properties,
    /// `{property: [{value, timestamp (ISO 8601), sourceType, ...}]}`, newest first in
    /// practice but not documented so: order is not relied on.
    /// source: HS-DEALS; hubspot-api-nodejs codegen ValueWithTimestamp.ts
    #[serde(default)]
    properties_with_history: HashMap<String, Vec<HistoryBody>>,
    #[serde(default)]
    associations: Option<HashMap<String, AssocList>>,
}

#[derive(Deserialize)]
struct HistoryBody {
    #[serde(default)]
    value: Option<String>,
    timestamp: String,
}

#[derive(Deserialize)]
struct AssocList {
    #[serde(default)]
    results: Vec<AssocItem>,
}

#[derive(Deserialize)]
struct AssocItem {
    id: String,
}

impl HubSpotClient {
    /// A client over `http` (built by the caller with [`CONNECT_TIMEOUT`]); every request is
    /// bounded by [`REQUEST_TIMEOUT`].
    pub fn new(http: reqwest::Client, base: impl Into<String>, token: impl Into<String>) -> Self {
        HubSpotClient {
            http,
            base: base.into().trim_end_matches('/').to_string(),
            token: token.into(),
        }
    }

    /// Sends one request with the token and the request timeout; a transport error is the
    /// CRM being unavailable (its text without the URL).
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, CrmError> {
        req.bearer_auth(&self.token)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| CrmError::Unavailable(crate::http::error_text(e)))
    }

    async fn get(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Option<HubSpotRecord>, CrmError> {
        let resp = self
            .send(self.http.get(format!("{}{path}", self.base)).query(query))
            .await?;
        match resp.status().as_u16() {
            200 => resp
                .json::<RecordBody>()
                .await
                .map(|b| Some(record(b)))
                .map_err(|e| CrmError::Unavailable(crate::http::error_text(e))),
            404 => Ok(None),
            _ => Err(failure(resp).await),
        }
    }
}

/// What an answer other than success means: a 429 with its Retry-After when given (HubSpot's
/// own 429s may carry none, HS-REC; the SDK waits 1-10 s), a 5xx, or a refusal with the start
/// of its body.
async fn failure(resp: reqwest::Response) -> CrmError {
    let status = resp.status().as_u16();
    match status {
        429 => CrmError::Throttled {
            retry_after_secs: resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok()),
        },
        500..=599 => CrmError::Unavailable(format!("HTTP {status}")),
        _ => CrmError::Refused {
            status,
            message: resp
                .text()
                .await
                .unwrap_or_default()
                .chars()
                .take(300)
                .collect(),
        },
    }
}

fn record(b: RecordBody) -> HubSpotRecord {
    let history = b
        .properties_with_history
        .into_iter()
        .map(|(k, entries)| {
            let entries = entries
                .into_iter()
                .filter_map(|h| {
                    Some(HistoryEntry {
                        value: h.value?,
                        at: Timestamp::parse_rfc3339(&h.timestamp).ok()?,
                    })
                })
                .collect();
            (k, entries)
        })
        .collect();
    let contact_id = b.associations.and_then(|a| {
        a.get("contacts")
            .and_then(|l| l.results.first().map(|x| x.id.clone()))
    });
    HubSpotRecord {
        properties: b.properties,
        history,
        contact_id,
    }
}

#[async_trait]
impl HubSpotRecords for HubSpotClient {
    async fn contact(&self, id: &str) -> Result<Option<HubSpotRecord>, CrmError> {
        let q = [
            ("properties", CONTACT_PROPERTIES.join(",")),
            ("propertiesWithHistory", CONTACT_HISTORY.join(",")),
        ];
        self.get(&format!("/crm/v3/objects/contacts/{id}"), &q)
            .await
    }

    async fn deal(&self, id: &str) -> Result<Option<HubSpotRecord>, CrmError> {
        let q = [
            ("properties", DEAL_PROPERTIES.join(",")),
            ("propertiesWithHistory", DEAL_HISTORY.join(",")),
            ("associations", "contacts".to_string()),
        ];
        self.get(&format!("/crm/v3/objects/deals/{id}"), &q).await
    }
}

/// A search page holds at most 200 records, and one query reaches at most 10,000 (paging past
/// that answers 400). source: HS-SEARCH
const SEARCH_PAGE: usize = 200;
const SEARCH_MAX: u64 = 10_000;
/// The search API's 429 ("secondly limit") is retried after 1 s x attempt, as HubSpot's own SDK
/// does (HS-RETRY-SDK), or after its Retry-After when given; 5xx likewise.
const SEARCH_ATTEMPTS: u32 = 5;

#[derive(Deserialize)]
struct SearchPage {
    #[serde(default)]
    total: u64,
    #[serde(default)]
    results: Vec<SearchResult>,
    #[serde(default)]
    paging: Option<Paging>,
}

#[derive(Deserialize)]
struct SearchResult {
    id: String,
    #[serde(default)]
    properties: Properties,
}

#[derive(Deserialize)]
struct Paging {
    next: Option<NextPage>,
}

#[derive(Deserialize)]
struct NextPage {
    after: String,
}

enum Searched {
    Found(Vec<SearchResult>),
    /// More than one query can page through: split the window.
    TooMany,
}

/// One object type's search, as the check uses it: the filters of a window `[from, to)` of a
/// date property, and the properties each result carries.
struct Query<'a> {
    object: &'static str,
    filters: &'a (dyn Fn(i64, i64) -> Value + Sync),
    properties: &'a [&'a str],
}

impl HubSpotClient {
    /// One search request, retried on 429 and 5xx.
    async fn search_page(&self, object: &str, body: &Value) -> Result<SearchPage, CrmError> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let url = format!("{}/crm/v3/objects/{object}/search", self.base);
            let resp = self.send(self.http.post(url).json(body)).await?;
            if resp.status().as_u16() == 200 {
                return resp
                    .json::<SearchPage>()
                    .await
                    .map_err(|e| CrmError::Unavailable(crate::http::error_text(e)));
            }
            let err = failure(resp).await;
            let retry_after = match &err {
                CrmError::Throttled { retry_after_secs } => *retry_after_secs,
                CrmError::Unavailable(_) => None,
                _ => return Err(err),
            };
            if attempt >= SEARCH_ATTEMPTS {
                return Err(err);
            }
            let wait = retry_after.unwrap_or(u64::from(attempt)).min(60);
            tokio::time::sleep(Duration::from_secs(wait)).await;
        }
    }

    /// Every result of one window, or `TooMany` when the query would pass 10,000 results.
    async fn search_window(
        &self,
        q: &Query<'_>,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Searched, CrmError> {
        let mut found = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut body = json!({
                "filterGroups": [{"filters": (q.filters)(from_ms, to_ms)}],
                "properties": q.properties,
                "sorts": [{"propertyName": "hs_object_id", "direction": "ASCENDING"}],
                "limit": SEARCH_PAGE,
            });
            if let Some(a) = &after {
                body["after"] = json!(a);
            }
            let page = self.search_page(q.object, &body).await?;
            if page.total > SEARCH_MAX {
                return Ok(Searched::TooMany);
            }
            found.extend(page.results);
            match page.paging.and_then(|p| p.next) {
                Some(n) => after = Some(n.after),
                None => return Ok(Searched::Found(found)),
            }
        }
    }

    /// Every result of `[from, to)`: windows holding more than one query's 10,000 results are
    /// halved until each fits. Sorted by id, each once.
    async fn search_all(
        &self,
        q: &Query<'_>,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<SearchResult>, CrmError> {
        let mut out = Vec::new();
        let mut windows = vec![(from_ms, to_ms)];
        while let Some((a, b)) = windows.pop() {
            if a >= b {
                continue;
            }
            match self.search_window(q, a, b).await? {
                Searched::Found(d) => out.extend(d),
                Searched::TooMany if b - a > 1 => {
                    let mid = a + (b - a) / 2;
                    windows.push((mid, b));
                    windows.push((a, mid));
                }
                Searched::TooMany => {
                    return Err(CrmError::Refused {
                        status: 400,
                        message: format!("more than 10,000 {} in one millisecond", q.object),
                    });
                }
            }
        }
        out.sort_by(|x, y| x.id.cmp(&y.id));
        out.dedup_by(|x, y| x.id == y.id);
        Ok(out)
    }

    /// One batch read of `object` (`POST .../batch/read`), 200 or 207 (some ids not found).
    async fn batch_read(
        &self,
        object: &str,
        archived: bool,
        body: &Value,
    ) -> Result<Value, CrmError> {
        let url = format!("{}/crm/v3/objects/{object}/batch/read", self.base);
        let mut req = self.http.post(url).json(body);
        if archived {
            req = req.query(&[("archived", "true")]);
        }
        let resp = self.send(req).await?;
        if !matches!(resp.status().as_u16(), 200 | 207) {
            return Err(failure(resp).await);
        }
        resp.json()
            .await
            .map_err(|e| CrmError::Unavailable(crate::http::error_text(e)))
    }
}

/// Inputs per history batch read: `propertiesWithHistory` lowers a read's per-request maximum
/// (HS-DEALS; 50 for the list read), so the batch stays at 50 of its 100.
const HISTORY_BATCH: usize = 50;

#[async_trait]
impl HubSpotSearch for HubSpotClient {
    async fn won_deals(&self, stages: &[String], window: Window) -> Result<Vec<CrmDeal>, CrmError> {
        // Enumeration properties (dealstage) match case-sensitively; BETWEEN includes both
        // ends, so the window's end is its last millisecond. Date filters take epoch-ms
        // strings. source: HS-SEARCH
        let filters = |a: i64, b: i64| {
            json!([
                {"propertyName": "dealstage", "operator": "IN", "values": stages},
                {"propertyName": "closedate", "operator": "BETWEEN",
                 "value": a.to_string(), "highValue": (b - 1).to_string()},
            ])
        };
        let q = Query {
            object: "deals",
            filters: &filters,
            properties: &["dealstage", "amount", "deal_currency_code", "closedate"],
        };
        let found = self
            .search_all(&q, window.from.unix_ms(), window.to.unix_ms())
            .await?;
        Ok(found
            .into_iter()
            .map(|r| {
                let prop = |k: &str| r.properties.get(k).cloned().flatten();
                CrmDeal {
                    stage: prop("dealstage").unwrap_or_default(),
                    amount: prop("amount").and_then(|a| a.trim().parse().ok()),
                    currency: prop("deal_currency_code").filter(|c| !c.is_empty()),
                    id: r.id,
                }
            })
            .collect())
    }

    /// The batch read with `archived=true`, 100 ids a request: the search never lists a
    /// deleted deal, this read lists only those. A 207 (some ids not archived) is an answer.
    /// source: crm-apis.md "Batch reads and associations"
    async fn archived(&self, ids: &[String]) -> Result<HashSet<String>, CrmError> {
        let mut out = HashSet::new();
        for chunk in ids.chunks(100) {
            let body = json!({
                "properties": ["hs_object_id"],
                "inputs": chunk.iter().map(|id| json!({"id": id})).collect::<Vec<_>>(),
            });
            let v = self.batch_read("deals", true, &body).await?;
            out.extend(
                v["results"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|r| r["archived"].as_bool() == Some(true))
                    .filter_map(|r| r["id"].as_str().map(String::from)),
            );
        }
        Ok(out)
    }

    /// Contacts by `lastmodifieddate` (the contacts' name for it; other objects say
    /// `hs_lastmodifieddate`. source: HS-SEARCH), from `since` to a day past now, split like
    /// the deal search past 10,000.
    async fn contacts_modified(&self, since: Timestamp) -> Result<Vec<String>, CrmError> {
        let filters = |a: i64, b: i64| {
            json!([{"propertyName": "lastmodifieddate", "operator": "BETWEEN",
                    "value": a.to_string(), "highValue": (b - 1).to_string()}])
        };
        let q = Query {
            object: "contacts",
            filters: &filters,
            properties: &["lastmodifieddate"],
        };
        let until = Timestamp::now().plus_secs(86_400);
        let found = self
            .search_all(&q, since.unix_ms(), until.unix_ms())
            .await?;
        Ok(found.into_iter().map(|r| r.id).collect())
    }

    /// The contacts batch read with `propertiesWithHistory=lifecyclestage`, 50 ids a request.
    /// source: crm-apis.md "Batch reads and associations"
    async fn lifecycle_histories(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, Vec<HistoryEntry>>, CrmError> {
        let mut out = HashMap::new();
        for chunk in ids.chunks(HISTORY_BATCH) {
            let body = json!({
                "properties": ["lifecyclestage"],
                "propertiesWithHistory": ["lifecyclestage"],
                "inputs": chunk.iter().map(|id| json!({"id": id})).collect::<Vec<_>>(),
            });
            let v = self.batch_read("contacts", false, &body).await?;
            for r in v["results"].as_array().into_iter().flatten() {
                let Ok(body) = serde_json::from_value::<RecordBody>(r.clone()) else {
                    continue;
                };
                let Some(id) = r["id"].as_str() else {
                    continue;
                };
                let mut rec = record(body);
                out.insert(
                    id.to_string(),
                    rec.history.remove("lifecyclestage").unwrap_or_default(),
                );
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_crm_that_never_answers_costs_one_request_timeout_not_the_webhook() {
        // A server that accepts connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let http = crate::http::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .expect("client");
        let client = HubSpotClient::new(http, base, "pat-secret");
        let started = std::time::Instant::now();
        let e = client.deal("9001").await.expect_err("no answer");
        let took = started.elapsed();
        assert!(
            matches!(&e, CrmError::Unavailable(t) if t.contains("timed out")),
            "{e:?}"
        );
        assert!(
            took >= REQUEST_TIMEOUT && took < REQUEST_TIMEOUT + Duration::from_secs(1),
            "{took:?}"
        );
        assert!(!e.to_string().contains("pat-secret") && !e.to_string().contains("9001"));
    }
}
