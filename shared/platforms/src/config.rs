//! The platforms' settings, read once from the environment and validated: every base URL (so
//! tests and the local stack point the same binaries at fakes), API versions, timeouts and
//! dry-run switches, and the one constructor of each platform's config built from them. The
//! senders, reconcile and `bridge-backfill` all read the same variables here.

use crate::credentials::Deferred;
use crate::google::{GoogleConfig, GoogleCredentials, TOO_RECENT_WAIT, Waits};
use crate::meta::MetaConfig;
use std::time::Duration;

/// An environment variable with a value that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("environment variable {var}: {reason}")]
pub struct InvalidVar {
    pub var: &'static str,
    pub reason: String,
}

/// A number from `min` to `max`, or `default` when unset. Anything else is an error naming the
/// variable: a typo never falls back to the default silently.
pub fn parse_num<T>(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: T,
    min: T,
    max: T,
) -> Result<T, InvalidVar>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    match get(var) {
        None => Ok(default),
        Some(v) => match v.trim().parse::<T>() {
            Ok(n) if n >= min && n <= max => Ok(n),
            _ => Err(InvalidVar {
                var,
                reason: format!("must be a number from {min} to {max}"),
            }),
        },
    }
}

/// Whole seconds from `min` to `max` (see [`parse_num`]).
pub fn parse_secs(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<Duration, InvalidVar> {
    parse_num(get, var, default, min, max).map(Duration::from_secs)
}

/// `true` or `false`, or `default` when unset.
pub fn parse_flag(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: bool,
) -> Result<bool, InvalidVar> {
    match get(var).as_deref().map(str::trim) {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(_) => Err(InvalidVar {
            var,
            reason: "must be true or false".into(),
        }),
    }
}

/// An http:// or https:// URL without its trailing slash, or `default` when unset.
pub fn parse_url(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: &str,
) -> Result<String, InvalidVar> {
    let v = get(var).unwrap_or_else(|| default.to_string());
    let v = v.trim().trim_end_matches('/').to_string();
    if v.starts_with("http://") || v.starts_with("https://") {
        Ok(v)
    } else {
        Err(InvalidVar {
            var,
            reason: "must be an http:// or https:// URL".into(),
        })
    }
}

/// Platform endpoints and API versions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub meta_graph_base_url: String,
    pub meta_api_version: String,
    pub google_ads_base_url: String,
    pub google_ads_api_version: String,
    pub google_datamanager_base_url: String,
    pub google_oauth_token_url: String,
}

/// Everything the platform clients are configured with besides their secrets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformSettings {
    pub endpoints: Endpoints,
    /// `META_TIMEOUT_SECS`: one Conversions API request.
    pub meta_timeout: Duration,
    /// `META_TEST_EVENT_CODE`: events go to Events Manager's Test Events tool.
    pub meta_test_event_code: Option<String>,
    /// `GOOGLE_TIMEOUT_SECS`: one Ads API or Data Manager request.
    pub google_timeout: Duration,
    /// `GOOGLE_TERMS_TTL_SECS`: how long a customer-data-terms answer is trusted.
    pub google_terms_ttl: Duration,
    /// `GOOGLE_VALIDATE_ONLY`: every Google request is a dry run.
    pub google_validate_only: bool,
    /// `GOOGLE_TOO_RECENT_WAIT_SECS`: Google asks for six hours after TOO_RECENT_*; an
    /// emulator run compresses that.
    pub google_too_recent_wait: Duration,
}

impl PlatformSettings {
    pub fn from_env() -> Result<PlatformSettings, InvalidVar> {
        Self::from_lookup(&|k: &str| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// Reads the settings through `get`, so tests need not touch the process environment.
    pub fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<Self, InvalidVar> {
        Ok(PlatformSettings {
            endpoints: Endpoints {
                meta_graph_base_url: parse_url(
                    get,
                    "META_GRAPH_BASE_URL",
                    "https://graph.facebook.com",
                )?,
                meta_api_version: get("META_API_VERSION").unwrap_or_else(|| "v26.0".into()),
                google_ads_base_url: parse_url(
                    get,
                    "GOOGLE_ADS_BASE_URL",
                    "https://googleads.googleapis.com",
                )?,
                google_ads_api_version: get("GOOGLE_ADS_API_VERSION")
                    .unwrap_or_else(|| "v26".into()),
                google_datamanager_base_url: parse_url(
                    get,
                    "GOOGLE_DATAMANAGER_BASE_URL",
                    "https://datamanager.googleapis.com",
                )?,
                google_oauth_token_url: parse_url(
                    get,
                    "GOOGLE_OAUTH_TOKEN_URL",
                    "https://oauth2.googleapis.com/token",
                )?,
            },
            meta_timeout: parse_secs(get, "META_TIMEOUT_SECS", 20, 1, 300)?,
            meta_test_event_code: get("META_TEST_EVENT_CODE"),
            google_timeout: parse_secs(get, "GOOGLE_TIMEOUT_SECS", 30, 1, 300)?,
            google_terms_ttl: parse_secs(get, "GOOGLE_TERMS_TTL_SECS", 3600, 0, 86_400)?,
            google_validate_only: parse_flag(get, "GOOGLE_VALIDATE_ONLY", false)?,
            google_too_recent_wait: parse_secs(
                get,
                "GOOGLE_TOO_RECENT_WAIT_SECS",
                TOO_RECENT_WAIT.as_secs(),
                1,
                TOO_RECENT_WAIT.as_secs(),
            )?,
        })
    }

    /// The Meta client's configuration for a pixel (its credentials are given apart, as
    /// [`crate::meta::MetaAccess`]).
    pub fn meta_config(&self, pixel_id: String) -> MetaConfig {
        MetaConfig {
            base_url: self.endpoints.meta_graph_base_url.clone(),
            api_version: self.endpoints.meta_api_version.clone(),
            pixel_id,
            test_event_code: self.meta_test_event_code.clone(),
            timeout: self.meta_timeout,
        }
    }

    /// The Google client's configuration for these credentials (given, or read at first use).
    pub fn google_config(
        &self,
        credentials: impl Into<Deferred<GoogleCredentials>>,
    ) -> GoogleConfig {
        GoogleConfig {
            ads_base_url: self.endpoints.google_ads_base_url.clone(),
            ads_api_version: self.endpoints.google_ads_api_version.clone(),
            datamanager_base_url: self.endpoints.google_datamanager_base_url.clone(),
            token_url: self.endpoints.google_oauth_token_url.clone(),
            credentials: credentials.into(),
            validate_only: self.google_validate_only,
            timeout: self.google_timeout,
            terms_ttl: self.google_terms_ttl,
        }
    }

    /// The waits Google's answers ask for.
    pub fn google_waits(&self) -> Waits {
        Waits {
            too_recent: self.google_too_recent_wait,
            ..Waits::default()
        }
    }
}

/// A variable lookup over fixed pairs instead of the environment, for tests and for tools that
/// take their settings from elsewhere.
pub fn lookup_in(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let m: std::collections::HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| m.get(k).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_configuration_contract() {
        let s = PlatformSettings::from_lookup(&lookup_in(&[])).unwrap();
        let e = &s.endpoints;
        assert_eq!(e.meta_graph_base_url, "https://graph.facebook.com");
        assert_eq!(e.meta_api_version, "v26.0");
        assert_eq!(e.google_ads_api_version, "v26");
        assert_eq!(
            e.google_oauth_token_url,
            "https://oauth2.googleapis.com/token"
        );
        assert_eq!(s.meta_timeout, Duration::from_secs(20));
        assert_eq!(s.google_timeout, Duration::from_secs(30));
        assert!(!s.google_validate_only);
        assert_eq!(s.google_waits(), Waits::default());
    }

    #[test]
    fn bad_values_name_the_variable_and_never_fall_back() {
        for (var, value) in [
            ("META_TIMEOUT_SECS", "20s"),
            ("GOOGLE_TIMEOUT_SECS", "0"),
            ("GOOGLE_TERMS_TTL_SECS", "-1"),
            ("GOOGLE_VALIDATE_ONLY", "yes"),
            ("GOOGLE_TOO_RECENT_WAIT_SECS", "21601"),
            ("META_GRAPH_BASE_URL", "graph.facebook.com"),
        ] {
            let e = PlatformSettings::from_lookup(&lookup_in(&[(var, value)])).unwrap_err();
            assert_eq!(e.var, var, "{e}");
        }
    }

    #[test]
    fn values_and_base_urls_are_overridable() {
        let s = PlatformSettings::from_lookup(&lookup_in(&[
            ("META_GRAPH_BASE_URL", "http://127.0.0.1:9100/"),
            ("GOOGLE_VALIDATE_ONLY", "true"),
            ("GOOGLE_TOO_RECENT_WAIT_SECS", "10"),
            ("META_TEST_EVENT_CODE", "TEST123"),
        ]))
        .unwrap();
        assert_eq!(s.endpoints.meta_graph_base_url, "http://127.0.0.1:9100");
        assert!(s.google_validate_only);
        assert_eq!(s.google_waits().too_recent, Duration::from_secs(10));
        let m = s.meta_config("1".into());
        assert_eq!(m.test_event_code.as_deref(), Some("TEST123"));
        assert_eq!(m.base_url, "http://127.0.0.1:9100");
    }
}
