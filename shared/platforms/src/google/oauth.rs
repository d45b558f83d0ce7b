//! OAuth access tokens for both Google APIs: the refresh-token grant, cached until shortly
//! before expiry, one refresh shared by concurrent requests.

use super::{GoogleCredentials, err, retry};
use crate::credentials::Deferred;
use bridge_core::delivery::{ErrorCode, Outcome};
use serde_json::Value;
use std::time::{Duration, Instant};

/// OAuth access tokens from the refresh-token grant, cached until shortly before they expire.
/// The lock is held while refreshing, so concurrent requests share one refresh.
pub struct TokenSource {
    http: reqwest::Client,
    url: String,
    credentials: Deferred<GoogleCredentials>,
    timeout: Duration,
    cached: tokio::sync::Mutex<Option<(String, Instant)>>,
}

/// Refresh this long before the token's stated expiry.
const TOKEN_MARGIN: Duration = Duration::from_secs(120);

impl TokenSource {
    pub fn new(
        http: reqwest::Client,
        url: String,
        credentials: Deferred<GoogleCredentials>,
        timeout: Duration,
    ) -> Self {
        TokenSource {
            http,
            url,
            credentials,
            timeout,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    /// A valid access token, or the outcome every row of the request gets.
    pub async fn token(&self) -> Result<String, Outcome> {
        let mut cached = self.cached.lock().await;
        if let Some((t, until)) = &*cached
            && Instant::now() < *until
        {
            return Ok(t.clone());
        }
        let (token, lifetime) = self.fetch().await?;
        let until = Instant::now()
            + lifetime
                .saturating_sub(TOKEN_MARGIN)
                .max(Duration::from_secs(1));
        *cached = Some((token.clone(), until));
        Ok(token)
    }

    /// Forgets `stale` after a 401, unless another request already replaced it.
    pub async fn invalidate(&self, stale: &str) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|(t, _)| t == stale) {
            *cached = None;
        }
    }

    async fn fetch(&self) -> Result<(String, Duration), Outcome> {
        let c = self.credentials.get().await.map_err(|e| e.outcome())?;
        let form = [
            ("grant_type", "refresh_token"),
            ("client_id", c.client_id.as_str()),
            ("client_secret", c.client_secret.as_str()),
            ("refresh_token", c.refresh_token.as_str()),
        ];
        let resp = self
            .http
            .post(&self.url)
            .form(&form)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| {
                retry(
                    ErrorCode::OauthUnavailable,
                    format!("token endpoint: {}", crate::http::error_text(e)),
                    None,
                )
            })?;
        let status = resp.status().as_u16();
        let body = resp.text().await.map_err(|e| {
            retry(
                ErrorCode::OauthUnavailable,
                format!("token endpoint: {}", crate::http::error_text(e)),
                None,
            )
        })?;
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        if (200..300).contains(&status)
            && let Some(t) = v["access_token"].as_str()
        {
            let secs = v["expires_in"].as_u64().unwrap_or(3600);
            return Ok((t.to_string(), Duration::from_secs(secs)));
        }
        if status == 429 || status >= 500 {
            return Err(retry(
                ErrorCode::OauthUnavailable,
                format!("token endpoint answered {status}"),
                None,
            ));
        }
        // invalid_grant (revoked refresh token), invalid_client: a person must fix the credentials.
        let code = v["error"].as_str().unwrap_or("error");
        let description = v["error_description"]
            .as_str()
            .unwrap_or("token refresh refused");
        Err(Outcome::Rejected {
            error: err(ErrorCode::oauth(code), description),
            dead_letter: true,
            alert: true,
        })
    }
}
