//! `bridge-backfill`: loads historical CRM events (one canonical event per JSONL line).
//!
//!   bridge-backfill --file events.jsonl --source hubspot --url https://<function-url>
//!       posts them, signed with $BRIDGE_SECRET, in batches of 100 through the ingest
//!       endpoint: the same validation, consent, mapping and idempotency as live webhooks
//!       (running it twice stores and sends nothing new).
//!   bridge-backfill correct --old-mapping old.toml --new-mapping new.toml [--confirm]
//!       after a mapping change that moves the won stage to another Google conversion action:
//!       plans (and with --confirm, stores and enqueues) a RETRACTION under the old action, an
//!       upload under the new one and the order's refunds restated there, for every delivered
//!       won that can still be moved; reports the others, and Meta events sent under an old
//!       event name (Meta has no retraction), with the reason.
//!   bridge-backfill crm-check [--from 2026-11-01] [--to 2026-12-01] [--csv F] [--repair]
//!       reconciles against the system of record itself, HubSpot or Salesforce (default: the
//!       last 7 days): lists the deals won in the period (CRM search, or SOQL), reports each
//!       one the bridge never stored (its webhook never arrived) and each stored won the CRM
//!       has since reopened, deleted or changed the amount of; with --repair, ingests the
//!       missed deals as their webhooks would have been (same validation, consent and event
//!       ids; the time from the stage history). Reads HUBSPOT_TOKEN / SALESFORCE_OAUTH, or
//!       hubspot-token / salesforce-oauth under WEBHOOK_SECRETS_PARAMETER_PATH, and
//!       HUBSPOT_PORTAL_ID, HUBSPOT_API_BASE_URL, SALESFORCE_API_VERSION.
//!   bridge-backfill report [--from 2026-11-01] [--to 2026-12-01] [--out DIR] [--crm]
//!       the reconciliation report for any period (default: the last 7 days), as the
//!       reconcile function builds it, written as report.json, .csv and .html into DIR;
//!       --crm adds the CRM check (read only).
//!   bridge-backfill --file events.jsonl --source hubspot --dry-run
//!       sends nothing for real: validates through the same ingest code into memory, builds
//!       every platform row, and has Meta (test_event_code) and Google (validateOnly) check
//!       them; prints what would be sent and what would be rejected and why. Platforms are
//!       configured as the senders are (META_GRAPH_BASE_URL, META_PIXEL_ID, META_ACCESS_TOKEN,
//!       META_TEST_EVENT_CODE; GOOGLE_* base URLs and GOOGLE_CREDENTIALS as JSON); one
//!       without credentials is checked locally only.

use backfill::load;

use bridge_aws::config::Settings;
use bridge_aws::lambda::env;
use bridge_core::backfill::{Checked, DryRunPlatform, dry_run, read_jsonl};
use bridge_core::ingest::{IngestConfig, Intake};
use bridge_core::reconcile::run::CrmApi;
use bridge_core::timestamp::{Timestamp, Window};
use bridge_platforms::google::{GoogleCredentials, GooglePlatform};
use bridge_platforms::meta::{MetaAccess, MetaPlatform};
use serde_json::{Value, json};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

async fn dry(source: &str, text: &str) -> Result<Value, String> {
    let settings = Settings::from_lookup(|k| match k {
        "TABLE_NAME" => Some("dry-run".into()),
        _ => env(k),
    })
    .map_err(|e| e.to_string())?;
    let http = bridge_platforms::http::client().map_err(|e| e.to_string())?;
    let mut platforms: Vec<Box<dyn DryRunPlatform>> = Vec::new();
    // A dry run: Meta's events go to the Test Events tool, every Google request validates only.
    let mut tuning = settings.platforms.clone();
    tuning
        .meta_test_event_code
        .get_or_insert_with(|| "BACKFILL_DRY_RUN".into());
    tuning.google_validate_only = true;
    if let (Some(token), Some(pixel)) = (env("META_ACCESS_TOKEN"), env("META_PIXEL_ID")) {
        platforms.push(Box::new(Checked(MetaPlatform::new(
            http.clone(),
            tuning.meta_config(pixel),
            settings.mapping.clone(),
            MetaAccess::new(token, env("META_APP_SECRET").as_deref()),
        ))));
    }
    if let Some(creds) = env("GOOGLE_CREDENTIALS") {
        let credentials = GoogleCredentials::from_json(&creds).map_err(|e| e.to_string())?;
        platforms.push(Box::new(Checked(GooglePlatform::new(
            http.clone(),
            tuning.google_config(credentials),
            settings.mapping.clone(),
        ))));
    }
    let refs: Vec<&dyn DryRunPlatform> = platforms.iter().map(|p| p.as_ref()).collect();
    let cfg = IngestConfig {
        default_region: settings.default_region,
        max_future_skew_secs: settings.max_future_skew_secs,
    };
    let report = dry_run(
        read_jsonl(text),
        source,
        &settings.mapping,
        &cfg,
        &refs,
        Timestamp::now(),
    )
    .await;
    let mut v = serde_json::to_value(&report).map_err(|e| e.to_string())?;
    v["mode"] = json!("dry_run");
    v["platforms_checked"] = json!(
        refs.iter()
            .map(|p| p.destination().as_str())
            .collect::<Vec<_>>()
    );
    Ok(v)
}

/// `bridge-backfill erase [--email E] [--phone P] [--region US]`: erases every identifier of the
/// stored events carrying that email or phone (both platforms' hashes), straight in the table
/// (`TABLE_NAME`, AWS credentials from the environment), and prints what it removed.
async fn erase(args: &[String]) -> Result<Value, String> {
    let email = arg(args, "--email");
    let phone = arg(args, "--phone");
    if email.is_none() && phone.is_none() {
        return Err("usage: bridge-backfill erase [--email E] [--phone P] [--region US]".into());
    }
    let region = arg(args, "--region").unwrap_or_else(|| "US".into());
    let default_region = bridge_core::identity::parse_region(&region)
        .ok_or_else(|| format!("--region {region}: not an ISO 3166-1 alpha-2 region"))?;
    let settings = Settings::from_env().map_err(|e| e.to_string())?;
    let aws = bridge_aws::clients::operator_sdk_config().await;
    let store = event_store(&aws, &settings);
    let req = bridge_core::privacy::ErasureRequest {
        entity: None,
        email,
        phone,
        default_region: Some(default_region),
    };
    let report = bridge_core::privacy::erase(&store, &req, Timestamp::now())
        .await
        .map_err(|e| e.to_string())?;
    let mut v = serde_json::to_value(&report).map_err(|e| e.to_string())?;
    v["mode"] = json!("erase");
    v["events_erased"] = json!(report.erased.len());
    Ok(v)
}

/// The id after the last `/` of an action resource name, for the summary table.
fn short(action: &str) -> &str {
    action.rsplit('/').next().unwrap_or(action)
}

/// `bridge-backfill correct --old-mapping OLD.toml --new-mapping NEW.toml [--days 90]
/// [--confirm]`: moves the wons delivered under an action the new mapping no longer maps them
/// to (see `bridge_core::correction`). Without `--confirm` it only prints the plan; with it,
/// the correction events are stored and enqueued for the Google sender (TABLE_NAME, the queue
/// URLs and AWS credentials from the environment, as the functions have them).
async fn correct(args: &[String]) -> Result<Value, String> {
    let usage = "usage: bridge-backfill correct --old-mapping OLD.toml --new-mapping NEW.toml [--days 90] [--confirm]";
    let read = |flag: &str| -> Result<bridge_core::mapping::Mapping, String> {
        let path = arg(args, flag).ok_or(usage)?;
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{flag} {path}: {e}"))?;
        bridge_core::mapping::Mapping::load(&text).map_err(|e| format!("{flag} {path}: {e}"))
    };
    let (old, new) = (read("--old-mapping")?, read("--new-mapping")?);
    let days: i64 = match arg(args, "--days") {
        None => 90,
        Some(d) => d
            .parse()
            .ok()
            .filter(|d| (1..=400).contains(d))
            .ok_or(format!(
                "--days {d}: must be a whole number of days from 1 to 400"
            ))?,
    };
    let confirm = args.iter().any(|a| a == "--confirm");
    let settings = Settings::from_env().map_err(|e| e.to_string())?;
    if confirm && settings.mapping.version != new.version {
        return Err(format!(
            "the senders run mapping version {} (MAPPING_PATH, or the bundled file), not the new mapping's {}: deploy the new mapping first, or the uploads would be refused as mapping_changed",
            settings.mapping.version, new.version
        ));
    }
    let aws = bridge_aws::clients::operator_sdk_config().await;
    let store = event_store(&aws, &settings);
    let now = Timestamp::now();
    let plan = bridge_core::correction::plan_from_store(
        &store,
        &old,
        &new,
        now.minus_secs(days.saturating_mul(86_400)),
        now.plus_secs(1),
        now,
    )
    .await
    .map_err(|e| e.to_string())?;
    eprintln!(
        "{:<24} {:>14} -> {:<14} {:>12} {:<4} steps",
        "order", "from action", "to action", "net value", ""
    );
    for c in &plan.corrections {
        let steps: Vec<&str> = c.steps.iter().map(|s| s.as_str()).collect();
        eprintln!(
            "{:<24} {:>14} -> {:<14} {:>12.2} {:<4} {}",
            c.order_id,
            short(&c.from),
            short(&c.to),
            c.net.as_f64(),
            c.currency,
            steps.join(", ")
        );
    }
    for n in &plan.not_corrected {
        eprintln!(
            "{:<24} {:>14} -> {:<14} not corrected at {}: {}",
            n.order_id.as_deref().unwrap_or(&n.event_id),
            short(&n.from),
            short(&n.to),
            n.destination,
            n.reason
        );
    }
    eprintln!(
        "{} to correct, {} not corrected, {} unchanged, {} corrected before",
        plan.corrections.len(),
        plan.not_corrected.len(),
        plan.unchanged.values().sum::<usize>(),
        plan.already_corrected
    );
    let mut v = serde_json::to_value(&plan).map_err(|e| e.to_string())?;
    if confirm {
        let queue =
            bridge_aws::sqs::SqsQueue::new(bridge_aws::clients::sqs(&aws), settings.queues.clone());
        let applied = bridge_core::correction::apply(&plan, &store, &queue, now)
            .await
            .map_err(|e| e.to_string())?;
        v["mode"] = json!("correct");
        v["applied"] = serde_json::to_value(&applied).map_err(|e| e.to_string())?;
    } else {
        v["mode"] = json!("correct_dry_run");
        v["note"] = json!("nothing was stored or sent; run again with --confirm to correct");
    }
    Ok(v)
}

/// Parses `YYYY-MM-DD` (UTC midnight) or an RFC 3339 instant.
fn instant(flag: &str, v: &str) -> Result<Timestamp, String> {
    Timestamp::parse_rfc3339(v)
        .or_else(|_| Timestamp::parse_rfc3339(&format!("{v}T00:00:00Z")))
        .map_err(|_| format!("{flag} {v}: must be a date (2026-11-01) or an RFC 3339 instant"))
}

/// The event table the functions write, with their retention.
fn event_store(
    aws: &bridge_aws::clients::SdkConfig,
    settings: &Settings,
) -> bridge_aws::dynamodb::DynamoStore {
    bridge_aws::dynamodb::DynamoStore::new(
        bridge_aws::clients::dynamodb(aws),
        &settings.table_name,
        settings.retention_days,
    )
}

/// `--from`/`--to` (default: the last `default_days` days up to now), checked.
fn period(
    args: &[String],
    now: Timestamp,
    default_days: i64,
) -> Result<(Timestamp, Timestamp), String> {
    let from = match arg(args, "--from") {
        Some(v) => instant("--from", &v)?,
        None => now.minus_secs(default_days * 86_400),
    };
    let to = match arg(args, "--to") {
        Some(v) => instant("--to", &v)?,
        None => now.plus_secs(1),
    };
    if from.unix_ms() >= to.unix_ms() {
        return Err("--from must be before --to".into());
    }
    Ok((from, to))
}

/// The system of record's API as the reconcile function builds it: its secret from the
/// environment (`HUBSPOT_TOKEN`, or `SALESFORCE_OAUTH` as the JSON) or else from SSM under
/// `WEBHOOK_SECRETS_PARAMETER_PATH` (`hubspot-token`, `salesforce-oauth`).
async fn crm(
    aws: &bridge_aws::clients::SdkConfig,
    settings: &Settings,
) -> Result<bridge_platforms::crm::CrmClient, String> {
    let mut secrets = std::collections::HashMap::new();
    if let Some(t) = env("HUBSPOT_TOKEN") {
        secrets.insert("hubspot-token".to_string(), t);
    }
    if let Some(j) = env("SALESFORCE_OAUTH") {
        secrets.insert("salesforce-oauth".to_string(), j);
    }
    if secrets.is_empty() {
        let path = env("WEBHOOK_SECRETS_PARAMETER_PATH").ok_or(
            "set WEBHOOK_SECRETS_PARAMETER_PATH (the SSM path holding hubspot-token or salesforce-oauth), or HUBSPOT_TOKEN / SALESFORCE_OAUTH",
        )?;
        secrets = bridge_aws::clients::parameters_by_path(&bridge_aws::clients::ssm(aws), &path)
            .await
            .map_err(|e| e.to_string())?;
    }
    let http = bridge_platforms::http::builder()
        .connect_timeout(bridge_platforms::hubspot::CONNECT_TIMEOUT)
        .build()
        .map_err(|e| e.to_string())?;
    let sor = settings.mapping.system_of_record.clone();
    bridge_platforms::crm::CrmClient::from_secrets(&settings.mapping, &secrets, env, http)?
        .ok_or_else(|| {
            format!(
                "the system of record ({sor}) has no API credentials: hubspot-token or salesforce-oauth"
            )
        })
}

async fn crm_check(args: &[String]) -> Result<Value, String> {
    let now = Timestamp::now();
    let (from, to) = period(args, now, 7)?;
    let confirm = args.iter().any(|a| a == "--repair");
    let settings = Settings::from_env().map_err(|e| e.to_string())?;
    let aws = bridge_aws::clients::operator_sdk_config().await;
    let client = crm(&aws, &settings).await?;
    let store = event_store(&aws, &settings);
    let check = client
        .check(&store, &settings.mapping, Window::new(from, to), now)
        .await
        .map_err(|e| e.to_string())?;
    eprintln!(
        "{:<6} {:>10} {:>14} {:>10} {:>14} {:>8} {:>14}",
        "", "CRM won", "CRM revenue", "stored", "stored rev.", "missed", "missed rev."
    );
    for (cur, f) in &check.per_currency {
        eprintln!(
            "{:<6} {:>10} {:>14.2} {:>10} {:>14.2} {:>8} {:>14.2}",
            cur,
            f.crm_deals,
            f.crm_revenue,
            f.stored_wons,
            f.stored_revenue,
            f.missed,
            f.missed_revenue
        );
    }
    for m in &check.missed {
        eprintln!(
            "missed by webhook: deal {} ({}), won {}{}",
            m.deal_id,
            m.stage,
            m.won_at
                .map(|t| t.canonical())
                .unwrap_or_else(|| "at an unknown time".into()),
            if m.notes.is_empty() {
                String::new()
            } else {
                format!(": {}", m.notes.join("; "))
            }
        );
    }
    for c in &check.changed {
        eprintln!("changed in the CRM: deal {}: {}", c.deal_id, c.reason);
    }
    if let Some(funnel) = &check.funnel {
        eprintln!(
            "{:<6} {:>12} {:>10} {:>8}",
            "funnel", "CRM changes", "stored", "missed"
        );
        for (event, f) in &funnel.per_stage {
            eprintln!(
                "{:<6} {:>12} {:>10} {:>8}",
                event, f.crm_changes, f.stored, f.missed
            );
        }
        for m in &funnel.missed {
            eprintln!(
                "missed by webhook: contact {} entered {} ({}) at {}{}",
                m.record_id,
                m.stage,
                m.event_name,
                m.entered_at.canonical(),
                if m.notes.is_empty() {
                    String::new()
                } else {
                    format!(": {}", m.notes.join("; "))
                }
            );
        }
    }
    if let Some(path) = arg(args, "--csv") {
        std::fs::write(&path, check.to_csv()).map_err(|e| format!("--csv {path}: {e}"))?;
    }
    let mut v = check.to_json();
    if confirm {
        let queue =
            bridge_aws::sqs::SqsQueue::new(bridge_aws::clients::sqs(&aws), settings.queues.clone());
        let cfg = IngestConfig {
            default_region: settings.default_region,
            max_future_skew_secs: settings.max_future_skew_secs,
        };
        let report = client
            .repair(
                &check,
                Intake::new(&settings.mapping, &cfg, &store, &queue),
                now,
            )
            .await;
        let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
        for r in &report.results {
            let s = serde_json::to_value(r.status).map_err(|e| e.to_string())?;
            *counts
                .entry(s.as_str().unwrap_or("?").to_string())
                .or_insert(0) += 1;
        }
        eprintln!("repaired: {counts:?}");
        // Lowered amounts become refunds of the difference, through the refund machinery.
        let restated = bridge_core::crm_check::restate(&check, &store, &queue, now)
            .await
            .map_err(|e| e.to_string())?;
        for (deal, reason) in &restated.not_restated {
            eprintln!("not restated: deal {deal}: {reason}");
        }
        eprintln!(
            "restated: {} refund(s) stored, {} stored before",
            restated.stored, restated.existing
        );
        v["restated"] = serde_json::to_value(&restated).map_err(|e| e.to_string())?;
        v["mode"] = json!("crm_repair");
        v["repaired"] = json!(counts);
        v["enqueue_failures"] = json!(report.enqueue_failures);
    } else {
        v["mode"] = json!("crm_check");
        v["note"] =
            json!("nothing was stored or sent; run again with --repair to ingest the missed deals");
    }
    Ok(v)
}

/// `bridge-backfill report [--from D] [--to D] [--out DIR] [--crm]`: the reconciliation
/// report for any period (default: the last 7 days), built from the table as the reconcile
/// function builds its own, with the DLQ figures; `--crm` adds the CRM check (HubSpot, read
/// only). Writes `report.json`, `report.csv` and `report.html` into DIR (default `.`), prints
/// a summary table on stderr and the JSON on stdout.
async fn report(args: &[String]) -> Result<Value, String> {
    let now = Timestamp::now();
    let (from, to) = period(args, now, 7)?;
    let out = std::path::PathBuf::from(arg(args, "--out").unwrap_or_else(|| ".".into()));
    let settings = Settings::from_env().map_err(|e| e.to_string())?;
    let aws = bridge_aws::clients::operator_sdk_config().await;
    let store = event_store(&aws, &settings);
    let queue =
        bridge_aws::sqs::SqsQueue::new(bridge_aws::clients::sqs(&aws), settings.queues.clone());
    let events = bridge_core::store::EventStore::events_between(&store, from, to)
        .await
        .map_err(|e| e.to_string())?;
    let mut seen = bridge_core::reconcile::Observations::default();
    for d in bridge_core::delivery::Destination::ALL {
        if let Some(f) = queue.dead_letter_figures(d, now).await {
            seen.queues.insert(d, f);
        }
    }
    let mut report = bridge_core::reconcile::build_report("custom", from, to, now, &events, &seen);
    if args.iter().any(|a| a == "--crm") {
        let check = crm(&aws, &settings)
            .await?
            .check(&store, &settings.mapping, Window::new(from, to), now)
            .await
            .map_err(|e| e.to_string())?;
        report.crm = Some(bridge_core::reconcile::CrmSection {
            check,
            repaired: None,
        });
    }
    std::fs::create_dir_all(&out).map_err(|e| format!("--out {}: {e}", out.display()))?;
    let mut written = Vec::new();
    for (name, body) in [
        ("report.json", report.to_json()),
        ("report.csv", report.to_csv()),
        ("report.html", report.to_html()),
    ] {
        let path = out.join(name);
        std::fs::write(&path, body).map_err(|e| format!("{}: {e}", path.display()))?;
        written.push(path.display().to_string());
    }
    eprintln!(
        "{:<8} {:<6} {:>14} {:>14} {:>14} {:>9}",
        "platform", "", "CRM revenue", "delivered", "difference", "explained"
    );
    for (d, f) in &report.destinations {
        for (c, m) in &f.currencies {
            eprintln!(
                "{:<8} {:<6} {:>14} {:>14} {:>14} {:>9}",
                d,
                c,
                m.crm_revenue,
                m.delivered_revenue,
                m.difference,
                m.explained_by.len()
            );
        }
    }
    if let Some(crm) = &report.crm {
        eprintln!(
            "missed by webhook: {}, changed in the CRM: {}",
            crm.check.missed_count(),
            crm.check.changed.len()
        );
    }
    eprintln!("{} events; written: {}", report.events, written.join(", "));
    let mut v: Value = serde_json::from_str(&report.to_json()).map_err(|e| e.to_string())?;
    v["written"] = json!(written);
    Ok(v)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: bridge-backfill --file F.jsonl --source S (--url URL | --dry-run)\n       bridge-backfill erase [--email E] [--phone P] [--region US]\n       bridge-backfill correct --old-mapping OLD.toml --new-mapping NEW.toml [--days 90] [--confirm]\n       bridge-backfill crm-check [--from DATE] [--to DATE] [--csv FILE] [--repair]\n       bridge-backfill report [--from DATE] [--to DATE] [--out DIR] [--crm]";
    let run = async {
        match args.get(1).map(String::as_str) {
            Some("erase") => return erase(&args).await,
            Some("correct") => return correct(&args).await,
            Some("crm-check") => return crm_check(&args).await,
            Some("report") => return report(&args).await,
            _ => {}
        }
        let file = arg(&args, "--file").ok_or(usage)?;
        let source = arg(&args, "--source").unwrap_or_else(|| "generic".into());
        let text = std::fs::read_to_string(&file).map_err(|e| format!("{file}: {e}"))?;
        if args.iter().any(|a| a == "--dry-run") {
            dry(&source, &text).await
        } else {
            let secret = env("BRIDGE_SECRET")
                .ok_or("BRIDGE_SECRET must hold the source's signing secret")?;
            load(&arg(&args, "--url").ok_or(usage)?, &source, &text, &secret).await
        }
    };
    match run.await {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
        Err(e) => {
            eprintln!("bridge-backfill: {e}");
            std::process::exit(1);
        }
    }
}
