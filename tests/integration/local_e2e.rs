//! End to end on one machine: webhooks from every source through the function URL into the
//! functions' optimised binaries under the local Lambda runtime, SQS mappings read from the template,
//! to the strict Meta and Google fakes; checked field by field at the fakes and in the store,
//! and no raw identifier in any log line or stored item.

use bridge_core::delivery::{DeliveryStatus, Destination};
use bridge_core::hashing::sha256_hex;
use bridge_core::store::EventStore;
use bridge_core::timestamp::Timestamp;
use bridge_tests::local::harness::LocalBridge;
use bridge_tests::{accepted_ids, minutes_ago};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::Duration;

#[tokio::test]
#[ignore = "needs the local AWS emulator: bash infra/local/test.sh starts it and runs this"]
async fn webhooks_from_every_source_reach_the_fakes_exactly_as_mapped() {
    let b = LocalBridge::start("e2e", &[], 1).await;
    let occurred = Timestamp::now().minus_secs(20 * 60).unix_ms();
    b.hubspot.seed_samples(occurred);
    let mut accepted = Vec::new();

    // Generic: a lead from a Meta lead ad (granted, with Meta's lead id) and an MQL whose
    // consent is denied.
    let lead = json!({"event_name": "lead", "occurred_at": minutes_ago(30), "entity_type": "lead", "entity_id": "L-1",
        "identity": {"email": " Jane.Doe@Example.com ", "phone": "(650) 555-1234", "first_name": "Jane", "last_name": "Doe", "country": "US",
                     "lead_id": "1234567890123456"},
        "consent": {"status": "granted"}});
    let (status, r) = b.post("generic", &lead).await;
    assert_eq!(status, 202, "{r}");
    let lead_id = accepted_ids(&r)[0].clone();
    accepted.push(lead_id.clone());
    let denied = json!({"event_name": "mql", "occurred_at": minutes_ago(29), "entity_type": "contact", "entity_id": "C-9",
        "identity": {"email": "nobody@example.org"}, "consent": {"status": "denied"}});
    let (_, r) = b.post("generic", &denied).await;
    let denied_id = accepted_ids(&r)[0].clone();
    accepted.push(denied_id.clone());
    // The same webhook again: nothing new.
    let (_, r) = b.post("generic", &lead).await;
    assert_eq!(r["status"], "duplicate", "{r}");

    // Salesforce: a qualified lead (sql) and a closed-won opportunity from a source that is
    // not the system of record.
    let sf = json!([
        {"object": "Lead", "id": "00Q-1", "stage": "Qualified", "changed_at": minutes_ago(25), "email": "lead@prospect.example", "consent": {"status": "granted"}},
        {"object": "Opportunity", "id": "006-1", "stage": "Closed Won", "changed_at": minutes_ago(24), "amount": 500, "currency": "USD",
         "email": "buyer@prospect.example", "gclid": "Cj0-sf", "consent": {"status": "granted"}}
    ]);
    let (status, r) = b.post("salesforce", &sf).await;
    assert!(status == 202 || status == 207, "{status} {r}");
    let sf_ids = accepted_ids(&r);
    assert_eq!(sf_ids.len(), 2, "{r}");
    accepted.extend(sf_ids.clone());

    // HubSpot: the deal closes (fetched from the CRM API) and the contact becomes an MQL.
    let hs = json!([
        {"eventId": 1, "subscriptionId": 7, "portalId": 62515, "appId": 1, "occurredAt": occurred, "subscriptionType": "deal.propertyChange",
         "attemptNumber": 0, "objectId": 9001, "propertyName": "dealstage", "propertyValue": "closedwon", "changeSource": "CRM"},
        {"eventId": 2, "subscriptionId": 8, "portalId": 62515, "appId": 1, "occurredAt": occurred, "subscriptionType": "contact.propertyChange",
         "attemptNumber": 0, "objectId": 101, "propertyName": "lifecyclestage", "propertyValue": "marketingqualifiedlead", "changeSource": "CRM"}
    ]);
    let (status, r) = b.post_hubspot(&hs).await;
    assert_eq!(status, 202, "{r}");
    let hs_ids = accepted_ids(&r);
    assert_eq!(hs_ids.len(), 2, "{r}");
    accepted.extend(hs_ids.clone());
    let won_id = hs_ids[0].clone();

    // Billing posts a partial refund for the system of record, before the won event was sent.
    let refund = json!({"event_name": "refund", "occurred_at": minutes_ago(10), "entity_type": "order", "entity_id": "R-9001",
        "order_id": "9001", "value": 200.0, "currency": "GBP", "identity": {"email": "ada@example.com"}, "consent": {"status": "granted"}});
    let (status, r) = b.post("hubspot", &refund).await;
    assert_eq!(status, 202, "{r}");
    let refund_id = accepted_ids(&r)[0].clone();
    accepted.push(refund_id.clone());

    let events = b.settle(&accepted, Duration::from_secs(120)).await;
    let state = |id: &str, d: Destination| events[id].destinations.get(&d).map(|s| s.status);

    // Meta: exactly these (event_name, event_id) keys, once each.
    let meta: BTreeSet<(String, String)> = b.meta.distinct().into_keys().collect();
    let want: BTreeSet<(String, String)> = [
        ("Lead", lead_id.as_str()),
        ("SalesQualifiedLead", sf_ids[0].as_str()),
        ("Purchase", won_id.as_str()),
        ("MarketingQualifiedLead", hs_ids[1].as_str()),
        ("Refund", refund_id.as_str()),
    ]
    .iter()
    .map(|(n, i)| (n.to_string(), i.to_string()))
    .collect();
    assert_eq!(meta, want);
    let sent = b.meta.accepted();
    let by_id = |id: &str| sent.iter().find(|e| e["event_id"] == id).cloned().unwrap();
    let l = by_id(&lead_id);
    assert_eq!(
        l["user_data"]["em"],
        json!([sha256_hex("jane.doe@example.com")])
    );
    assert_eq!(l["user_data"]["ph"], json!([sha256_hex("16505551234")]));
    assert_eq!(l["user_data"]["fn"], json!([sha256_hex("jane")]));
    assert_eq!(l["action_source"], "system_generated");
    // A Conversion Leads event: Meta's lead id as an integer, with the CRM named.
    assert_eq!(l["user_data"]["lead_id"], json!(1234567890123456u64));
    assert_eq!(l["custom_data"]["event_source"], "crm");
    assert_eq!(l["custom_data"]["lead_event_source"], "HubSpot");
    // The HubSpot MQL carries no lead id: an ordinary CRM conversion, no Conversion Leads fields.
    assert!(
        by_id(&hs_ids[1])["custom_data"]
            .get("lead_event_source")
            .is_none()
    );
    let p = by_id(&won_id);
    assert_eq!(p["custom_data"]["value"], 1200.5);
    assert_eq!(p["custom_data"]["currency"], "GBP");
    assert_eq!(p["custom_data"]["order_id"], "9001");
    assert_eq!(p["event_time"], occurred / 1000);
    assert_eq!(by_id(&refund_id)["custom_data"]["value"], 200.0);

    // Google: the won deal as a click conversion, then restated to the new total; the SQL as an
    // enhanced conversion for leads (no click id, matched on the hashed email).
    let conv = b.google.conversions();
    assert_eq!(conv.len(), 2, "{conv:?}");
    let deal = &conv["9001"];
    assert_eq!(
        (deal.value, deal.currency.as_str(), deal.retracted),
        (1000.5, "GBP", false)
    );
    assert_eq!(
        deal.action,
        "customers/1234567890/conversionActions/987654321"
    );
    assert!(
        conv.contains_key(&sf_ids[0]),
        "the SQL's order id is its event id"
    );
    let uploads: Vec<Value> = b
        .google
        .requests("uploadClickConversions")
        .iter()
        .flat_map(|r| r["conversions"].as_array().cloned().unwrap_or_default())
        .collect();
    let row = uploads.iter().find(|r| r["orderId"] == "9001").unwrap();
    assert_eq!(row["gclid"], "Cj0KCQ-ada");
    assert_eq!(row["conversionValue"], 1200.5);
    assert_eq!(row["currencyCode"], "GBP");
    assert!(
        row["conversionDateTime"]
            .as_str()
            .unwrap()
            .ends_with("+00:00")
    );
    assert_eq!(
        row["userIdentifiers"],
        json!([{"hashedEmail": sha256_hex("ada@example.com"), "userIdentifierSource": "FIRST_PARTY"},
               {"hashedPhoneNumber": sha256_hex("+442079460958"), "userIdentifierSource": "FIRST_PARTY"}])
    );
    let adj = b.google.requests("uploadConversionAdjustments");
    assert_eq!(adj.len(), 1);
    let a = &adj[0]["conversionAdjustments"][0];
    assert_eq!(a["adjustmentType"], "RESTATEMENT");
    assert_eq!(
        a["restatementValue"],
        json!({"adjustedValue": 1000.5, "currencyCode": "GBP"})
    );

    // The store: every event's final state per destination, and the consent decision kept.
    assert_eq!(
        state(&lead_id, Destination::Meta),
        Some(DeliveryStatus::Delivered)
    );
    assert_eq!(
        state(&lead_id, Destination::Google),
        None,
        "lead is not mapped to Google"
    );
    assert_eq!(
        state(&denied_id, Destination::Meta),
        Some(DeliveryStatus::BlockedConsent)
    );
    let reason = events[&denied_id].destinations[&Destination::Meta]
        .consent_reason
        .clone();
    assert_eq!(reason.as_deref(), Some("consent denied (payload)"));
    assert_eq!(
        state(&sf_ids[1], Destination::Meta),
        Some(DeliveryStatus::RejectedNotSystemOfRecord)
    );
    assert_eq!(
        state(&sf_ids[1], Destination::Google),
        Some(DeliveryStatus::RejectedNotSystemOfRecord)
    );
    assert_eq!(
        state(&won_id, Destination::Google),
        Some(DeliveryStatus::Delivered)
    );
    assert_eq!(
        state(&refund_id, Destination::Google),
        Some(DeliveryStatus::Delivered)
    );
    let log = &events[&won_id].destinations[&Destination::Meta].log;
    assert_eq!(log.last().map(|l| l.result.as_str()), Some("delivered"));
    assert!(log.last().and_then(|l| l.platform_ref.as_deref()).is_some());

    // No raw identifier anywhere: every function log line and every stored item.
    let raw = [
        "jane.doe@example.com",
        "Jane.Doe@Example.com",
        "Ada@Example.com",
        "ada@example.com",
        "Lovelace",
        "lead@prospect.example",
        "buyer@prospect.example",
        "nobody@example.org",
        "555-1234",
        "7946 0958",
        "+442079460958",
    ];
    let lines = b.log_lines();
    assert!(lines.len() > 10, "the functions logged");
    for l in &lines {
        for r in raw {
            assert!(!l.contains(r), "raw identifier {r:?} in a log line: {l}");
        }
    }
    let ddb = bridge_aws::clients::dynamodb(&bridge_tests::sdk_config().await);
    let items = ddb
        .scan()
        .table_name(b.stack.var("TABLE_NAME"))
        .send()
        .await
        .unwrap();
    let dump = format!("{:?}", items.items());
    assert!(items.count() >= accepted.len() as i32);
    for r in raw {
        assert!(!dump.contains(r), "raw identifier {r:?} in a stored item");
    }
    b.assert_no_secrets().await;

    // Backfill through the same ingest path: the second run stores nothing new.
    let history: String = (0..3)
        .map(|i| format!("{}\n", json!({"event_name": "lead", "occurred_at": minutes_ago(120 + i), "entity_type": "lead", "entity_id": format!("H-{i}"),
            "identity": {"email": format!("history{i}@example.com")}, "consent": {"status": "granted"}})))
        .collect();
    for expected in [json!({"accepted": 3}), json!({"duplicate": 3})] {
        let run = backfill::load(
            &b.url,
            "hubspot",
            &history,
            bridge_tests::local::harness::SECRET,
        )
        .await
        .unwrap();
        assert_eq!(run["results"], expected, "{run}");
    }

    // The sweep: a pair left pending with no message (an enqueue that failed after the
    // write) is re-enqueued by the scheduled reconcile run and delivered.
    let mut orphan = bridge_tests::sample_event("ORPHAN-1", "lead", None, None, &minutes_ago(90));
    for s in orphan.destinations.values_mut() {
        s.updated_at = Timestamp::now().minus_secs(3600);
    }
    orphan.destinations.remove(&Destination::Google);
    bridge_core::store::EventStore::put_new(&b.store, &orphan)
        .await
        .unwrap();
    let reconcile = b.running.function("ReconcileFunction").clone();
    let out = reconcile
        .invoke(bridge_tests::local::scheduled_event("e2e"))
        .await
        .expect("reconcile runs");
    assert_eq!(out["swept"]["meta"]["re_enqueued"], 1, "{out}");
    let mut all = accepted.clone();
    all.push(orphan.event_id.clone());
    let events = b.settle(&all, Duration::from_secs(60)).await;
    assert_eq!(
        events[&orphan.event_id].destinations[&Destination::Meta].status,
        DeliveryStatus::Delivered
    );
    assert!(
        b.meta
            .distinct()
            .contains_key(&("Lead".to_string(), orphan.event_id.clone()))
    );

    // The report in the bucket: CRM revenue versus what each platform was told.
    let aws = bridge_tests::sdk_config().await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&aws)
            .force_path_style(true)
            .build(),
    );
    let bucket = b.stack.var("REPORTS_BUCKET");
    let keys = report_keys(&s3, &bucket).await;
    assert_eq!(keys.len(), 3, "JSON, CSV and HTML: {keys:?}");
    let body = newest_report(&s3, &bucket, "json").await;
    let report: Value = serde_json::from_slice(&body).unwrap();
    for d in ["meta", "google"] {
        let gbp = &report["destinations"][d]["currencies"]["GBP"];
        assert_eq!(
            (
                gbp["crm_revenue"].as_str(),
                gbp["delivered_revenue"].as_str(),
                gbp["difference"].as_str()
            ),
            (Some("1000.50"), Some("1000.50"), Some("0.00")),
            "{d}: {gbp}"
        );
    }
    assert_eq!(
        report["destinations"]["meta"]["by_state"]["blocked_consent"],
        1
    );

    // The CRM's own side: HubSpot shows a second won deal whose webhook never came, and a
    // contact that became an SQL without one. The reconcile run's CRM check names both;
    // `bridge-backfill crm-check --repair` ingests them as their webhooks would have been, and
    // both platforms count each once (the deal for the CRM's amount).
    let missed_at = Timestamp::now().minus_secs(2 * 3600).unix_ms();
    b.hubspot.won_deal("9002", "300", "GBP", missed_at);
    for (k, v) in [
        ("email", "grace@example.com"),
        ("ads_consent_status", "granted"),
        ("lifecyclestage", "salesqualifiedlead"),
    ] {
        b.hubspot.change("contact", "102", k, v, missed_at);
    }
    reconcile
        .invoke(json!({"task": "crm"}))
        .await
        .expect("reconcile runs with the CRM check");
    let body = newest_report(&s3, &bucket, "json").await;
    let report: Value = serde_json::from_slice(&body).unwrap();
    let crm = &report["crm"];
    assert_eq!(crm["source"], "hubspot", "{report}");
    assert_eq!(crm["missed"][0]["deal_id"], "9002", "{crm}");
    assert_eq!(
        crm["missed"][0]["won_at"],
        json!(Timestamp::from_unix_ms(missed_at).canonical())
    );
    let gbp = &crm["per_currency"]["GBP"];
    assert_eq!(
        (&gbp["crm_deals"], &gbp["stored_wons"], &gbp["missed"]),
        (&json!(2), &json!(1), &json!(1)),
        "{crm}"
    );
    assert!(crm["changed"].as_array().unwrap().is_empty(), "{crm}");
    // The funnel: the sample MQL arrived by webhook, the SQL did not.
    let funnel = &crm["funnel"];
    assert_eq!(
        funnel["per_stage"]["mql"],
        json!({"crm_changes": 1, "stored": 1, "missed": 0}),
        "{funnel}"
    );
    assert_eq!(funnel["missed"][0]["record_id"], "102", "{funnel}");
    assert_eq!(funnel["missed"][0]["event_name"], "sql");
    assert_eq!(
        funnel["missed"][0]["entered_at"],
        json!(Timestamp::from_unix_ms(missed_at).canonical())
    );
    // The same report as a person reads it: the HTML page, opened in headless Chromium, shows
    // the figures the JSON holds.
    let page = newest_report(&s3, &bucket, "html").await;
    let dir = std::env::temp_dir().join(format!("bridge-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let html = dir.join("report.html");
    std::fs::write(&html, &page).unwrap();
    let rendered = bridge_tests::browser::render(&html);
    assert!(
        rendered.screenshot_bytes > 10_000,
        "the page paints: {} bytes",
        rendered.screenshot_bytes
    );
    let shown = bridge_tests::browser::figures(&rendered.dom);
    for d in ["meta", "google"] {
        for (figure, field) in [
            ("crm", "crm_revenue"),
            ("delivered", "delivered_revenue"),
            ("difference", "difference"),
        ] {
            assert_eq!(
                shown
                    .get(&format!("revenue.{d}.GBP.{figure}"))
                    .map(String::as_str),
                report["destinations"][d]["currencies"]["GBP"][field].as_str(),
                "{d} {figure}"
            );
        }
    }
    for day in report["daily"].as_array().unwrap() {
        let (date, cur) = (
            day["day"].as_str().unwrap(),
            day["currency"].as_str().unwrap(),
        );
        assert_eq!(
            shown[&format!("daily.{date}.{cur}.crm")],
            day["crm"].as_str().unwrap()
        );
        for d in ["meta", "google"] {
            assert_eq!(
                shown[&format!("daily.{date}.{cur}.{d}")],
                day["delivered"][d].as_str().unwrap()
            );
        }
    }
    assert_eq!(shown["crm.GBP.missed"], "1");
    assert_eq!(shown["crm.GBP.missed_revenue"], "300.00");
    assert_eq!(shown["crm.missed.9002"], "9002");
    assert_eq!(shown["crm.missed.9002.amount"], "300.00");
    assert_eq!(shown["crm.funnel.sql.missed"], "1");
    assert_eq!(shown["crm.funnel.mql.stored"], "1");
    assert_eq!(shown["crm.funnel.missed.102.sql"], "102");
    assert_eq!(
        shown["state.meta.blocked_consent"],
        report["destinations"]["meta"]["by_state"]["blocked_consent"].to_string()
    );
    let _ = std::fs::remove_dir_all(&dir);
    let since = minutes_ago(24 * 60);
    let bridge = &b;
    let crm_check = |repair: bool| {
        let since = since.clone();
        async move {
            let mut args = vec!["crm-check", "--from", since.as_str()];
            if repair {
                args.push("--repair");
            }
            bridge.backfill(&args).await
        }
    };
    let dry = crm_check(false).await;
    assert_eq!(dry["mode"], "crm_check");
    assert_eq!(dry["missed"].as_array().unwrap().len(), 1, "{dry}");
    assert!(
        b.store.find_by_order("9002").await.unwrap().is_empty(),
        "a dry run stores nothing"
    );
    let sqls = |b: &LocalBridge| {
        b.meta
            .distinct()
            .keys()
            .filter(|(name, _)| name == "SalesQualifiedLead")
            .count()
    };
    let sqls_before = sqls(&b);
    let fixed = crm_check(true).await;
    assert_eq!(fixed["repaired"], json!({"accepted": 2}), "{fixed}");
    let repaired: Vec<String> = b
        .store
        .find_by_order("9002")
        .await
        .unwrap()
        .iter()
        .map(|e| e.event_id.clone())
        .collect();
    assert_eq!(repaired.len(), 1);
    let events = b.settle(&repaired, Duration::from_secs(60)).await;
    let won = &events[&repaired[0]];
    assert_eq!(won.occurred_at, Timestamp::from_unix_ms(missed_at));
    for d in [Destination::Meta, Destination::Google] {
        assert_eq!(
            won.destinations[&d].status,
            DeliveryStatus::Delivered,
            "{d}"
        );
    }
    assert_eq!(
        b.meta
            .purchases_deduped()
            .iter()
            .filter(|(_, e)| e["custom_data"]["order_id"] == "9002")
            .map(|(_, e)| e["custom_data"]["value"].as_f64())
            .collect::<Vec<_>>(),
        [Some(300.0)]
    );
    let google_9002: Vec<f64> = b
        .google
        .conversions()
        .values()
        .filter(|c| c.order_id.as_deref() == Some("9002"))
        .map(|c| c.value)
        .collect();
    assert_eq!(google_9002, [300.0]);
    // The contact's SQL reaches Meta once, under the id its webhook would have had.
    let waited = std::time::Instant::now();
    while sqls(&b) == sqls_before && waited.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(sqls(&b), sqls_before + 1);
    let again = crm_check(true).await;
    assert!(again["missed"].as_array().unwrap().is_empty(), "{again}");
    assert!(
        again["funnel"]["missed"].as_array().unwrap().is_empty(),
        "{again}"
    );
    assert!(
        again.get("repaired").is_none() || again["repaired"] == json!({}),
        "{again}"
    );
    // The operator's report for a period of their choosing, with the CRM side: every order
    // counted once on both platforms, nothing missed, the page written beside the JSON.
    let out = std::env::temp_dir().join(format!("bridge-cli-report-{}", std::process::id()));
    let out_dir = out.display().to_string();
    let report = b
        .backfill(&["report", "--from", &since, "--out", &out_dir, "--crm"])
        .await;
    for d in ["meta", "google"] {
        let gbp = &report["destinations"][d]["currencies"]["GBP"];
        assert_eq!(
            (
                gbp["crm_revenue"].as_str(),
                gbp["delivered_revenue"].as_str()
            ),
            (Some("1300.50"), Some("1300.50")),
            "{d}: {gbp}"
        );
    }
    assert!(report["crm"]["missed"].as_array().unwrap().is_empty());
    let page = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(page.contains("data-figure=\"revenue.meta.GBP.delivered\">1300.50<"));
    let _ = std::fs::remove_dir_all(&out);
    b.running.stop();
}

/// The Data Manager back end through the binaries: the local bridge started with a mapping
/// file whose Google back end is `data_manager` (handed to every function as `MAPPING_PATH`,
/// as `up.sh --mapping FILE` does). A won and a partial refund of the same order reach the
/// fake's events:ingest as one transaction restated to the new total (Data Manager overwrites
/// by transactionId), a replayed webhook adds nothing, and Google counts the order once.
#[tokio::test]
#[ignore = "needs the local AWS emulator: bash infra/local/test.sh starts it and runs this"]
async fn data_manager_back_end_through_the_binaries() {
    let bundled = std::fs::read_to_string(bridge_tests::repo_root().join("infra/mapping.toml"))
        .expect("bundled mapping");
    assert!(bundled.contains("backend = \"ads_api\""));
    let mapping = bundled.replacen("backend = \"ads_api\"", "backend = \"data_manager\"", 1);
    let path = std::env::temp_dir().join(format!("dm-mapping-{}.toml", std::process::id()));
    std::fs::write(&path, mapping).expect("write mapping");
    let path_text = path.display().to_string();
    let b = LocalBridge::start_with_env("e2e-dm", &[], 1, &[("MAPPING_PATH", &path_text)]).await;

    let won = json!({"event_name": "won", "occurred_at": minutes_ago(30), "entity_type": "opportunity", "entity_id": "DM-1",
        "order_id": "O-DM-1", "value": 250.0, "currency": "USD",
        "identity": {"email": "dm.buyer@example.com", "gclid": "Cj0-dm-1"},
        "consent": {"status": "granted", "ad_user_data": "granted", "ad_personalization": "granted"}});
    let (status, r) = b.post("hubspot", &won).await;
    assert_eq!(status, 202, "{r}");
    let won_id = accepted_ids(&r)[0].clone();
    let (_, r) = b.post("hubspot", &won).await;
    assert_eq!(r["status"], "duplicate", "a replayed webhook: {r}");
    b.settle(std::slice::from_ref(&won_id), Duration::from_secs(120))
        .await;
    // Google processes the request. (A refund arriving while it still reads PROCESSING is
    // held and looked at again later: a restatement must not overtake its won.)
    b.google.dm_complete_all();

    let refund = json!({"event_name": "refund", "occurred_at": minutes_ago(5), "entity_type": "order", "entity_id": "R-DM-1",
        "order_id": "O-DM-1", "value": 100.0, "currency": "USD", "identity": {"email": "dm.buyer@example.com"},
        "consent": {"status": "granted"}});
    let (status, r) = b.post("hubspot", &refund).await;
    assert_eq!(status, 202, "{r}");
    let refund_id = accepted_ids(&r)[0].clone();

    let events = b
        .settle(
            &[won_id.clone(), refund_id.clone()],
            Duration::from_secs(120),
        )
        .await;
    for id in [&won_id, &refund_id] {
        let google = &events[id].destinations[&Destination::Google];
        assert_eq!(google.status, DeliveryStatus::Delivered, "{id}: {google:?}");
        assert!(
            google.log.iter().any(|l| l
                .platform_ref
                .as_deref()
                .is_some_and(|r| r.starts_with("requestId:"))),
            "the Data Manager request id is kept for reconciliation: {google:?}"
        );
    }
    assert!(
        b.google.requests("uploadClickConversions").is_empty(),
        "nothing went to the Ads API"
    );
    let ingests = b.google.requests("events:ingest");
    assert_eq!(ingests.len(), 2, "the won, then its restatement");
    assert_eq!(ingests[0]["events"][0]["transactionId"], "O-DM-1");
    assert_eq!(ingests[1]["events"][0]["transactionId"], "O-DM-1");

    // Data Manager processes asynchronously: nothing counts until Google has processed it.
    b.google.dm_complete_all();
    let key = bridge_tests::fakes::google::DmKey::new("1234567890", "987654321", "O-DM-1");
    let conversions = b.google.dm_conversions();
    assert_eq!(conversions[&key].value, Some(150.0), "the new total");
    assert_eq!(
        conversions[&key].ingests, 2,
        "same transactionId: a restatement"
    );
    assert_eq!(b.google.dm_count(), 1, "one order, counted once");
    assert_eq!(b.google.dm_revenue()["USD"], 150.0);
    b.assert_no_secrets().await;
    let _ = std::fs::remove_file(&path);
}

/// The keys of the correction events stored in the last day.
async fn stored_corrections(store: &bridge_aws::dynamodb::DynamoStore) -> Vec<String> {
    store
        .events_between(Timestamp::now().minus_secs(86_400), Timestamp::now())
        .await
        .expect("period")
        .into_iter()
        .filter(|e| e.correction.is_some())
        .map(|e| e.key)
        .collect()
}

/// A mapping change that moves the won stage to another Google conversion action, then the
/// operator's correction command, through the binaries: the bridge delivers two deals (one
/// partly refunded) under the old action, is deployed again with the new mapping, and
/// `bridge-backfill correct` plans (a dry run sends nothing), then with `--confirm` stores and
/// enqueues the corrections, which the Google sender delivers in order. Google ends counting
/// each order once, under the new action, at its net value; running the command again changes
/// nothing.
#[tokio::test]
#[ignore = "needs the local AWS emulator: bash infra/local/test.sh starts it and runs this"]
async fn a_mapping_change_and_the_correction_command_move_each_order_once() {
    let bundled = std::fs::read_to_string(bridge_tests::repo_root().join("infra/mapping.toml"))
        .expect("bundled mapping");
    // Both actions' click-through windows stated: the command checks the click against them.
    let window =
        |id: &str| format!("conversionActions/{id}\"\nclick_through_lookback_window_days = 60");
    let bundled = bundled.replace("conversionActions/987654321\"", &window("987654321"));
    let moved = bundled
        .replacen("version = \"", "version = \"moved-", 1)
        .replace(&window("987654321"), &window("555"));
    assert_ne!(moved, bundled);
    let dir = std::env::temp_dir().join(format!("correct-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (old_path, new_path) = (dir.join("old.toml"), dir.join("new.toml"));
    std::fs::write(&old_path, &bundled).expect("write");
    std::fs::write(&new_path, &moved).expect("write");
    let (old_text, new_text) = (
        old_path.display().to_string(),
        new_path.display().to_string(),
    );
    let mut b =
        LocalBridge::start_with_env("e2e-correct", &[], 1, &[("MAPPING_PATH", &old_text)]).await;
    let won = |n: u32, value: f64| {
        json!({"event_name": "won", "occurred_at": minutes_ago(90), "entity_type": "opportunity",
            "entity_id": format!("MV-{n}"), "order_id": format!("O-MV-{n}"), "value": value,
            "currency": "USD", "identity": {"email": format!("mv{n}@example.com"), "gclid": format!("Cj0-mv-{n}")},
            "consent": {"status": "granted"}})
    };
    let (_, r) = b
        .post("hubspot", &json!([won(1, 100.0), won(2, 200.0)]))
        .await;
    let mut keys = accepted_ids(&r);
    assert_eq!(keys.len(), 2, "{r}");
    let refund = json!({"event_name": "refund", "occurred_at": minutes_ago(30), "entity_type": "order",
        "entity_id": "R-MV-2", "order_id": "O-MV-2", "value": 50.0, "currency": "USD",
        "identity": {}, "consent": {"status": "granted"}});
    b.settle(&keys, Duration::from_secs(120)).await;
    let (_, r) = b.post("hubspot", &refund).await;
    keys.extend(accepted_ids(&r));
    b.settle(&keys, Duration::from_secs(120)).await;
    let held = |b: &LocalBridge, order: &str, action: &str| {
        b.google
            .conversions_by_key()
            .into_iter()
            .find(|(k, _)| {
                k.action_id == action
                    && k.order == bridge_tests::fakes::google::OrderKey::Order(order.into())
            })
            .map(|(_, c)| (c.value, c.retracted))
    };
    assert_eq!(held(&b, "O-MV-2", "987654321"), Some((150.0, false)));

    let run = |b: &LocalBridge, confirm: bool| {
        let mut cmd = std::process::Command::new(
            bridge_tests::local::harness::bin_dir().join("bridge-backfill"),
        );
        cmd.args([
            "correct",
            "--old-mapping",
            &old_text,
            "--new-mapping",
            &new_text,
        ]);
        if confirm {
            cmd.arg("--confirm");
        }
        cmd.envs(b.stack.env.iter()).envs(b.function_env().iter());
        let out = cmd.output().expect("run bridge-backfill");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        (out.status.success(), stdout, stderr)
    };
    // The senders still run the old mapping: their uploads would go under the old action.
    let (ok, _, err) = run(&b, true);
    assert!(!ok && err.contains("deploy the new mapping first"), "{err}");
    b.redeploy(&[("MAPPING_PATH", &new_text)]).await;
    let command = |b: &LocalBridge, confirm: bool| {
        let (ok, stdout, stderr) = run(b, confirm);
        assert!(ok, "{stdout}\n{stderr}");
        (
            serde_json::from_str::<Value>(&stdout).expect("JSON"),
            stderr,
        )
    };
    let sent = |b: &LocalBridge| {
        b.google.requests("uploadClickConversions").len()
            + b.google.requests("uploadConversionAdjustments").len()
    };
    let before = sent(&b);
    let no_pii = |out: &str| {
        for raw in ["mv1@example.com", "mv2@example.com", "Cj0-mv-1", "Cj0-mv-2"] {
            assert!(
                !out.contains(raw),
                "the command printed an identifier: {out}"
            );
        }
    };
    let (plan, table) = command(&b, false);
    no_pii(&format!("{plan}{table}"));
    assert_eq!(plan["mode"], "correct_dry_run");
    assert_eq!(
        plan["corrections"].as_array().map(Vec::len),
        Some(2),
        "{plan:#}"
    );
    assert_eq!(plan["revenue_moved"]["USD"], 250.0);
    assert!(
        table.contains("O-MV-2") && table.contains("987654321 -> 555"),
        "{table}"
    );
    assert!(table.contains("retract, upload, restate"), "{table}");
    assert!(
        stored_corrections(&b.store).await.is_empty(),
        "a dry run stores nothing"
    );
    assert_eq!(sent(&b), before);

    let (done, table) = command(&b, true);
    no_pii(&format!("{done}{table}"));
    assert_eq!(done["applied"]["stored"], 6, "{done:#}");
    let steps = stored_corrections(&b.store).await;
    assert_eq!(steps.len(), 6);
    let events = b.settle(&steps, Duration::from_secs(180)).await;
    for k in &steps {
        let g = &events[k].destinations[&Destination::Google];
        assert_eq!(g.status, DeliveryStatus::Delivered, "{k}: {g:?}");
    }
    assert_eq!(held(&b, "O-MV-1", "987654321"), Some((100.0, true)));
    assert_eq!(held(&b, "O-MV-1", "555"), Some((100.0, false)));
    assert_eq!(held(&b, "O-MV-2", "987654321").map(|c| c.1), Some(true));
    assert_eq!(held(&b, "O-MV-2", "555"), Some((150.0, false)));
    assert_eq!(b.google.count(), 2, "each order once");
    assert_eq!(b.google.revenue()["USD"], 250.0);

    let after = sent(&b);
    let (again, table) = command(&b, true);
    assert_eq!(
        again["corrections"].as_array().map(Vec::len),
        Some(0),
        "{again:#}"
    );
    assert_eq!(again["unchanged"]["google"], 2, "{table}");
    assert_eq!(
        again["unchanged"]["meta"], 2,
        "Purchase is still Purchase at Meta"
    );
    assert_eq!(again["applied"]["stored"], 0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sent(&b), after, "a second run sends nothing");
    b.assert_no_secrets().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every report key in the bucket.
async fn report_keys(s3: &aws_sdk_s3::Client, bucket: &str) -> Vec<String> {
    let mut keys: Vec<String> = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix("reports/last_day/")
        .send()
        .await
        .unwrap()
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_string))
        .collect();
    keys.sort();
    keys
}

/// The newest last-day report in the bucket, as `ext` (json, csv or html).
async fn newest_report(s3: &aws_sdk_s3::Client, bucket: &str, ext: &str) -> Vec<u8> {
    let keys = report_keys(s3, bucket).await;
    let key = keys
        .iter()
        .rev()
        .find(|k| k.ends_with(&format!(".{ext}")))
        .unwrap_or_else(|| panic!("no .{ext} report in {keys:?}"));
    s3.get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes()
        .to_vec()
}
