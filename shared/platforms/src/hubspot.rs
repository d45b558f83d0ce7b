//! The HubSpot CRM API client: the records a HubSpot webhook names (a contact, a deal and its
//! contact) with the property histories that confirm a change, read over HTTPS with a
//! private-app token. The base URL is configurable so tests and the local stack use a fake.

use async_trait::async_trait;
use bridge_core::timestamp::Timestamp;
use bridge_core::webhook::hubspot::{
    CONTACT_HISTORY, CONTACT_PROPERTIES, CrmError, DEAL_HISTORY, DEAL_PROPERTIES, HistoryEntry,
    HubSpotRecord, HubSpotRecords, Properties,
};
use serde::Deserialize;
use std::collections::HashMap;
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

    async fn get(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Option<HubSpotRecord>, CrmError> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .query(query)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| CrmError::Unavailable(e.without_url().to_string()))?;
        let status = resp.status().as_u16();
        match status {
            200 => resp
                .json::<RecordBody>()
                .await
                .map(|b| Some(record(b)))
                .map_err(|e| CrmError::Unavailable(e.without_url().to_string())),
            404 => Ok(None),
            // HubSpot's own 429s may carry no Retry-After (HS-REC); the SDK waits 1-10 s.
            429 => Err(CrmError::Throttled {
                retry_after_secs: resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse().ok()),
            }),
            500..=599 => Err(CrmError::Unavailable(format!("HTTP {status}"))),
            _ => Err(CrmError::Refused {
                status,
                message: resp
                    .text()
                    .await
                    .unwrap_or_default()
                    .chars()
                    .take(300)
                    .collect(),
            }),
        }
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
