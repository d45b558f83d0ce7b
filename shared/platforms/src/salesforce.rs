//! The Salesforce REST API client for reconciliation: an access token from the OAuth 2.0
//! client credentials flow (the connected app's integration user), SOQL through `query` and
//! `queryAll` with every page followed (`nextRecordsUrl`), and each error answered as the docs
//! say: a 401 `INVALID_SESSION_ID` gets one new token and one retry, a 403
//! `REQUEST_LIMIT_EXCEEDED` is the org's API limit (not retried), a `MALFORMED_QUERY` is ours.
//! The org's API usage (`Sforce-Limit-Info`) is logged with each page.
//! source: crm-apis.md SF-CC, SF-QUERY, SF-QALL, SF-LIMIT, SF-ERR

use async_trait::async_trait;
use bridge_core::crm_check::salesforce::{SfLead, SfStatusChange};
use bridge_core::crm_check::{CrmDeal, SalesforceApi, SfContact, SfOpportunity};
use bridge_core::timestamp::{Days, Timestamp, Window};
use bridge_core::webhook::hubspot::{CrmError, HistoryEntry};
use serde::Deserialize;
use serde_json::Value;
use std::time::Duration;

/// Per request: a query page is small, and the check runs off the webhook path.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The REST API version, unless `SALESFORCE_API_VERSION` says otherwise.
pub const DEFAULT_API_VERSION: &str = "v65.0";

/// The connected app's credentials, one JSON SecureString in SSM (`salesforce-oauth` under
/// the webhook secrets path): `{"token_url": "https://<MyDomain>.my.salesforce.com/services/oauth2/token",
/// "client_id": "...", "client_secret": "..."}`.
#[derive(Clone, Deserialize)]
pub struct SalesforceCredentials {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: String,
}

impl std::fmt::Debug for SalesforceCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SalesforceCredentials")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .finish()
    }
}

impl SalesforceCredentials {
    /// Reads the JSON, naming the field that is missing and never echoing a value.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let v: Value = serde_json::from_str(text)
            .map_err(|_| "salesforce-oauth: not a JSON object".to_string())?;
        for field in ["token_url", "client_id", "client_secret"] {
            if v[field].as_str().is_none_or(|s| s.trim().is_empty()) {
                return Err(format!("salesforce-oauth: {field} is missing"));
            }
        }
        serde_json::from_value(v).map_err(|_| "salesforce-oauth: unreadable".to_string())
    }
}

#[derive(Clone)]
struct Session {
    token: String,
    /// The REST base the token endpoint names (`instance_url`).
    instance_url: String,
}

/// Salesforce's query API over HTTPS.
pub struct SalesforceClient {
    http: reqwest::Client,
    credentials: SalesforceCredentials,
    api_version: String,
    session: tokio::sync::Mutex<Option<Session>>,
}

#[derive(Deserialize)]
struct QueryPage {
    #[serde(default)]
    done: bool,
    #[serde(rename = "nextRecordsUrl")]
    next_records_url: Option<String>,
    #[serde(default)]
    records: Vec<Value>,
}

/// A SOQL string literal: single quotes, with `\` and `'` escaped.
/// source: SOQL "Quoted String Escape Sequences"
pub fn soql_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

fn soql_list(values: &[String]) -> String {
    let quoted: Vec<String> = values.iter().map(|v| soql_string(v)).collect();
    format!("({})", quoted.join(", "))
}

/// A SOQL dateTime literal, `2026-11-27T15:00:00Z`: unquoted, and with no fraction of a
/// second, which SOQL's formats do not have (so `at` to its whole second, earlier; `up`
/// rounds up instead). source: SF-DATE
fn soql_datetime(at: Timestamp, up: bool) -> String {
    let secs = at.unix_ms().div_euclid(1000) + i64::from(up && at.unix_ms().rem_euclid(1000) > 0);
    let t = Timestamp::from_unix_secs(secs).canonical();
    format!("{}Z", t.get(..19).unwrap_or(&t))
}

/// `CreatedDate` in `[from, to)` as SOQL dateTime bounds (whole seconds, widened to hold the
/// period; the caller keeps the exact one).
fn created_in(window: Window) -> String {
    format!(
        "CreatedDate >= {} AND CreatedDate < {}",
        soql_datetime(window.from, false),
        soql_datetime(window.to, true)
    )
}

/// The columns the funnel reads of a lead.
const LEAD_FIELDS: &str =
    "SELECT Id, Status, CreatedDate, Email, Phone, FirstName, LastName FROM Lead";
/// The columns of a `LeadHistory` row of the `Status` field (`NewValue` and `OldValue` are
/// `anyType`, which SOQL cannot filter on: the field is). source: Object Reference, LeadHistory
const LEAD_STATUS_ROWS: &str =
    "SELECT LeadId, OldValue, NewValue, CreatedDate FROM LeadHistory WHERE Field = 'Status'";

fn lead(r: &Value) -> Option<SfLead> {
    Some(SfLead {
        id: text(r, "Id")?,
        status: text(r, "Status").unwrap_or_default(),
        created: r["CreatedDate"].as_str().and_then(parse_datetime),
        contact: SfContact {
            email: text(r, "Email"),
            phone: text(r, "Phone"),
            first_name: text(r, "FirstName"),
            last_name: text(r, "LastName"),
        },
    })
}

fn status_change(r: &Value) -> Option<SfStatusChange> {
    Some(SfStatusChange {
        lead_id: text(r, "LeadId")?,
        old: text(r, "OldValue"),
        new: text(r, "NewValue"),
        at: parse_datetime(r["CreatedDate"].as_str()?)?,
    })
}

/// Salesforce's dateTime (`2026-11-27T15:00:00.000+0000`) or an RFC 3339 one.
fn parse_datetime(s: &str) -> Option<Timestamp> {
    if let Ok(t) = Timestamp::parse_rfc3339(s) {
        return Some(t);
    }
    // `+hhmm` without the colon RFC 3339 wants.
    let cut = s.len().checked_sub(5)?;
    let (head, tail) = (s.get(..cut)?, s.get(cut..)?);
    let (sign, digits) = (tail.get(..1)?, tail.get(1..)?);
    if (sign == "+" || sign == "-") && digits.chars().all(|c| c.is_ascii_digit()) {
        let fixed = format!("{head}{sign}{}:{}", digits.get(..2)?, digits.get(2..)?);
        return Timestamp::parse_rfc3339(&fixed).ok();
    }
    None
}

/// The `[{"message", "errorCode"}]` body of a REST error, as `errorCode: message`.
fn error_text(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let first = &v[0];
    match (first["errorCode"].as_str(), first["message"].as_str()) {
        (Some(code), Some(msg)) => format!("{code}: {}", msg.chars().take(300).collect::<String>()),
        _ => body.chars().take(300).collect(),
    }
}

fn text(v: &Value, field: &str) -> Option<String> {
    v[field]
        .as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

impl SalesforceClient {
    pub fn new(
        http: reqwest::Client,
        credentials: SalesforceCredentials,
        api_version: impl Into<String>,
    ) -> Self {
        SalesforceClient {
            http,
            credentials,
            api_version: api_version.into(),
            session: tokio::sync::Mutex::new(None),
        }
    }

    /// The cached session, or a new one from the token endpoint.
    async fn session(&self, stale: Option<&str>) -> Result<Session, CrmError> {
        let mut cached = self.session.lock().await;
        if let Some(s) = cached.as_ref()
            && stale != Some(s.token.as_str())
        {
            return Ok(s.clone());
        }
        let c = &self.credentials;
        let resp = self
            .http
            .post(&c.token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", c.client_id.as_str()),
                ("client_secret", c.client_secret.as_str()),
            ])
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| {
                CrmError::Unavailable(format!("token endpoint: {}", crate::http::error_text(e)))
            })?;
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        match (
            status,
            v["access_token"].as_str(),
            v["instance_url"].as_str(),
        ) {
            (200, Some(token), Some(instance)) => {
                let s = Session {
                    token: token.to_string(),
                    instance_url: instance.trim_end_matches('/').to_string(),
                };
                *cached = Some(s.clone());
                Ok(s)
            }
            (500..=599, _, _) => Err(CrmError::Unavailable(format!(
                "token endpoint: HTTP {status}"
            ))),
            // `{"error": "invalid_client", "error_description": "..."}`; the description names
            // no secret. source: SF-CC, SF-JWT
            _ => Err(CrmError::Refused {
                status,
                message: format!(
                    "token endpoint: {} {}",
                    v["error"].as_str().unwrap_or("no token"),
                    v["error_description"].as_str().unwrap_or("")
                )
                .trim()
                .to_string(),
            }),
        }
    }

    /// One GET of `path` (under the instance URL) with the session's token; a 401 gets one
    /// new token and one retry.
    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, CrmError> {
        let mut stale: Option<String> = None;
        loop {
            let session = self.session(stale.as_deref()).await?;
            let resp = self
                .http
                .get(format!("{}{path}", session.instance_url))
                .bearer_auth(&session.token)
                .query(query)
                .timeout(REQUEST_TIMEOUT)
                .send()
                .await
                .map_err(|e| CrmError::Unavailable(crate::http::error_text(e)))?;
            let status = resp.status().as_u16();
            if let Some(usage) = resp
                .headers()
                .get("sforce-limit-info")
                .and_then(|v| v.to_str().ok())
            {
                tracing::debug!(api_usage = usage, "salesforce");
            }
            let body = resp
                .text()
                .await
                .map_err(|e| CrmError::Unavailable(crate::http::error_text(e)))?;
            match status {
                200 => {
                    return serde_json::from_str(&body)
                        .map_err(|_| CrmError::Unavailable("an unreadable query page".into()));
                }
                // INVALID_SESSION_ID: the token expired or was revoked. source: SF-ERR
                401 if stale.is_none() => stale = Some(session.token),
                // REQUEST_LIMIT_EXCEEDED is the org's rolling 24-hour API limit, not a
                // permission: the next scheduled run tries again. source: SF-ERR
                403 if body.contains("REQUEST_LIMIT_EXCEEDED") => {
                    return Err(CrmError::Unavailable(error_text(&body)));
                }
                500..=599 => return Err(CrmError::Unavailable(format!("HTTP {status}"))),
                _ => {
                    return Err(CrmError::Refused {
                        status,
                        message: error_text(&body),
                    });
                }
            }
        }
    }

    /// Every record of `soql`, through `queryAll` when `all` (deleted records included),
    /// following `nextRecordsUrl` until `done`.
    pub async fn query(&self, soql: &str, all: bool) -> Result<Vec<Value>, CrmError> {
        let resource = if all { "queryAll" } else { "query" };
        let mut page: QueryPage = serde_json::from_value(
            self.get(
                &format!("/services/data/{}/{resource}", self.api_version),
                &[("q", soql)],
            )
            .await?,
        )
        .map_err(|_| CrmError::Unavailable("an unreadable query page".into()))?;
        let mut records = std::mem::take(&mut page.records);
        while !page.done {
            let Some(next) = page.next_records_url.take() else {
                break;
            };
            page = serde_json::from_value(self.get(&next, &[]).await?)
                .map_err(|_| CrmError::Unavailable("an unreadable query page".into()))?;
            records.append(&mut page.records);
        }
        Ok(records)
    }
}

impl SalesforceClient {
    /// The records of `soql`, each read by `row` (one it cannot read is skipped).
    async fn read<T>(
        &self,
        soql: &str,
        row: impl Fn(&Value) -> Option<T>,
    ) -> Result<Vec<T>, CrmError> {
        Ok(self
            .query(soql, false)
            .await?
            .iter()
            .filter_map(row)
            .collect())
    }

    /// The records of `select` (a SOQL statement without its id filter) whose `field` is one
    /// of `ids`, each read by `row`; none without a query when `ids` is empty.
    async fn for_ids<T>(
        &self,
        select: &str,
        field: &str,
        ids: &[String],
        all: bool,
        row: impl Fn(&Value) -> Option<T>,
    ) -> Result<Vec<T>, CrmError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let joiner = if select.contains(" WHERE ") {
            "AND"
        } else {
            "WHERE"
        };
        let (head, order) = match select.split_once(" ORDER BY ") {
            Some((h, o)) => (h, format!(" ORDER BY {o}")),
            None => (select, String::new()),
        };
        let soql = format!("{head} {joiner} {field} IN {}{order}", soql_list(ids));
        Ok(self
            .query(&soql, all)
            .await?
            .iter()
            .filter_map(row)
            .collect())
    }
}

#[async_trait]
impl SalesforceApi for SalesforceClient {
    async fn won_opportunities(
        &self,
        stages: &[String],
        close_dates: &Days,
    ) -> Result<Vec<CrmDeal>, CrmError> {
        let (from_day, to_day) = (&close_dates.first, &close_dates.last);
        let day = |d: &str| d.len() == 10 && d.chars().all(|c| c.is_ascii_digit() || c == '-');
        if !day(from_day) || !day(to_day) {
            return Err(CrmError::Refused {
                status: 400,
                message: "a close date is not YYYY-MM-DD".into(),
            });
        }
        // Dates are unquoted literals. source: SF-DATE
        let filter = format!(
            "WHERE StageName IN {} AND CloseDate >= {from_day} AND CloseDate <= {to_day} ORDER BY CloseDate, Id",
            soql_list(stages)
        );
        let multi = format!(
            "SELECT Id, StageName, Amount, CurrencyIsoCode, CloseDate FROM Opportunity {filter}"
        );
        let records = match self.query(&multi, false).await {
            // A single-currency org has no CurrencyIsoCode: its amounts are in the org's one
            // currency, which the report shows as "(none)". source: SF-OPP, SF-CUR
            Err(CrmError::Refused {
                status: 400,
                message,
            }) if message.contains("CurrencyIsoCode") => {
                self.query(
                    &format!("SELECT Id, StageName, Amount, CloseDate FROM Opportunity {filter}"),
                    false,
                )
                .await?
            }
            other => other?,
        };
        Ok(records
            .iter()
            .filter_map(|r| {
                Some(CrmDeal {
                    id: text(r, "Id")?,
                    stage: text(r, "StageName").unwrap_or_default(),
                    amount: r["Amount"].as_f64(),
                    currency: text(r, "CurrencyIsoCode"),
                })
            })
            .collect())
    }

    async fn stage_history(&self, ids: &[String]) -> Result<Vec<(String, HistoryEntry)>, CrmError> {
        self.for_ids(
            "SELECT OpportunityId, StageName, CreatedDate FROM OpportunityHistory ORDER BY CreatedDate",
            "OpportunityId",
            ids,
            false,
            |r| {
                Some((
                    text(r, "OpportunityId")?,
                    HistoryEntry {
                        value: text(r, "StageName")?,
                        at: parse_datetime(r["CreatedDate"].as_str()?)?,
                    },
                ))
            },
        )
        .await
    }

    async fn primary_contacts(&self, ids: &[String]) -> Result<Vec<(String, SfContact)>, CrmError> {
        self.for_ids(
            "SELECT OpportunityId, Contact.Email, Contact.Phone, Contact.FirstName, Contact.LastName FROM OpportunityContactRole WHERE IsPrimary = true",
            "OpportunityId",
            ids,
            false,
            |r| {
                let c = &r["Contact"];
                Some((
                    text(r, "OpportunityId")?,
                    SfContact {
                        email: text(c, "Email"),
                        phone: text(c, "Phone"),
                        first_name: text(c, "FirstName"),
                        last_name: text(c, "LastName"),
                    },
                ))
            },
        )
        .await
    }

    async fn lead_status_changes(&self, window: Window) -> Result<Vec<SfStatusChange>, CrmError> {
        let soql = format!(
            "{LEAD_STATUS_ROWS} AND {} ORDER BY CreatedDate",
            created_in(window)
        );
        self.read(&soql, status_change).await
    }

    async fn lead_status_history(&self, ids: &[String]) -> Result<Vec<SfStatusChange>, CrmError> {
        let select = format!("{LEAD_STATUS_ROWS} ORDER BY CreatedDate");
        self.for_ids(&select, "LeadId", ids, false, status_change)
            .await
    }

    async fn leads_created(&self, window: Window) -> Result<Vec<SfLead>, CrmError> {
        let soql = format!(
            "{LEAD_FIELDS} WHERE {} ORDER BY CreatedDate, Id",
            created_in(window)
        );
        self.read(&soql, lead).await
    }

    async fn leads(&self, ids: &[String]) -> Result<Vec<SfLead>, CrmError> {
        self.for_ids(LEAD_FIELDS, "Id", ids, false, lead).await
    }

    async fn opportunities_all(&self, ids: &[String]) -> Result<Vec<SfOpportunity>, CrmError> {
        self.for_ids(
            "SELECT Id, StageName, IsDeleted FROM Opportunity",
            "Id",
            ids,
            true,
            |r| {
                Some(SfOpportunity {
                    id: text(r, "Id")?,
                    stage: text(r, "StageName").unwrap_or_default(),
                    is_deleted: r["IsDeleted"].as_bool().unwrap_or(false),
                })
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soql_literals_are_escaped_and_salesforce_datetimes_read() {
        assert_eq!(soql_string("O'Brien \\ co"), "'O\\'Brien \\\\ co'");
        assert_eq!(
            soql_list(&["closed won".into(), "x'".into()]),
            "('closed won', 'x\\'')"
        );
        assert_eq!(
            parse_datetime("2026-11-27T15:00:00.000+0000"),
            Timestamp::parse_rfc3339("2026-11-27T15:00:00Z").ok()
        );
        assert_eq!(
            parse_datetime("2026-11-27T17:00:00.000+0200"),
            Timestamp::parse_rfc3339("2026-11-27T15:00:00Z").ok()
        );
        assert_eq!(parse_datetime("yesterday"), None);
        assert_eq!(parse_datetime("2026-11-27T15:00:00.000+00€"), None);
        let at = Timestamp::parse_rfc3339("2026-11-27T15:00:00.250Z").unwrap();
        assert_eq!(soql_datetime(at, false), "2026-11-27T15:00:00Z");
        assert_eq!(soql_datetime(at, true), "2026-11-27T15:00:01Z");
        let whole = Timestamp::parse_rfc3339("2026-11-27T15:00:00Z").unwrap();
        assert_eq!(soql_datetime(whole, true), "2026-11-27T15:00:00Z");
    }

    #[test]
    fn credentials_name_the_missing_field_and_never_print_the_secret() {
        let e =
            SalesforceCredentials::from_json(r#"{"token_url": "https://x", "client_id": "id"}"#)
                .unwrap_err();
        assert!(e.contains("client_secret"), "{e}");
        let c = SalesforceCredentials::from_json(
            r#"{"token_url": "https://x", "client_id": "id", "client_secret": "s3cr3t"}"#,
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("s3cr3t"));
        assert_eq!(
            error_text(
                r#"[{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]"#
            ),
            "INVALID_SESSION_ID: Session expired or invalid"
        );
    }
}
