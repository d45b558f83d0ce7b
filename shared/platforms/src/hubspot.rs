//! The HubSpot CRM API client: the records a HubSpot webhook names (a contact, a deal and its
//! contact), read over HTTPS with a private-app token. The base URL is configurable so tests and
//! the local stack use a fake.

use async_trait::async_trait;
use bridge_core::webhook::hubspot::{
    CONTACT_PROPERTIES, CrmError, DEAL_PROPERTIES, HubSpotRecords, Properties,
};
use serde::Deserialize;
use std::collections::HashMap;

/// The HubSpot CRM API over HTTPS with a private-app token; the base URL is configurable so
/// tests and the local stack use a fake.
pub struct HubSpotClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

#[derive(Deserialize)]
struct RecordBody {
    #[serde(default)]
    properties: Properties,
    #[serde(default)]
    associations: Option<HashMap<String, AssocList>>,
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
    ) -> Result<Option<RecordBody>, CrmError> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .query(query)
            .send()
            .await
            .map_err(|e| CrmError::Unavailable(e.to_string()))?;
        let status = resp.status().as_u16();
        match status {
            200 => resp
                .json::<RecordBody>()
                .await
                .map(Some)
                .map_err(|e| CrmError::Unavailable(e.to_string())),
            404 => Ok(None),
            429 | 500..=599 => Err(CrmError::Unavailable(format!("HTTP {status}"))),
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

#[async_trait]
impl HubSpotRecords for HubSpotClient {
    async fn contact(&self, id: &str) -> Result<Option<Properties>, CrmError> {
        let q = [("properties", CONTACT_PROPERTIES.join(","))];
        Ok(self
            .get(&format!("/crm/v3/objects/contacts/{id}"), &q)
            .await?
            .map(|b| b.properties))
    }

    async fn deal(&self, id: &str) -> Result<Option<(Properties, Option<String>)>, CrmError> {
        let q = [
            ("properties", DEAL_PROPERTIES.join(",")),
            ("associations", "contacts".to_string()),
        ];
        Ok(self
            .get(&format!("/crm/v3/objects/deals/{id}"), &q)
            .await?
            .map(|b| {
                let contact = b.associations.and_then(|a| {
                    a.get("contacts")
                        .and_then(|l| l.results.first().map(|x| x.id.clone()))
                });
                (b.properties, contact)
            }))
    }
}
