//! The ingest Lambda (Function URL): CRM webhooks in, stored and enqueued events out.
//! Clients, secrets and the mapping are loaded once here, at init.

use ingest::App;
use lambda_http::{Error, service_fn};
use shared::config::Settings;
use shared::queue::sqs::SqsQueue;
use shared::store::dynamodb::DynamoStore;
use shared::webhook::hubspot::{HubSpotClient, HubSpotRecords};
use std::sync::Arc;

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    // Pay phonenumber's lazy metadata load (tens of ms) during init, not on the first request,
    // and on its own thread so it overlaps the network-bound SDK and SSM setup below.
    let warm = tokio::task::spawn_blocking(shared::identity::warm_up);
    let settings = Settings::from_env()?;
    let aws = shared::aws::sdk_config().await;
    let secrets = match std::env::var("WEBHOOK_SECRETS_PARAMETER_PATH") {
        Ok(path) => shared::aws::parameters_by_path(&shared::aws::ssm(&aws), &path).await?,
        Err(_) => Default::default(),
    };
    let hubspot: Option<Arc<dyn HubSpotRecords>> = secrets.get("hubspot-token").map(|token| {
        let base = std::env::var("HUBSPOT_API_BASE_URL")
            .unwrap_or_else(|_| "https://api.hubapi.com".into());
        Arc::new(HubSpotClient::new(
            reqwest::Client::new(),
            base,
            token.clone(),
        )) as Arc<dyn HubSpotRecords>
    });
    let app = App {
        store: Arc::new(DynamoStore::new(
            shared::aws::dynamodb(&aws),
            &settings.table_name,
            settings.retention_days,
        )),
        queue: Arc::new(SqsQueue::new(
            shared::aws::sqs(&aws),
            settings.queues.clone(),
        )),
        secrets,
        hubspot,
        max_body_bytes: std::env::var("MAX_BODY_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1 << 20),
        public_base_url: std::env::var("PUBLIC_BASE_URL").ok(),
        settings,
    };
    warm.await?;
    tracing::info!(mapping_version = %app.settings.mapping.version, sources = app.settings.mapping.sources.len(), "ingest ready");
    let app = &app;
    lambda_http::run(service_fn(move |req| async move {
        Ok::<_, Error>(app.handle(req).await)
    }))
    .await
}
