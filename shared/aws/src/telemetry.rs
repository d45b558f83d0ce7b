//! Structured logging: JSON lines in Lambda (CloudWatch parses them), readable text on a
//! terminal. Log fields carry ids and outcomes, never raw identifiers.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber once per process; the level comes from `RUST_LOG`
/// (default `info`). `LOG_FORMAT=text` forces readable output, `json` forces JSON.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match std::env::var("LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => std::env::var("AWS_LAMBDA_FUNCTION_NAME").is_ok(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .without_time()
            .try_init()
    } else {
        builder.with_ansi(false).try_init()
    };
}
