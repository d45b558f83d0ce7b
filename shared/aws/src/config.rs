//! Environment to typed settings: table, queues, tuning knobs, and the platforms' own settings
//! (base URLs, versions, timeouts: `bridge_platforms::config`). Every bad value is an error
//! naming its variable, at init.

use crate::sqs::QueueUrls;
use bridge_core::delivery::Destination;
use bridge_core::mapping::{Mapping, MappingErrors};
use bridge_platforms::config::{InvalidVar, PlatformSettings, parse_num};
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Invalid(#[from] InvalidVar),
    #[error("mapping file {path}: {source}")]
    MappingFile {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Mapping(#[from] MappingErrors),
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub table_name: String,
    pub queues: BTreeMap<Destination, QueueUrls>,
    pub default_region: phonenumber::country::Id,
    pub max_future_skew_secs: i64,
    pub retention_days: i64,
    pub lease_secs: i64,
    pub max_attempts: u32,
    /// Backoff: the first retry waits up to this long, doubling per attempt up to the cap.
    pub retry_base_secs: u64,
    pub retry_cap_secs: u64,
    /// How long a refund whose won event is not delivered yet waits before looking again.
    pub refund_wait_secs: u64,
    /// How long a pair may wait for something else (a refund for its won) before it ends.
    pub wait_deadline_secs: u64,
    /// The sender function's own timeout, when the template states it: sends are checked to
    /// fit in it at init.
    pub sender_timeout_secs: Option<u64>,
    /// Base URLs, API versions, timeouts and dry-run switches of Meta and Google.
    pub platforms: PlatformSettings,
    pub mapping: Mapping,
}

impl Settings {
    pub fn from_env() -> Result<Settings, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// Reads settings through `get`, so tests need not touch the process environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
        let table_name = get("TABLE_NAME").ok_or(InvalidVar {
            var: "TABLE_NAME",
            reason: "is required".into(),
        })?;
        let mut queues = BTreeMap::new();
        for (d, qv, dv) in [
            (Destination::Meta, "META_QUEUE_URL", "META_DLQ_URL"),
            (Destination::Google, "GOOGLE_QUEUE_URL", "GOOGLE_DLQ_URL"),
        ] {
            if let Some(queue) = get(qv) {
                queues.insert(
                    d,
                    QueueUrls {
                        queue,
                        dlq: get(dv),
                    },
                );
            }
        }
        let region_code = get("DEFAULT_PHONE_REGION").unwrap_or_else(|| "US".into());
        let default_region =
            bridge_core::identity::parse_region(&region_code).ok_or(InvalidVar {
                var: "DEFAULT_PHONE_REGION",
                reason: "must be an ISO 3166-1 alpha-2 region such as US or GB".into(),
            })?;
        let mapping = match get("MAPPING_PATH") {
            Some(path) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|source| ConfigError::MappingFile { path, source })?;
                Mapping::load(&text)?
            }
            None => Mapping::bundled()?,
        };
        Ok(Settings {
            table_name,
            queues,
            default_region,
            max_future_skew_secs: parse_num(&get, "MAX_FUTURE_SKEW_SECS", 300, 0, 86_400)?,
            retention_days: parse_num(&get, "EVENT_RETENTION_DAYS", 400, 1, 3650)?,
            lease_secs: parse_num(&get, "LEASE_SECS", 120, 5, 900)?,
            max_attempts: parse_num(&get, "MAX_ATTEMPTS", 8, 1, 100)?,
            retry_base_secs: parse_num(&get, "RETRY_BASE_SECS", 30, 1, 3600)?,
            retry_cap_secs: parse_num(&get, "RETRY_CAP_SECS", 3600, 1, 43_200)?,
            refund_wait_secs: parse_num(&get, "REFUND_WAIT_SECS", 900, 1, 43_200)?,
            // Below the delivery queues' 7-day retention, or a waiting message would expire.
            wait_deadline_secs: parse_num(&get, "WAIT_DEADLINE_SECS", 259_200, 3600, 518_400)?,
            sender_timeout_secs: match get("SENDER_TIMEOUT_SECS") {
                Some(_) => Some(parse_num(&get, "SENDER_TIMEOUT_SECS", 60, 1, 900)?),
                None => None,
            },
            platforms: PlatformSettings::from_lookup(&get)?,
            mapping,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_platforms::config::lookup_in;

    #[test]
    fn defaults_follow_the_configuration_contract() {
        let s = Settings::from_lookup(lookup_in(&[
            ("TABLE_NAME", "t"),
            ("META_QUEUE_URL", "http://q/meta"),
        ]))
        .unwrap();
        assert_eq!(
            s.platforms.endpoints.meta_graph_base_url,
            "https://graph.facebook.com"
        );
        assert_eq!(s.platforms.endpoints.meta_api_version, "v26.0");
        assert_eq!(s.platforms.endpoints.google_ads_api_version, "v26");
        assert_eq!(
            s.platforms.endpoints.google_oauth_token_url,
            "https://oauth2.googleapis.com/token"
        );
        assert_eq!(s.queues[&Destination::Meta].queue, "http://q/meta");
        assert!(!s.queues.contains_key(&Destination::Google));
        assert_eq!(s.default_region, phonenumber::country::Id::US);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = Settings::from_lookup(lookup_in(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("TABLE_NAME"), "{e}");
        let e = Settings::from_lookup(lookup_in(&[("TABLE_NAME", "t"), ("LEASE_SECS", "forever")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("LEASE_SECS"), "{e}");
        let e = Settings::from_lookup(lookup_in(&[
            ("TABLE_NAME", "t"),
            ("META_GRAPH_BASE_URL", "graph"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("META_GRAPH_BASE_URL"), "{e}");
        let e = Settings::from_lookup(lookup_in(&[
            ("TABLE_NAME", "t"),
            ("DEFAULT_PHONE_REGION", "XX"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("DEFAULT_PHONE_REGION"), "{e}");
    }

    #[test]
    fn base_urls_are_overridable() {
        let s = Settings::from_lookup(lookup_in(&[
            ("TABLE_NAME", "t"),
            ("META_GRAPH_BASE_URL", "http://127.0.0.1:9100/"),
        ]))
        .unwrap();
        assert_eq!(
            s.platforms.endpoints.meta_graph_base_url,
            "http://127.0.0.1:9100"
        );
    }
}
