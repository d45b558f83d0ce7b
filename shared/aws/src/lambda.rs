//! Lambda trigger shapes to and from the core: SQS records in, `batchItemFailures` out.

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use bridge_core::delivery::pipeline::{BatchReport, Record};

pub fn sqs_records(event: SqsEvent) -> Vec<Record> {
    event
        .records
        .into_iter()
        .map(|r| Record {
            message_id: r.message_id.unwrap_or_default(),
            receipt: r.receipt_handle.unwrap_or_default(),
            body: r.body.unwrap_or_default(),
            attributes: r
                .message_attributes
                .into_iter()
                .filter_map(|(k, v)| Some((k, v.string_value?)))
                .collect(),
        })
        .collect()
}

/// Only the listed messages stay on the queue; the event source mapping deletes the rest.
pub fn batch_response(report: &BatchReport) -> SqsBatchResponse {
    let mut resp = SqsBatchResponse::default();
    for id in &report.failures {
        let mut f = BatchItemFailure::default();
        f.item_identifier = id.clone();
        resp.batch_item_failures.push(f);
    }
    resp
}

/// What every function builds first: telemetry, and the AWS SDK configuration from Lambda's
/// environment.
pub async fn start() -> Result<aws_config::SdkConfig, lambda_runtime::Error> {
    crate::telemetry::init();
    Ok(crate::clients::sdk_config().await?)
}

/// What a sender runs with: its settings (validated), and its store and queue clients.
pub struct SenderInit {
    pub settings: crate::config::Settings,
    pub store: crate::dynamodb::DynamoStore,
    pub queue: crate::sqs::SqsQueue,
}

impl SenderInit {
    pub fn new(aws: &aws_config::SdkConfig) -> Result<SenderInit, lambda_runtime::Error> {
        let settings = crate::config::Settings::from_env()?;
        let store = crate::dynamodb::DynamoStore::new(
            crate::clients::dynamodb(aws),
            &settings.table_name,
            settings.retention_days,
        );
        let queue = crate::sqs::SqsQueue::new(crate::clients::sqs(aws), settings.queues.clone());
        Ok(SenderInit {
            settings,
            store,
            queue,
        })
    }
}

/// Runs a sender Lambda: every SQS batch through `process_batch` for `platform`, with the
/// store, queue and pipeline settings built once at init.
pub async fn run_sender<P: bridge_core::delivery::pipeline::Platform>(
    platform: P,
    init: SenderInit,
) -> Result<(), lambda_runtime::Error> {
    use bridge_core::delivery::pipeline::{PipelineConfig, SEND_MARGIN, process_batch};
    let SenderInit {
        settings,
        store,
        queue,
    } = init;
    if let Some(timeout) = settings.sender_timeout_secs {
        // A send that cannot finish, and be recorded, inside the function's timeout would be
        // put off forever; a lease shorter than the function lets a second worker take over a
        // pair this one is still sending.
        let need = platform.request_timeout() + SEND_MARGIN;
        if need.as_secs() > timeout {
            return Err(format!(
                "SENDER_TIMEOUT_SECS ({timeout}) must be at least the platform request timeout plus {} s ({} s)",
                SEND_MARGIN.as_secs(),
                need.as_secs()
            )
            .into());
        }
        if u64::try_from(settings.lease_secs).unwrap_or(0) < timeout {
            return Err(format!(
                "LEASE_SECS ({}) must be at least SENDER_TIMEOUT_SECS ({timeout})",
                settings.lease_secs
            )
            .into());
        }
    }
    let pipeline = PipelineConfig {
        lease_secs: settings.lease_secs,
        max_attempts: settings.max_attempts,
        backoff: bridge_core::delivery::Backoff {
            base: std::time::Duration::from_secs(settings.retry_base_secs),
            cap: std::time::Duration::from_secs(settings.retry_cap_secs),
            ..bridge_core::delivery::Backoff::default()
        },
        refund_wait: std::time::Duration::from_secs(settings.refund_wait_secs),
        wait_deadline: std::time::Duration::from_secs(settings.wait_deadline_secs),
    };
    let (platform, store, queue, pipeline) = (&platform, &store, &queue, &pipeline);
    lambda_runtime::run(lambda_runtime::service_fn(
        move |event: lambda_runtime::LambdaEvent<SqsEvent>| async move {
            let records = sqs_records(event.payload);
            let now = bridge_core::timestamp::Timestamp::now();
            let invocation = bridge_core::delivery::pipeline::Invocation {
                now,
                deadline: deadline(event.context.deadline, now),
            };
            let report = process_batch(records, platform, store, queue, pipeline, invocation).await;
            Ok::<SqsBatchResponse, lambda_runtime::Error>(batch_response(&report))
        },
    ))
    .await
}

/// The invocation's deadline (Lambda gives it in Unix milliseconds) as a monotonic instant.
fn deadline(
    deadline_ms: u64,
    now: bridge_core::timestamp::Timestamp,
) -> Option<std::time::Instant> {
    let left = i64::try_from(deadline_ms)
        .ok()?
        .checked_sub(now.unix_ms())?;
    let left = u64::try_from(left).unwrap_or(0);
    std::time::Instant::now().checked_add(std::time::Duration::from_millis(left))
}

/// An environment variable that is set to something (blank counts as unset).
pub fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.trim().is_empty())
}

/// A variable the function cannot start without: its value, or an error naming it.
pub fn required(k: &str) -> Result<String, lambda_runtime::Error> {
    env(k).ok_or_else(|| format!("{k} is required").into())
}
