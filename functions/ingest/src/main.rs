//! The ingest Lambda (Function URL): CRM webhooks in, stored and enqueued events out.
//! Clients, secrets and the mapping are loaded once here, at init.

use bridge_aws::config::Settings;
use bridge_aws::dynamodb::DynamoStore;
use bridge_aws::sqs::SqsQueue;
use bridge_core::webhook::hubspot::HubSpotRecords;
use bridge_platforms::config::{parse_num, parse_url};
use bridge_platforms::hubspot::HubSpotClient;
use ingest::App;
use lambda_http::{Error, service_fn};
use std::sync::Arc;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let aws = bridge_aws::lambda::start().await?;
    // Pay phonenumber's lazy metadata load during init, not on the first request, on its own
    // thread.
    let warm = tokio::task::spawn_blocking(bridge_core::identity::warm_up);
    // The secrets are read (one SSM round trip per cold start) while the rest is built. Ingest
    // cannot take a request before: every webhook's signature is checked first.
    let secrets = tokio::spawn({
        let ssm = bridge_aws::clients::ssm(&aws);
        let path = std::env::var("WEBHOOK_SECRETS_PARAMETER_PATH").ok();
        async move {
            let Some(path) = path else {
                return Ok(Default::default());
            };
            let read = bridge_aws::clients::parameters_by_path(&ssm, &path);
            let what = format!("SSM GetParametersByPath {path}");
            Ok::<_, Error>(bridge_aws::clients::within_read_timeout(&what, read).await??)
        }
    });
    let settings = Settings::from_env()?;
    let store = Arc::new(DynamoStore::new(
        bridge_aws::clients::dynamodb(&aws),
        &settings.table_name,
        settings.retention_days,
    ));
    let queue = Arc::new(SqsQueue::new(
        bridge_aws::clients::sqs(&aws),
        settings.queues.clone(),
    ));
    let http = bridge_platforms::http::builder()
        .connect_timeout(bridge_platforms::hubspot::CONNECT_TIMEOUT)
        .build()?;
    let lookup = bridge_aws::lambda::env;
    let hubspot_base = parse_url(&lookup, "HUBSPOT_API_BASE_URL", "https://api.hubapi.com")?;
    let secrets = secrets.await??;
    let hubspot: Option<Arc<dyn HubSpotRecords>> = secrets.get("hubspot-token").map(|token| {
        Arc::new(HubSpotClient::new(
            http.clone(),
            hubspot_base,
            token.clone(),
        )) as Arc<dyn HubSpotRecords>
    });
    let portal_id = match std::env::var("HUBSPOT_PORTAL_ID") {
        Ok(v) if !v.trim().is_empty() => Some(
            v.trim()
                .parse::<i64>()
                .map_err(|_| "HUBSPOT_PORTAL_ID must be a HubSpot account id (digits)")?,
        ),
        _ => None,
    };
    if secrets.contains_key("hubspot-app-secret") && portal_id.is_none() {
        // Without it, any HubSpot account's webhook signed by this app would be trusted.
        return Err("HUBSPOT_PORTAL_ID is required when hubspot-app-secret is configured".into());
    }
    let app = App {
        store,
        queue,
        secrets,
        hubspot,
        // A function URL takes at most 6 MB per request.
        max_body_bytes: parse_num(&lookup, "MAX_BODY_BYTES", 1 << 20, 1024, 6 << 20)?,
        public_base_url: std::env::var("PUBLIC_BASE_URL").ok(),
        hubspot_options: bridge_core::webhook::hubspot::ResolveOptions {
            portal_id,
            ..Default::default()
        },
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
