//! The ingest function's HTTP layer: route, bound, authenticate, parse, hand the items to
//! `bridge_core::ingest`, and shape the response. Built once at init, called per request.

use bridge_aws::config::Settings;
use bridge_core::event::parse_event_json;
use bridge_core::ingest::{IngestConfig, IngestReport, Intake, ItemStatus, ingest};
use bridge_core::queue::DeliveryQueue;
use bridge_core::store::EventStore;
use bridge_core::timestamp::Timestamp;
use bridge_core::webhook::hubspot::{self, HubSpotRecords};
use bridge_core::webhook::signature::{self, SignatureError};
use bridge_core::webhook::{Incoming, salesforce, split_items};
use lambda_http::http::{HeaderMap, Method, StatusCode};
use lambda_http::{Body, Request, RequestExt, Response};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;

/// At most this many events in one request (the endpoint contract).
pub const MAX_ITEMS: usize = 500;

/// Everything a request needs, built once per execution environment.
pub struct App {
    pub settings: Settings,
    pub store: Arc<dyn EventStore>,
    pub queue: Arc<dyn DeliveryQueue>,
    /// Secrets by name: `<source>` is that source's `X-Bridge-Signature` secret,
    /// `hubspot-app-secret` verifies HubSpot's v3 signature.
    pub secrets: HashMap<String, String>,
    pub hubspot: Option<Arc<dyn HubSpotRecords>>,
    pub max_body_bytes: usize,
    /// The public base URL HubSpot calls (for its signature); else taken from the request.
    pub public_base_url: Option<String>,
    /// How HubSpot deliveries are checked: the account (portal id) served, the history window.
    pub hubspot_options: hubspot::ResolveOptions,
}

fn respond(status: StatusCode, body: Value) -> Response<Body> {
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        lambda_http::http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, field: &str, reason: impl Into<String>) -> Response<Body> {
    respond(
        status,
        json!({"error": {"field": field, "reason": reason.into()}}),
    )
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// `webhooks/<source>` anywhere in the path (a local front may add a prefix).
fn webhook_source(path: &str) -> Option<&str> {
    let (_, rest) = path.split_once("/webhooks/")?;
    let s = rest.trim_end_matches('/');
    (!s.is_empty() && !s.contains('/')).then_some(s)
}

impl App {
    pub fn ingest_config(&self) -> IngestConfig {
        IngestConfig {
            default_region: self.settings.default_region,
            max_future_skew_secs: self.settings.max_future_skew_secs,
        }
    }

    pub async fn handle(&self, req: Request) -> Response<Body> {
        // Lambda events carry the raw path; a request built elsewhere only has its URI.
        let path = match req.raw_http_path() {
            "" => req.uri().path().to_string(),
            p => p.to_string(),
        };
        // Until the caller is authenticated, the endpoint answers only 401, 404, 405, 413 or
        // 503, and says nothing about itself: no source echoed, no mapping version.
        if path.ends_with("/health") && req.method() == Method::GET {
            return respond(StatusCode::OK, json!({"status": "ok"}));
        }
        let Some(source) = webhook_source(&path).map(str::to_string) else {
            return error(StatusCode::NOT_FOUND, "path", "not found");
        };
        if req.method() != Method::POST {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method",
                "method not allowed",
            );
        }
        if self.settings.mapping.source(&source).is_none() {
            tracing::warn!(
                result = "unknown_source",
                "webhook for a source the mapping does not name"
            );
            return error(StatusCode::NOT_FOUND, "path", "not found");
        }
        let body: &[u8] = req.body().as_ref();
        if body.len() > self.max_body_bytes {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "$",
                format!("body over {} bytes", self.max_body_bytes),
            );
        }
        let now = Timestamp::now();
        let headers = req.headers();
        let hubspot_format =
            source == "hubspot" && header(headers, "x-hubspot-signature-v3").is_some();
        let auth = if hubspot_format {
            let secret = self.secrets.get("hubspot-app-secret").map(String::as_bytes);
            match secret {
                None => Err(SignatureError::NoSecret(
                    "hubspot (hubspot-app-secret)".into(),
                )),
                Some(s) => {
                    let uri = self.public_uri(&req);
                    signature::verify_hubspot(
                        s,
                        req.method().as_str(),
                        &uri,
                        body,
                        header(headers, "x-hubspot-signature-v3"),
                        header(headers, "x-hubspot-request-timestamp"),
                        now.unix_secs(),
                    )
                }
            }
        } else {
            match self.secrets.get(&source) {
                None => Err(SignatureError::NoSecret(source.clone())),
                Some(s) => signature::verify_bridge(
                    s.as_bytes(),
                    header(headers, "x-bridge-signature"),
                    body,
                    now.unix_secs(),
                ),
            }
        };
        if let Err(e) = auth {
            // The reason goes to the log only; the caller learns just the class.
            tracing::warn!(source = %source, result = "unauthorized", reason = %e, "webhook rejected");
            bridge_core::metrics::emit(&bridge_core::metrics::emf_line_with_total(
                now.unix_ms(),
                &[("source", source.as_str())],
                &[("unauthorized", 1.0)],
            ));
            return match e {
                // A missing secret is our configuration: the caller should retry later.
                SignatureError::NoSecret(_) => error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "$",
                    "unavailable; retry later",
                ),
                _ => error(StatusCode::UNAUTHORIZED, "signature", "not authenticated"),
            };
        }
        let Ok(text) = std::str::from_utf8(body) else {
            return error(StatusCode::BAD_REQUEST, "$", "the body is not UTF-8");
        };
        let mapping = &self.settings.mapping;
        let (items, batch): (Vec<Incoming>, bool) = if hubspot_format {
            let Some(api) = &self.hubspot else {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "hubspot",
                    "no HubSpot API token is configured (hubspot-token)",
                );
            };
            match hubspot::parse_delivery(text, MAX_ITEMS) {
                Ok(events) => {
                    // Changes already stored are answered without reading the CRM.
                    let keys: Vec<String> = events
                        .iter()
                        .filter_map(|e| hubspot::event_key(e, mapping))
                        .collect();
                    let stored: std::collections::HashSet<String> = match self
                        .store
                        .get_many(&keys)
                        .await
                    {
                        Ok(found) => found.into_iter().map(|e| e.key).collect(),
                        Err(e) => {
                            tracing::warn!(error = %e, "store read failed; every change is read from the CRM");
                            Default::default()
                        }
                    };
                    let items = hubspot::resolve(
                        &events,
                        api.as_ref(),
                        mapping,
                        &self.hubspot_options,
                        &stored,
                    )
                    .await;
                    (items, true)
                }
                Err(e) => return error(StatusCode::BAD_REQUEST, &e.field, e.reason),
            }
        } else {
            match split_items(text, MAX_ITEMS) {
                Ok((raw, batch)) => {
                    let items = raw
                        .into_iter()
                        .map(|r| {
                            if source == "salesforce" {
                                salesforce::parse_item(r, &source, mapping)
                            } else {
                                match parse_event_json(r) {
                                    Ok(i) => Incoming::Event(Box::new(i)),
                                    Err(e) => Incoming::Invalid(e),
                                }
                            }
                        })
                        .collect();
                    (items, batch)
                }
                Err(e) => return error(StatusCode::BAD_REQUEST, &e.field, e.reason),
            }
        };
        let cfg = self.ingest_config();
        let to = Intake::new(mapping, &cfg, self.store.as_ref(), self.queue.as_ref());
        let report = ingest(items, &source, to, now).await;
        bridge_core::metrics::emit(&ingest_metrics(&report, &source, now.unix_ms()));
        shape(report, batch)
    }

    fn public_uri(&self, req: &Request) -> String {
        let path_and_query = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default();
        match &self.public_base_url {
            Some(base) => format!("{}{}", base.trim_end_matches('/'), path_and_query),
            None => {
                let proto = header(req.headers(), "x-forwarded-proto").unwrap_or("https");
                let host = header(req.headers(), "host").unwrap_or_default();
                format!("{proto}://{host}{path_and_query}")
            }
        }
    }
}

/// One EMF line per webhook delivery: items by result, and consent blocks per destination
/// (`blocked_consent` with the destination dimension, as the senders report theirs).
fn ingest_metrics(report: &IngestReport, source: &str, timestamp_ms: i64) -> String {
    use bridge_core::delivery::{DeliveryStatus, Destination};
    let count = |s: ItemStatus| report.results.iter().filter(|r| r.status == s).count() as f64;
    let blocked = |d: Destination| {
        report
            .results
            .iter()
            .filter(|r| r.destinations.get(&d) == Some(&DeliveryStatus::BlockedConsent))
            .count() as f64
    };
    bridge_core::metrics::emf_line_with_total(
        timestamp_ms,
        &[("source", source)],
        &[
            ("enqueue_failures", report.enqueue_failures as f64),
            ("accepted", count(ItemStatus::Accepted)),
            ("duplicate", count(ItemStatus::Duplicate)),
            ("invalid", count(ItemStatus::Invalid)),
            ("unmapped", count(ItemStatus::Unmapped)),
            ("ignored", count(ItemStatus::Ignored)),
            ("erased", count(ItemStatus::Erased)),
            ("unavailable", count(ItemStatus::Unavailable)),
            ("blocked_consent_meta", blocked(Destination::Meta)),
            ("blocked_consent_google", blocked(Destination::Google)),
        ],
    )
}

/// Status codes: 202 when something new was stored, 200 for duplicates and unmapped stages,
/// 400 when nothing was valid, 207 for a batch that mixes valid and invalid items, and 503
/// whenever an item could not be stored (the CRM retries; stored items then dedupe).
fn shape(report: IngestReport, batch: bool) -> Response<Body> {
    let any = |s| report.any(s);
    let status = if let Some(secs) = report.retry_after_secs {
        // HubSpot throttled our reads: the CRM's retry should come after its window.
        let body = json!({"results": report.results});
        let mut r = respond(StatusCode::TOO_MANY_REQUESTS, body);
        if let Ok(v) = lambda_http::http::HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert("retry-after", v);
        }
        return r;
    } else if any(ItemStatus::Unavailable) {
        StatusCode::SERVICE_UNAVAILABLE
    } else if report
        .results
        .iter()
        .all(|r| r.status == ItemStatus::Invalid)
    {
        StatusCode::BAD_REQUEST
    } else if any(ItemStatus::Invalid) {
        StatusCode::MULTI_STATUS
    } else if any(ItemStatus::Accepted) {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let body = if batch {
        json!({"results": report.results})
    } else {
        serde_json::to_value(&report.results[0]).unwrap_or(Value::Null)
    };
    respond(status, body)
}

#[cfg(test)]
mod tests {
    use bridge_core::mapping::Mapping;
    use bridge_core::webhook::{Incoming, hubspot, salesforce, split_items};

    fn sample(name: &str) -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../events/webhooks/");
        std::fs::read_to_string(format!("{path}{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// The samples in events/ are documentation: keep them readable by the real parsers.
    #[test]
    fn sample_webhooks_parse_as_documented() {
        let mapping = Mapping::bundled().unwrap();
        for (name, invalid_items) in [
            ("generic-lead.json", 0),
            ("generic-batch-mixed.json", 0),
            ("hubspot-refund.json", 0),
        ] {
            let body = sample(name);
            let (items, _) = split_items(&body, 500).unwrap();
            let bad = items
                .iter()
                .filter(|i| bridge_core::event::parse_event_json(i).is_err())
                .count();
            assert_eq!(bad, invalid_items, "{name}");
        }
        let body = sample("salesforce-closed-won.json");
        assert!(matches!(
            salesforce::parse_item(&body, "salesforce", &mapping),
            Incoming::Event(_)
        ));
        let body = sample("salesforce-lead-status.json");
        let (items, _) = split_items(&body, 500).unwrap();
        let parsed: Vec<_> = items
            .iter()
            .map(|i| salesforce::parse_item(i, "salesforce", &mapping))
            .collect();
        assert!(matches!(parsed[0], Incoming::Event(_)));
        assert!(matches!(parsed[1], Incoming::Unmapped { .. }));
        assert_eq!(
            hubspot::parse_delivery(&sample("hubspot-delivery.json"), 500)
                .unwrap()
                .len(),
            2
        );
        for f in [
            "function-url-generic-lead.json",
            "function-url-health.json",
            "sqs-meta-batch.json",
        ] {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../events/lambda/");
            let text = std::fs::read_to_string(format!("{path}{f}")).unwrap();
            serde_json::from_str::<serde_json::Value>(&text).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }
}
