//! The Google sender Lambda (SQS-triggered). Its delivery handler is not built yet: until then
//! it reports every record as a batch item failure, so SQS keeps each message (and, after
//! maxReceiveCount, moves it to the DLQ) and nothing is lost or falsely acknowledged.

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use lambda_runtime::{Error, LambdaEvent, service_fn};

async fn handler(event: LambdaEvent<SqsEvent>) -> Result<SqsBatchResponse, Error> {
    let mut response = SqsBatchResponse::default();
    for record in event.payload.records {
        let mut failure = BatchItemFailure::default();
        failure.item_identifier = record.message_id.unwrap_or_default();
        response.batch_item_failures.push(failure);
    }
    tracing::error!(
        count = response.batch_item_failures.len(),
        "sender not implemented yet: records left on the queue"
    );
    Ok(response)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    lambda_runtime::run(service_fn(handler)).await
}
