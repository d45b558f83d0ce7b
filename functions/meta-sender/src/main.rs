//! The Meta sender Lambda (SQS-triggered): delivers claimed events to the Conversions API.
//! Clients, the access token and the mapping are loaded once here, at init.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{Error, LambdaEvent, service_fn};
use shared::config::Settings;
use shared::delivery::Backoff;
use shared::delivery::pipeline::{PipelineConfig, process_batch};
use shared::destinations::meta::{MetaConfig, MetaPlatform};
use shared::queue::sqs::SqsQueue;
use shared::store::dynamodb::DynamoStore;
use shared::timestamp::Timestamp;
use std::time::Duration;

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let settings = Settings::from_env()?;
    let aws = shared::aws::sdk_config().await;
    let ssm = shared::aws::ssm(&aws);
    let token_param =
        env("META_ACCESS_TOKEN_PARAMETER").ok_or("META_ACCESS_TOKEN_PARAMETER is required")?;
    let access_token = shared::aws::parameter(&ssm, &token_param).await?;
    let app_secret = match env("META_APP_SECRET_PARAMETER") {
        Some(p) => Some(shared::aws::parameter(&ssm, &p).await?),
        None => None,
    };
    let cfg = MetaConfig {
        base_url: settings.endpoints.meta_graph_base_url.clone(),
        api_version: settings.endpoints.meta_api_version.clone(),
        pixel_id: env("META_PIXEL_ID").ok_or("META_PIXEL_ID is required")?,
        access_token,
        app_secret,
        test_event_code: env("META_TEST_EVENT_CODE"),
        timeout: Duration::from_secs(
            env("META_TIMEOUT_SECS")
                .and_then(|v| v.parse().ok())
                .unwrap_or(20),
        ),
    };
    let platform = MetaPlatform::new(reqwest::Client::new(), cfg, settings.mapping.clone());
    let store = DynamoStore::new(
        shared::aws::dynamodb(&aws),
        &settings.table_name,
        settings.retention_days,
    );
    let queue = SqsQueue::new(shared::aws::sqs(&aws), settings.queues.clone());
    let pipeline = PipelineConfig {
        lease_secs: settings.lease_secs,
        max_attempts: settings.max_attempts,
        backoff: Backoff::default(),
    };
    let (platform, store, queue, pipeline) = (&platform, &store, &queue, &pipeline);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        let records = shared::lambda::sqs_records(event.payload);
        let report =
            process_batch(records, platform, store, queue, pipeline, Timestamp::now()).await;
        Ok::<SqsBatchResponse, Error>(shared::lambda::batch_response(&report))
    }))
    .await
}
