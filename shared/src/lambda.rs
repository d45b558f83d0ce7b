//! Lambda trigger shapes to and from the core: SQS records in, `batchItemFailures` out.

use crate::delivery::pipeline::{BatchReport, Record};
use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};

pub fn sqs_records(event: SqsEvent) -> Vec<Record> {
    event
        .records
        .into_iter()
        .map(|r| Record {
            message_id: r.message_id.unwrap_or_default(),
            receipt: r.receipt_handle.unwrap_or_default(),
            body: r.body.unwrap_or_default(),
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
