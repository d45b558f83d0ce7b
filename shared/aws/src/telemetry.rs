//! Structured logging: JSON lines in Lambda (CloudWatch parses them), readable text on a
//! terminal. Log fields carry ids and outcomes, never raw identifiers.

use tracing_subscriber::EnvFilter;

/// The crates whose events are logged at the chosen level; every other crate (the AWS SDK,
/// hyper, reqwest...) logs warnings and errors only, so no dependency's debug output can print
/// a URL, a header or a body.
const OURS: &[&str] = &[
    "bridge_core",
    "bridge_aws",
    "bridge_platforms",
    "bridge_ingest",
    "ingest",
    "bridge_meta_sender",
    "bridge_google_sender",
    "bridge_reconcile",
    "bridge_backfill",
    "backfill",
];

/// The filter for one level knob: Lambda's `AWS_LAMBDA_LOG_LEVEL` (set from the function's
/// ApplicationLogLevel, the template's one `LogLevel`), else `RUST_LOG`, else `info`. A bare
/// level applies to the project's crates only; full directives (`a=debug,b=info`) are taken as
/// written, for a developer who asks for them.
pub fn filter(knob: Option<&str>) -> EnvFilter {
    let level = knob
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .unwrap_or("info");
    if level.contains('=') || level.contains(',') {
        return EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    }
    let level = match level.to_ascii_lowercase().as_str() {
        l @ ("trace" | "debug" | "info" | "warn" | "error") => l.to_string(),
        "fatal" => "error".to_string(),
        _ => "info".to_string(),
    };
    let mut directives = vec!["warn".to_string()];
    directives.extend(OURS.iter().map(|c| format!("{c}={level}")));
    EnvFilter::try_new(directives.join(",")).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber once per process. `LOG_FORMAT=text` forces readable output,
/// `json` forces JSON.
pub fn init() {
    let knob = std::env::var("AWS_LAMBDA_LOG_LEVEL")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok();
    let json = match std::env::var("LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => std::env::var("AWS_LAMBDA_FUNCTION_NAME").is_ok(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(knob.as_deref()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_level_reaches_only_the_projects_crates() {
        let f = filter(Some("DEBUG")).to_string();
        assert!(f.ends_with(",warn") || f.starts_with("warn"), "{f}");
        assert!(f.contains("bridge_core=debug"), "{f}");
        assert!(!f.contains("hyper"), "{f}");
        assert_eq!(filter(Some("hyper=trace")).to_string(), "hyper=trace");
        assert!(filter(None).to_string().contains("bridge_aws=info"));
    }
}
