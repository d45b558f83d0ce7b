//! Google Ads as a delivery platform: click conversions and refund adjustments through the
//! Google Ads API, or events and restatements through the Data Manager API, chosen per account
//! by the mapping. One module per concern: `rows` builds the rows, `codes` reads the Ads API's
//! answers, `ads_api` and `data_manager` send them, `oauth` keeps the access token, `terms` is
//! the customer-data-terms pre-flight.

mod ads_api;
mod codes;
mod data_manager;
mod oauth;
mod rows;
mod terms;

pub use codes::{classify_ads_error, classify_code, classify_partial};
pub use data_manager::classify_datamanager;
pub use oauth::TokenSource;
pub use rows::{GoogleItem, Kind, build_item};

use crate::credentials::Deferred;
use async_trait::async_trait;
use bridge_core::delivery::{DeliveryStatus, Destination, ErrorCode, ErrorInfo};
use bridge_core::delivery::{Limits, Outcome, deliver_isolating};
use bridge_core::event::CanonicalEvent;
use bridge_core::mapping::Mapping;
use bridge_core::timestamp::Timestamp;
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use bridge_core::delivery::REQUEST_ID_PREFIX;

/// Both APIs take at most 2,000 rows (conversions, adjustments or events) per request.
pub const MAX_ROWS: usize = 2000;
/// How long Google asks us to wait after TOO_RECENT_EVENT / TOO_RECENT_CONVERSION_ACTION.
pub const TOO_RECENT_WAIT: Duration = Duration::from_secs(6 * 3600);
/// CONVERSION_NOT_FOUND: the adjustment may have overtaken Google's processing of the
/// conversion, so it is retried this many times, an hour apart, before it is dead-lettered.
pub const CONVERSION_NOT_FOUND_ATTEMPTS: u32 = 4;
pub const CONVERSION_NOT_FOUND_WAIT: Duration = Duration::from_secs(3600);

/// OAuth client, refresh token and developer token, as stored (JSON) in SSM.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoogleCredentials {
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
    /// Needed by the Google Ads API only; the Data Manager API takes none.
    #[serde(default)]
    pub developer_token: Option<String>,
}

impl fmt::Debug for GoogleCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GoogleCredentials")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("refresh_token", &"<redacted>")
            .field(
                "developer_token",
                &self.developer_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Why a credentials value is not Google's credentials JSON. It names a missing or unknown
/// field and where the JSON broke, never a value: serde_json quotes the value it met in a
/// type error (a double-encoded parameter would put every secret in the message), so its
/// text is not shown, in `Display` or `Debug`, and it is not given as a source.
pub struct CredentialsError(serde_json::Error);

impl fmt::Display for CredentialsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use serde_json::error::Category;
        let e = &self.0;
        let text = e.to_string();
        let what = match e.classify() {
            // "missing field `x`" and "unknown field `x`, expected one of ..." carry names only.
            Category::Data if text.starts_with("missing field `") => text
                .split(" at line")
                .next()
                .unwrap_or("a field is missing"),
            Category::Data if text.starts_with("unknown field `") => text
                .split(", expected")
                .next()
                .unwrap_or("an unknown field"),
            Category::Data => "a value is not of the type Google's credentials have",
            Category::Syntax => "not JSON",
            Category::Eof => "incomplete JSON",
            Category::Io => "unreadable",
        };
        write!(
            f,
            "Google credentials: {what} (line {}, column {})",
            e.line(),
            e.column()
        )
    }
}

impl fmt::Debug for CredentialsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CredentialsError({self})")
    }
}

impl std::error::Error for CredentialsError {}

impl GoogleCredentials {
    pub fn from_json(text: &str) -> Result<Self, CredentialsError> {
        serde_json::from_str(text).map_err(CredentialsError)
    }

    /// The credentials the SSM parameter `name` holds (`value`, None when it has none).
    /// Either error is permanent: a person must fix the parameter.
    pub fn from_parameter(
        name: &str,
        value: Option<String>,
    ) -> Result<Self, crate::credentials::ReadError> {
        let permanent = |message| crate::credentials::ReadError {
            message,
            permanent: true,
        };
        let json = value.ok_or_else(|| permanent(format!("SSM parameter {name} has no value")))?;
        Self::from_json(&json).map_err(|e| permanent(format!("SSM parameter {name}: {e}")))
    }
}

/// How long Google asks to wait before some retries: TOO_RECENT_EVENT and
/// TOO_RECENT_CONVERSION_ACTION ("retry after 6 hours"), and the hourly retries of
/// CONVERSION_NOT_FOUND. Configurable only so a time-compressed test can run them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waits {
    pub too_recent: Duration,
    pub conversion_not_found: Duration,
}

impl Default for Waits {
    fn default() -> Self {
        Waits {
            too_recent: TOO_RECENT_WAIT,
            conversion_not_found: CONVERSION_NOT_FOUND_WAIT,
        }
    }
}

#[derive(Clone, Debug)]
pub struct GoogleConfig {
    pub ads_base_url: String,
    pub ads_api_version: String,
    pub datamanager_base_url: String,
    pub token_url: String,
    /// Given, or read at the first request (a sender reads them from SSM while its first
    /// batch is claimed).
    pub credentials: Deferred<GoogleCredentials>,
    /// Dry runs: `validateOnly: true` on every request; Google checks and imports nothing.
    pub validate_only: bool,
    pub timeout: Duration,
    /// How long a customer-data-terms answer is trusted.
    pub terms_ttl: Duration,
}

fn err(code: ErrorCode, message: impl Into<String>) -> ErrorInfo {
    ErrorInfo::new(code, message)
}

fn rejected(code: ErrorCode, message: impl Into<String>) -> Outcome {
    Outcome::Rejected {
        error: err(code, message),
        dead_letter: true,
        alert: false,
    }
}

fn retry(code: ErrorCode, message: impl Into<String>, after: Option<Duration>) -> Outcome {
    Outcome::Retryable {
        error: err(code, message),
        after,
    }
}

/// Google over HTTP: both back ends, the token cache and the terms cache.
pub struct GooglePlatform {
    http: reqwest::Client,
    cfg: GoogleConfig,
    mapping: Mapping,
    tokens: TokenSource,
    /// customer id -> (terms accepted, checked at).
    terms: Mutex<HashMap<String, (bool, Instant)>>,
    /// Data Manager request id -> its final status (SUCCESS, PARTIAL_SUCCESS, FAILED), which
    /// never changes once reached.
    statuses: Mutex<HashMap<String, String>>,
    waits: Waits,
}

enum Api {
    Ads,
    DataManager,
}

impl GooglePlatform {
    pub fn new(http: reqwest::Client, cfg: GoogleConfig, mapping: Mapping) -> Self {
        let tokens = TokenSource::new(
            http.clone(),
            cfg.token_url.clone(),
            cfg.credentials.clone(),
            cfg.timeout,
        );
        GooglePlatform {
            http,
            cfg,
            mapping,
            tokens,
            terms: Mutex::new(HashMap::new()),
            statuses: Mutex::new(HashMap::new()),
            waits: Waits::default(),
        }
    }

    /// Google's retry waits, shortened (a time-compressed test only).
    pub fn with_waits(mut self, waits: Waits) -> Self {
        self.waits = waits;
        self
    }

    /// POSTs `body` with a bearer token (refreshed once on a 401) and, for the Ads API, the
    /// developer token and manager account. The answer's status and text, or the outcome
    /// for every row when no answer came.
    async fn post(
        &self,
        api: Api,
        url: &str,
        login: Option<&str>,
        body: &Value,
    ) -> Result<(u16, String), Outcome> {
        let mut refreshed = false;
        loop {
            let token = self.tokens.token().await?;
            let mut req = self
                .http
                .post(url)
                .bearer_auth(&token)
                .json(body)
                .timeout(self.cfg.timeout);
            if let Api::Ads = api {
                // Read already: the token above needed them.
                let credentials = self.cfg.credentials.get().await.map_err(|e| e.outcome())?;
                if let Some(d) = &credentials.developer_token {
                    req = req.header("developer-token", d);
                }
                if let Some(l) = login {
                    req = req.header("login-customer-id", l);
                }
            }
            let resp = match req.send().await {
                Ok(r) => r,
                // A timeout may come after Google imported the rows: the retry carries the
                // same order ids / transaction ids, which Google deduplicates.
                Err(e) if e.is_timeout() => {
                    return Err(retry(ErrorCode::Timeout, "no answer in time", None));
                }
                Err(e) => return Err(retry(ErrorCode::Network, crate::http::error_text(e), None)),
            };
            let status = resp.status().as_u16();
            if status == 401 && !refreshed {
                self.tokens.invalidate(&token).await;
                refreshed = true;
                continue;
            }
            let text = resp
                .text()
                .await
                .map_err(|e| retry(ErrorCode::ResponseRead, crate::http::error_text(e), None))?;
            return Ok((status, text));
        }
    }
}

#[async_trait]
impl bridge_core::delivery::pipeline::Platform for GooglePlatform {
    type Item = GoogleItem;

    fn destination(&self) -> Destination {
        Destination::Google
    }

    fn max_batch(&self) -> usize {
        MAX_ROWS
    }

    fn request_timeout(&self) -> Duration {
        self.cfg.timeout
    }

    fn sent_as(&self, item: &GoogleItem) -> Option<String> {
        Some(item.action())
    }

    fn row_key(&self, item: &GoogleItem) -> Option<String> {
        item.order().map(|order| {
            format!(
                "{:?}|{}|{}|{order}",
                item.kind, item.customer_id, item.action_id
            )
        })
    }

    async fn confirm_original(
        &self,
        refund: &CanonicalEvent,
        order: &[CanonicalEvent],
    ) -> Result<(), Outcome> {
        self.confirm_processed(refund, order).await
    }

    fn prepare(
        &self,
        event: &CanonicalEvent,
        order: &[CanonicalEvent],
        now: Timestamp,
    ) -> Result<(String, GoogleItem), ErrorInfo> {
        let item = build_item(event, order, &self.mapping, now)?;
        Ok((item.group(), item))
    }

    fn delivered_status(&self, item: &GoogleItem) -> DeliveryStatus {
        if item.restated_to_zero {
            DeliveryStatus::RetractionUnsupported
        } else {
            DeliveryStatus::Delivered
        }
    }

    async fn send(&self, _group: &str, items: &[GoogleItem], limits: Limits) -> Vec<Outcome> {
        if items.is_empty() {
            return Vec::new();
        }
        if let Some(outcomes) = self
            .cfg
            .credentials
            .unavailable("google", items.len())
            .await
        {
            return outcomes;
        }
        match items[0].kind {
            Kind::DataManager => {
                deliver_isolating(
                    &data_manager::DataManagerRequest { platform: self },
                    items,
                    limits,
                )
                .await
            }
            Kind::Click | Kind::Adjustment => self.send_ads(items, limits).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn credentials_never_print_secrets() {
        let c = GoogleCredentials::from_json(r#"{"client_id": "id", "client_secret": "s3cret", "refresh_token": "r3fresh", "developer_token": "d3v"}"#).unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("r3fresh") && !shown.contains("d3v"),
            "{shown}"
        );
        let e = GoogleCredentials::from_json(r#"{"client_id": "id"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `client_secret`"), "{e}");
    }

    /// A parameter that holds the JSON as a JSON string (encoded twice): serde_json's own
    /// text would quote it whole, secrets and all.
    #[test]
    fn credentials_errors_never_quote_the_value() {
        let json = r#"{"client_id": "id", "client_secret": "s3cret", "refresh_token": "r3fresh", "developer_token": "d3v"}"#;
        let twice = serde_json::to_string(json).unwrap();
        let wrong_type =
            r#"{"client_id": "id", "client_secret": ["s3cret"], "refresh_token": "r3fresh"}"#;
        for bad in [
            twice.as_str(),
            wrong_type,
            "s3cret r3fresh",
            r#"{"client_id": "s3cret""#,
        ] {
            let e = GoogleCredentials::from_json(bad).unwrap_err();
            for shown in [e.to_string(), format!("{e:?}")] {
                assert!(
                    !shown.contains("s3cret")
                        && !shown.contains("r3fresh")
                        && !shown.contains("d3v"),
                    "{shown}"
                );
                assert!(
                    shown.starts_with("Google credentials: ")
                        || shown.starts_with("CredentialsError("),
                    "{shown}"
                );
            }
            let read =
                GoogleCredentials::from_parameter("/bridge/google", Some(bad.into())).unwrap_err();
            assert!(read.permanent);
            assert!(
                read.message.starts_with("SSM parameter /bridge/google: "),
                "{}",
                read.message
            );
            assert!(!read.message.contains("s3cret"), "{}", read.message);
        }
        let unknown =
            GoogleCredentials::from_json(r#"{"client_id": "id", "secret": "s3cret"}"#).unwrap_err();
        assert!(
            unknown.to_string().contains("unknown field `secret`"),
            "{unknown}"
        );
        assert!(!unknown.to_string().contains("s3cret"));
        let none = GoogleCredentials::from_parameter("/bridge/google", None).unwrap_err();
        assert_eq!(none.message, "SSM parameter /bridge/google has no value");
        assert!(GoogleCredentials::from_parameter("/bridge/google", Some(json.into())).is_ok());
    }
}
