//! Backfill dry run against the strict fakes: every request is a validation-only request
//! (Meta `test_event_code`, Google `validateOnly`), nothing is imported anywhere, and the
//! report says what would be sent and what would be rejected and why.

use bridge_core::backfill::{Checked, DryRunPlatform, dry_run, read_jsonl};
use bridge_core::ingest::IngestConfig;
use bridge_core::mapping::Mapping;
use bridge_core::timestamp::Timestamp;
use bridge_platforms::google::{GoogleConfig, GoogleCredentials, GooglePlatform};
use bridge_platforms::meta::{MetaAccess, MetaConfig, MetaPlatform};
use bridge_tests::fakes::google::FakeGoogle;
use bridge_tests::fakes::meta::FakeMeta;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn dry_run_validates_everything_and_imports_nothing() {
    let meta = FakeMeta::start("bf-token").await;
    let google = FakeGoogle::start().await;
    let mapping = Mapping::bundled().unwrap();
    let at = |h: i64| Timestamp::now().minus_secs(h * 3600).canonical();
    let granted = json!({"status": "granted"});
    let lines = [
        json!({"event_name": "lead", "occurred_at": at(5), "entity_type": "lead", "entity_id": "L1", "identity": {"email": "a@example.com"}, "consent": granted}),
        json!({"event_name": "won", "occurred_at": at(4), "entity_type": "opportunity", "entity_id": "D1", "order_id": "O1", "value": 100, "currency": "USD",
               "identity": {"email": "b@example.com", "gclid": "G1"}, "consent": granted}),
        json!({"event_name": "won", "occurred_at": at(4), "entity_type": "opportunity", "entity_id": "D2", "order_id": "O2", "value": 50, "currency": "USD",
               "identity": {"email": "c@example.com"}, "consent": granted}),
        json!({"event_name": "sql", "occurred_at": at(3), "entity_type": "lead", "entity_id": "L3", "identity": {"email": "d@example.com"}, "consent": {"status": "denied"}}),
    ];
    let mut text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    text.push_str("{\"event_name\": \"won\", \"occurred_at\": \"yesterday\"}\n\n");
    let meta_p = Checked(MetaPlatform::new(
        bridge_platforms::http::client().expect("HTTP client"),
        MetaConfig {
            base_url: meta.base_url.clone(),
            api_version: "v26.0".into(),
            pixel_id: "1234567890".into(),
            test_event_code: Some("TEST123".into()),
            timeout: Duration::from_secs(10),
        },
        mapping.clone(),
        MetaAccess::new("bf-token".into(), None),
    ));
    let google_p = Checked(GooglePlatform::new(
        bridge_platforms::http::client().expect("HTTP client"),
        GoogleConfig {
            ads_base_url: google.base_url.clone(),
            ads_api_version: "v26".into(),
            datamanager_base_url: google.base_url.clone(),
            token_url: google.token_url(),
            credentials: GoogleCredentials::from_json(&google.credentials_json())
                .unwrap()
                .into(),
            validate_only: true,
            timeout: Duration::from_secs(10),
            terms_ttl: Duration::from_secs(3600),
        },
        mapping.clone(),
    ));
    let platforms: [&dyn DryRunPlatform; 2] = [&meta_p, &google_p];
    let cfg = IngestConfig {
        default_region: bridge_core::identity::parse_region("US").unwrap(),
        max_future_skew_secs: 300,
    };
    let report = dry_run(
        read_jsonl(&text),
        "hubspot",
        &mapping,
        &cfg,
        &platforms,
        Timestamp::now(),
    )
    .await;
    assert_eq!(report.lines, 5);
    assert_eq!(report.valid_events, 4);
    assert_eq!(report.invalid.len(), 1);
    assert_eq!(report.invalid[0].line, 5, "the line number of the bad line");
    assert!(
        report.invalid[0].reason.contains("occurred_at"),
        "{:?}",
        report.invalid
    );
    assert_eq!(report.would_send["meta"], 3, "lead and both deals");
    assert_eq!(report.would_send["google"], 1, "the deal with a click id");
    assert_eq!(report.blocked_consent["meta"], 1);
    assert_eq!(report.blocked_consent["google"], 1);
    let rejected: Vec<(usize, &str)> = report
        .would_reject
        .iter()
        .map(|p| (p.line, p.reason.split(':').next().unwrap_or("")))
        .collect();
    assert_eq!(rejected, [(3, "no_click_id")]);
    // Every request was a dry run, and nothing was imported.
    assert_eq!(meta.test_event_codes().len(), meta.requests());
    assert!(meta.requests() > 0);
    let uploads = google.requests("uploadClickConversions");
    assert!(!uploads.is_empty() && uploads.iter().all(|r| r["validateOnly"] == true));
    assert!(google.conversions().is_empty());
}
