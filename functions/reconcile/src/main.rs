//! The reconcile Lambda (EventBridge schedule). The sweep and the report are not built yet:
//! until then each scheduled run only logs that it ran.

use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde_json::Value;

async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    tracing::warn!(request_id = %event.context.request_id, "reconcile not implemented yet");
    Ok(serde_json::json!({"status": "not_implemented"}))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    lambda_runtime::run(service_fn(handler)).await
}
