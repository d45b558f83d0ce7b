//! The reconcile Lambda (EventBridge schedule): sweeps stuck pairs back onto their queues,
//! then writes the report (last day and rolling 7 days) as JSON and CSV to the reports
//! bucket, logs a summary and emits EMF metrics. With the system of record's API configured
//! (HubSpot's token, or Salesforce's OAuth client) the report also compares the CRM's own won
//! deals with the stored events (and with `CRM_REPAIR=true` ingests the deals whose webhooks
//! never arrived). Clients are built once here, at init.

use aws_sdk_s3::primitives::ByteStream;
use bridge_aws::config::Settings;
use bridge_aws::dynamodb::DynamoStore;
use bridge_aws::sqs::SqsQueue;
use bridge_core::delivery::Destination;
use bridge_core::ingest::IngestConfig;
use bridge_core::mapping::Mapping;
use bridge_core::reconcile::{
    CrmSection, Observations, build_report, data_manager_requests, fold_request_status, sweep,
};
use bridge_core::store::EventStore;
use bridge_core::timestamp::Timestamp;
use bridge_platforms::crm::CrmClient;
use bridge_platforms::google::{GoogleCredentials, GooglePlatform};
use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde_json::{Value, json};
use std::collections::BTreeMap;

const SWEEP_LIMIT: usize = 1000;
const PERIODS: [(&str, i64); 2] = [("last_day", 1), ("last_7_days", 7)];

struct App {
    store: DynamoStore,
    queue: SqsQueue,
    s3: aws_sdk_s3::Client,
    bucket: String,
    /// Set when Google credentials are configured: Data Manager request statuses are checked.
    google: Option<GooglePlatform>,
    /// Set when the system of record's API is configured: the report gets the CRM's own side.
    crm: Option<Crm>,
}

/// What the CRM side of the report needs.
struct Crm {
    /// The system of record's API (HubSpot or Salesforce).
    client: CrmClient,
    /// Ingest the deals whose webhooks never arrived (template parameter CrmRepair).
    repair: bool,
    mapping: Mapping,
    ingest: IngestConfig,
}

impl Crm {
    /// The CRM side for one period; a CRM that cannot be read leaves the section out (logged),
    /// never the rest of the report.
    async fn section(
        &self,
        store: &DynamoStore,
        queue: &SqsQueue,
        from: Timestamp,
        now: Timestamp,
    ) -> Option<CrmSection> {
        let check = match self
            .client
            .check(store, &self.mapping, from, now, now)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(source = self.client.source(), error = %e, "the CRM could not be reconciled");
                return None;
            }
        };
        let mut repaired = None;
        if self.repair && check.missed_count() > 0 {
            let report = self
                .client
                .repair(&check, &self.mapping, &self.ingest, now, store, queue)
                .await;
            let mut counts = BTreeMap::new();
            for r in &report.results {
                let status = serde_json::to_value(r.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                *counts.entry(status).or_insert(0u64) += 1;
            }
            tracing::info!(source = self.client.source(), repaired = ?counts, enqueue_failures = report.enqueue_failures, "missed webhooks repaired");
            repaired = Some(counts);
        }
        if self.repair
            && check
                .changed
                .iter()
                .any(|c| c.reason == "amount_changed_after_won")
        {
            // Lowered amounts become refunds of the difference, through the refund machinery.
            match bridge_core::crm_check::restate(&check, store, queue, now).await {
                Ok(r) => {
                    for (deal, reason) in &r.not_restated {
                        tracing::warn!(source = self.client.source(), order_id = %deal, reason = %reason, "amount change not restated");
                    }
                    let counts = repaired.get_or_insert_with(BTreeMap::new);
                    counts.insert("restated".into(), r.stored as u64);
                    counts.insert("restated_before".into(), r.existing as u64);
                    counts.insert("not_restated".into(), r.not_restated.len() as u64);
                }
                Err(e) => tracing::warn!(error = %e, "changed amounts could not be restated"),
            }
        }
        Some(CrmSection { check, repaired })
    }
}

/// At most this many Data Manager requests are checked per report.
const STATUS_CHECKS: usize = 200;

impl App {
    /// `with_crm`: the report also gets the CRM's own side (its own, slower schedule).
    async fn run(&self, now: Timestamp, with_crm: bool) -> Result<Value, Error> {
        let mut seen = Observations::default();
        for dest in Destination::ALL {
            let swept = sweep(&self.store, &self.queue, dest, now, SWEEP_LIMIT).await?;
            seen.sweeps.insert(dest, swept);
            if let Some(f) = self.queue.dead_letter_figures(dest, now).await {
                seen.queues.insert(dest, f);
            }
        }
        let mut written = Vec::new();
        for (period, days) in PERIODS {
            let from = now.minus_secs(days * 86_400);
            let events = self.store.events_between(from, now).await?;
            seen.platform_status.clear();
            if let Some(g) = &self.google {
                let mut counts = BTreeMap::new();
                for id in data_manager_requests(&events, from, now)
                    .iter()
                    .take(STATUS_CHECKS)
                {
                    match g.request_status(id).await {
                        Ok(v) => fold_request_status(&mut counts, &v),
                        Err(o) => {
                            tracing::warn!(request_id = %id, outcome = o.result().as_str(), "requestStatus:retrieve failed");
                            *counts.entry("status:unavailable".to_string()).or_insert(0) += 1;
                        }
                    }
                }
                if !counts.is_empty() {
                    seen.platform_status.insert(Destination::Google, counts);
                }
            }
            let mut report = build_report(period, from, now, now, &events, &seen);
            if let Some(crm) = self.crm.as_ref().filter(|_| with_crm) {
                report.crm = crm.section(&self.store, &self.queue, from, now).await;
            }
            let stem = format!("reports/{period}/{}", now.canonical());
            for (ext, body, ctype) in [
                ("json", report.to_json(), "application/json"),
                ("csv", report.to_csv(), "text/csv"),
                ("html", report.to_html(), "text/html; charset=utf-8"),
            ] {
                let key = format!("{stem}.{ext}");
                self.s3
                    .put_object()
                    .bucket(&self.bucket)
                    .key(&key)
                    .content_type(ctype)
                    .body(ByteStream::from(body.into_bytes()))
                    .send()
                    .await?;
                written.push(key);
            }
            for line in report.metrics_lines(now.unix_ms()) {
                bridge_core::metrics::emit(&line);
            }
            for (d, f) in &report.destinations {
                for (currency, c) in &f.currencies {
                    tracing::info!(period, destination = %d, currency = %currency, crm_revenue = %c.crm_revenue,
                        delivered_revenue = %c.delivered_revenue, difference = %c.difference,
                        explained_by = c.explained_by.len(), dead_letter_depth = f.dead_letter_queue.depth,
                        re_enqueued = f.sweep.re_enqueued, "reconciliation");
                }
            }
        }
        Ok(json!({"swept": seen.sweeps, "reports": written}))
    }
}

/// The schedule's own time, so a re-run of the same event writes the same report.
fn event_time(v: &Value) -> Timestamp {
    v["time"]
        .as_str()
        .and_then(|t| Timestamp::parse_rfc3339(t).ok())
        .unwrap_or_else(Timestamp::now)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    bridge_aws::telemetry::init();
    let settings = Settings::from_env()?;
    let aws = bridge_aws::clients::sdk_config().await;
    let bucket = std::env::var("REPORTS_BUCKET").map_err(|_| "REPORTS_BUCKET is required")?;
    // Emulators serve buckets by path, not by virtual host.
    let path_style =
        std::env::var("AWS_ENDPOINT_URL").is_ok() || std::env::var("AWS_ENDPOINT_URL_S3").is_ok();
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&aws)
            .force_path_style(path_style)
            .build(),
    );
    let http = bridge_platforms::http::client()?;
    let google = match std::env::var("GOOGLE_CREDENTIALS_PARAMETER")
        .ok()
        .filter(|v| !v.is_empty())
    {
        Some(param) => {
            let ssm = bridge_aws::clients::ssm(&aws);
            // Without Google (or its credentials) the report simply has no platform status.
            let read = match bridge_aws::clients::parameter(&ssm, &param).await {
                Ok(text) => GoogleCredentials::from_json(&text).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let credentials = match read {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(parameter = %param, error = %e, "no Google credentials: Data Manager statuses are not checked");
                    None
                }
            };
            credentials.map(|credentials| {
                GooglePlatform::new(
                    http.clone(),
                    settings.platforms.google_config(credentials),
                    settings.mapping.clone(),
                )
            })
        }
        None => None,
    };
    let crm = match std::env::var("WEBHOOK_SECRETS_PARAMETER_PATH")
        .ok()
        .filter(|v| !v.is_empty())
    {
        Some(path) => {
            let ssm = bridge_aws::clients::ssm(&aws);
            match bridge_aws::clients::parameters_by_path(&ssm, &path).await {
                Ok(secrets) => {
                    let repair = match std::env::var("CRM_REPAIR").as_deref() {
                        Ok("true") => true,
                        Ok("false") | Err(_) => false,
                        Ok(other) => {
                            return Err(
                                format!("CRM_REPAIR must be true or false, not {other}").into()
                            );
                        }
                    };
                    let crm_http = bridge_platforms::http::builder()
                        .connect_timeout(bridge_platforms::hubspot::CONNECT_TIMEOUT)
                        .build()?;
                    CrmClient::from_secrets(
                        &settings.mapping,
                        &secrets,
                        |k| std::env::var(k).ok(),
                        crm_http,
                    )?
                    .map(|client| Crm {
                        client,
                        repair,
                        mapping: settings.mapping.clone(),
                        ingest: IngestConfig {
                            default_region: settings.default_region,
                            max_future_skew_secs: settings.max_future_skew_secs,
                        },
                    })
                }
                Err(e) => {
                    tracing::warn!(error = %e, "webhook secrets unreadable: the report has no CRM side");
                    None
                }
            }
        }
        None => None,
    };
    let app = App {
        crm,
        google,
        store: DynamoStore::new(
            bridge_aws::clients::dynamodb(&aws),
            &settings.table_name,
            settings.retention_days,
        ),
        queue: SqsQueue::new(bridge_aws::clients::sqs(&aws), settings.queues.clone()),
        s3,
        bucket,
    };
    let app = &app;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        if event.payload["task"] == "retention" {
            let report =
                bridge_core::privacy::apply_retention(&app.store, Timestamp::now()).await?;
            tracing::info!(
                browser_data_removed = report.browser_data_removed,
                click_ids_removed = report.click_ids_removed,
                "retention"
            );
            return Ok(serde_json::to_value(report)?);
        }
        let with_crm = event.payload["task"] == "crm";
        app.run(event_time(&event.payload), with_crm).await
    }))
    .await
}
