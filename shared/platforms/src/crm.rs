//! The system of record's API, whichever CRM it is: built from the webhook secrets (HubSpot's
//! `hubspot-token`, Salesforce's `salesforce-oauth`) and the environment, it runs the CRM side
//! of reconciliation and its repair. The reconcile function and the operator command share it.

use crate::hubspot::HubSpotClient;
use crate::salesforce::{DEFAULT_API_VERSION, SalesforceClient, SalesforceCredentials};
use async_trait::async_trait;
use bridge_core::crm_check::{CheckError, CrmCheck, Period, check_hubspot, check_salesforce};
use bridge_core::ingest::{IngestReport, Intake};
use bridge_core::mapping::Mapping;
use bridge_core::reconcile::run::CrmApi;
use bridge_core::store::EventStore;
use bridge_core::timestamp::{Timestamp, Window};
use bridge_core::webhook::hubspot::ResolveOptions;
use std::collections::HashMap;

/// The CRM whose won deals are the revenue truth (the mapping's `system_of_record`).
pub enum CrmClient {
    HubSpot {
        client: HubSpotClient,
        portal_id: Option<i64>,
    },
    Salesforce(SalesforceClient),
}

impl CrmClient {
    /// The client for `mapping`'s system of record, from its secret in `secrets` and the
    /// settings `env` names (`HUBSPOT_PORTAL_ID`, `HUBSPOT_API_BASE_URL`,
    /// `SALESFORCE_API_VERSION`). `Ok(None)` when the secret is not configured (the check is
    /// then skipped); an error names the variable or parameter that is wrong.
    pub fn from_secrets(
        mapping: &Mapping,
        secrets: &HashMap<String, String>,
        env: impl Fn(&str) -> Option<String>,
        http: reqwest::Client,
    ) -> Result<Option<CrmClient>, String> {
        let env = |k: &str| {
            env(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        match mapping.system_of_record.as_str() {
            "hubspot" => {
                let Some(token) = secrets.get("hubspot-token") else {
                    return Ok(None);
                };
                let portal_id = match env("HUBSPOT_PORTAL_ID") {
                    Some(p) => Some(p.parse::<i64>().map_err(|_| {
                        "HUBSPOT_PORTAL_ID must be a HubSpot account id (digits)".to_string()
                    })?),
                    None => None,
                };
                let base = crate::config::parse_url(
                    &env,
                    "HUBSPOT_API_BASE_URL",
                    "https://api.hubapi.com",
                )
                .map_err(|e| e.to_string())?;
                Ok(Some(CrmClient::HubSpot {
                    client: HubSpotClient::new(http, base, token.clone()),
                    portal_id,
                }))
            }
            "salesforce" => {
                let Some(text) = secrets.get("salesforce-oauth") else {
                    return Ok(None);
                };
                let credentials = SalesforceCredentials::from_json(text)?;
                let version =
                    env("SALESFORCE_API_VERSION").unwrap_or_else(|| DEFAULT_API_VERSION.into());
                if !version.starts_with('v') || version[1..].parse::<f64>().is_err() {
                    return Err(format!(
                        "SALESFORCE_API_VERSION must look like v65.0, not {version}"
                    ));
                }
                Ok(Some(CrmClient::Salesforce(SalesforceClient::new(
                    http,
                    credentials,
                    version,
                ))))
            }
            // The mapping names no CRM the bridge can query (a generic source).
            _ => Ok(None),
        }
    }
}

#[async_trait]
impl CrmApi for CrmClient {
    fn source(&self) -> &'static str {
        match self {
            CrmClient::HubSpot { .. } => "hubspot",
            CrmClient::Salesforce(_) => "salesforce",
        }
    }

    async fn check(
        &self,
        store: &dyn EventStore,
        mapping: &Mapping,
        window: Window,
        now: Timestamp,
    ) -> Result<CrmCheck, CheckError> {
        match self {
            CrmClient::HubSpot { client, portal_id } => {
                let period = Period {
                    portal_id: *portal_id,
                    window,
                };
                check_hubspot(client, client, store, mapping, period, now).await
            }
            CrmClient::Salesforce(c) => check_salesforce(c, store, mapping, window, now).await,
        }
    }

    async fn repair(&self, check: &CrmCheck, to: Intake<'_>, now: Timestamp) -> IngestReport {
        match self {
            CrmClient::HubSpot { client, portal_id } => {
                let opts = ResolveOptions {
                    portal_id: *portal_id,
                    ..Default::default()
                };
                bridge_core::crm_check::repair(check, Some((client, &opts)), to, now).await
            }
            CrmClient::Salesforce(_) => bridge_core::crm_check::repair(check, None, to, now).await,
        }
    }
}
