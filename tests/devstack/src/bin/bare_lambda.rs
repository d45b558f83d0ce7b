//! The cold-start baseline: a bare lambda_runtime function (echo the event), built with the
//! same profile as the bridge's functions, so `bridge-coldstart` can print each function's
//! cold start as a ratio of what any Rust Lambda pays.

use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(|e: LambdaEvent<Value>| async move {
        Ok::<Value, Error>(e.payload)
    }))
    .await
}
