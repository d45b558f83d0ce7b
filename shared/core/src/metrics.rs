//! CloudWatch Embedded Metric Format: metrics as one JSON log line, no API calls. CloudWatch
//! turns the line into metrics; the template's alarms watch them.

use serde_json::{Map, Value, json};

pub const NAMESPACE: &str = "ConversionBridge";

/// One EMF line with `metrics` (name, count) under the given dimensions.
pub fn emf_line(timestamp_ms: i64, dimensions: &[(&str, &str)], metrics: &[(&str, f64)]) -> String {
    line(timestamp_ms, dimensions, metrics, false)
}

/// Like [`emf_line`], and the same metrics also without any dimension: totals an alarm can
/// watch when the dimension's values (sources) are not known to the template.
pub fn emf_line_with_total(
    timestamp_ms: i64,
    dimensions: &[(&str, &str)],
    metrics: &[(&str, f64)],
) -> String {
    line(timestamp_ms, dimensions, metrics, true)
}

fn line(
    timestamp_ms: i64,
    dimensions: &[(&str, &str)],
    metrics: &[(&str, f64)],
    total: bool,
) -> String {
    let mut root = Map::new();
    let names: Vec<&str> = dimensions.iter().map(|(k, _)| *k).collect();
    let sets = if total {
        json!([names, []])
    } else {
        json!([names])
    };
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": sets,
                "Metrics": metrics.iter().map(|(n, _)| json!({"Name": n, "Unit": "Count"})).collect::<Vec<_>>(),
            }]
        }),
    );
    for (k, v) in dimensions {
        root.insert((*k).into(), json!(v));
    }
    for (n, v) in metrics {
        root.insert((*n).into(), json!(v));
    }
    Value::Object(root).to_string()
}

/// Writes the line to stdout, where the Lambda runtime sends it to CloudWatch Logs as is.
pub fn emit(line: &str) {
    println!("{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_valid_emf() {
        let line = emf_line(
            1_800_000_000_000,
            &[("destination", "meta")],
            &[("delivered", 3.0), ("config_errors", 1.0)],
        );
        let v: Value = serde_json::from_str(&line).unwrap();
        let m = &v["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(m["Namespace"], NAMESPACE);
        assert_eq!(m["Dimensions"], json!([["destination"]]));
        assert_eq!(
            m["Metrics"][1],
            json!({"Name": "config_errors", "Unit": "Count"})
        );
        assert_eq!(v["_aws"]["Timestamp"], 1_800_000_000_000i64);
        // Every metric and dimension named in the directive has a value at the root.
        assert_eq!(
            (
                v["destination"].as_str(),
                v["delivered"].as_f64(),
                v["config_errors"].as_f64()
            ),
            (Some("meta"), Some(3.0), Some(1.0))
        );
    }
}
