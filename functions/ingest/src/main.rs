//! The ingest Lambda (Function URL): CRM webhooks in. Its handler is not built yet: until
//! then it answers /health and refuses webhooks with 503 so a CRM retries later instead of
//! believing an event was recorded.

use lambda_http::{Body, Error, Request, Response, service_fn};

async fn handler(req: Request) -> Result<Response<Body>, Error> {
    let (status, body) = match req.uri().path() {
        "/health" => (200, r#"{"status":"ok"}"#),
        _ => (503, r#"{"error":"ingest is not available yet"}"#),
    };
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body))?)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    shared::identity::warm_up();
    lambda_http::run(service_fn(handler)).await
}
