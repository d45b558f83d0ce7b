//! The reconcile Lambda (EventBridge schedule): wiring only. The run itself (sweep, the
//! report per period as JSON, CSV and HTML, metrics, and on its own schedule the CRM's side,
//! repaired with `CRM_REPAIR=true`) is `bridge_core::reconcile::run`, over DynamoDB, SQS,
//! the reports bucket, Google's Data Manager statuses and the system of record's API, each
//! built once here at init. `{"task": "retention"}` applies the retention rules instead.

use bridge_aws::config::Settings;
use bridge_aws::dynamodb::DynamoStore;
use bridge_aws::lambda::{env, required};
use bridge_aws::s3::S3Sink;
use bridge_aws::sqs::SqsQueue;
use bridge_core::ingest::IngestConfig;
use bridge_core::reconcile::run::{CrmSide, Ports, RequestStatus, run};
use bridge_core::timestamp::Timestamp;
use bridge_platforms::config::parse_flag;
use bridge_platforms::crm::CrmClient;
use bridge_platforms::google::{GoogleCredentials, GooglePlatform};
use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde_json::Value;
use std::collections::HashMap;

/// The schedule's own time, so a re-run of the same event writes the same report.
fn event_time(v: &Value) -> Timestamp {
    v["time"]
        .as_str()
        .and_then(|t| Timestamp::parse_rfc3339(t).ok())
        .unwrap_or_else(Timestamp::now)
}

/// Google's client when its credentials are configured and readable: without them the report
/// simply has no Data Manager statuses.
async fn google(
    settings: &Settings,
    ssm: &aws_sdk_ssm::Client,
    http: &reqwest::Client,
) -> Option<GooglePlatform> {
    let param = env("GOOGLE_CREDENTIALS_PARAMETER")?;
    let read = match bridge_aws::clients::parameter(ssm, &param).await {
        Ok(text) => GoogleCredentials::from_json(&text).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match read {
        Ok(credentials) => Some(GooglePlatform::new(
            http.clone(),
            settings.platforms.google_config(credentials),
            settings.mapping.clone(),
        )),
        Err(e) => {
            tracing::warn!(parameter = %param, error = %e, "no Google credentials: Data Manager statuses are not checked");
            None
        }
    }
}

/// The system of record's client when its secret is configured under
/// `WEBHOOK_SECRETS_PARAMETER_PATH`; unreadable secrets leave the report without a CRM side.
async fn crm(settings: &Settings, ssm: &aws_sdk_ssm::Client) -> Result<Option<CrmClient>, Error> {
    let Some(path) = env("WEBHOOK_SECRETS_PARAMETER_PATH") else {
        return Ok(None);
    };
    let secrets: HashMap<String, String> = match bridge_aws::clients::parameters_by_path(ssm, &path)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "webhook secrets unreadable: the report has no CRM side");
            return Ok(None);
        }
    };
    let http = bridge_platforms::http::builder()
        .connect_timeout(bridge_platforms::hubspot::CONNECT_TIMEOUT)
        .build()?;
    Ok(CrmClient::from_secrets(
        &settings.mapping,
        &secrets,
        |k| std::env::var(k).ok(),
        http,
    )?)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    bridge_aws::telemetry::init();
    let settings = Settings::from_env()?;
    let repair = parse_flag(&env, "CRM_REPAIR", false)?;
    let bucket = required("REPORTS_BUCKET")?;
    let aws = bridge_aws::clients::sdk_config().await?;
    // Emulators serve buckets by path, not by virtual host.
    let path_style = env("AWS_ENDPOINT_URL").is_some() || env("AWS_ENDPOINT_URL_S3").is_some();
    let sink = S3Sink::new(&aws, bucket, path_style);
    let ssm = bridge_aws::clients::ssm(&aws);
    let http = bridge_platforms::http::client()?;
    let google = google(&settings, &ssm, &http).await;
    let crm = crm(&settings, &ssm).await?;
    let store = DynamoStore::new(
        bridge_aws::clients::dynamodb(&aws),
        &settings.table_name,
        settings.retention_days,
    );
    let queue = SqsQueue::new(bridge_aws::clients::sqs(&aws), settings.queues.clone());
    let ports = Ports {
        store: &store,
        queue: &queue,
        dead_letters: &queue,
        sink: &sink,
        google: google.as_ref().map(|g| g as &dyn RequestStatus),
        crm: crm.as_ref().map(|api| CrmSide {
            api,
            repair,
            mapping: &settings.mapping,
            ingest: IngestConfig {
                default_region: settings.default_region,
                max_future_skew_secs: settings.max_future_skew_secs,
            },
        }),
    };
    let (ports, store) = (&ports, &store);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        if event.payload["task"] == "retention" {
            let report = bridge_core::privacy::apply_retention(store, Timestamp::now()).await?;
            tracing::info!(
                browser_data_removed = report.browser_data_removed,
                click_ids_removed = report.click_ids_removed,
                "retention"
            );
            return Ok::<Value, Error>(serde_json::to_value(report)?);
        }
        let with_crm = event.payload["task"] == "crm";
        let summary = run(ports, event_time(&event.payload), with_crm).await?;
        Ok(serde_json::to_value(summary)?)
    }))
    .await
}
