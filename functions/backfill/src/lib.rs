//! The backfill CLI's real run, as a library so the end-to-end test drives it too: the JSONL
//! lines posted, signed, through the ingest endpoint.

use bridge_core::timestamp::Timestamp;
use serde_json::{Value, json};

pub mod progress;

/// A real run: posts the lines, signed with the source's `secret`, in batches of 100 to
/// `{url}/webhooks/{source}`; returns the counts per item status and the invalid lines.
pub async fn load(url: &str, source: &str, text: &str, secret: &str) -> Result<Value, String> {
    let http = bridge_platforms::http::client().map_err(|e| e.to_string())?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
    let mut problems = Vec::new();
    let mut bar = progress::Progress::new("posting", lines.len() as u64);
    for (b, chunk) in lines.chunks(100).enumerate() {
        let body = format!("[{}]", chunk.join(","));
        let t = Timestamp::now().unix_secs();
        let sig =
            bridge_core::webhook::signature::bridge_sign(secret.as_bytes(), t, body.as_bytes());
        let resp = http
            .post(format!("{}/webhooks/{source}", url.trim_end_matches('/')))
            .header("content-type", "application/json")
            .header("x-bridge-signature", sig)
            .body(body)
            .send()
            .await
            .map_err(|e| format!("batch {b}: {}", bridge_platforms::http::error_text(e)))?;
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if status == 503 || status == 401 || status == 413 {
            return Err(format!(
                "batch {b} (lines {}..): HTTP {status} {v}; rerun: stored lines dedupe",
                b * 100 + 1
            ));
        }
        for r in v["results"].as_array().into_iter().flatten() {
            let s = r["status"].as_str().unwrap_or("?").to_string();
            if s == "invalid" {
                problems.push(json!({"line": b * 100 + r["index"].as_u64().unwrap_or(0) as usize + 1, "errors": r["errors"]}));
            }
            *counts.entry(s).or_insert(0) += 1;
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish();
    eprintln!("{:<12} {:>8}", "status", "lines");
    for (status, n) in &counts {
        eprintln!("{status:<12} {n:>8}");
    }
    Ok(json!({"mode": "load", "results": counts, "invalid": problems}))
}
