//! The reconcile run as one use case behind ports: sweep the stuck pairs back onto their
//! queues, then for each period (the last day, the last 7 days) build the report from the
//! store, the dead-letter queues' figures, Data Manager's request statuses and, on the CRM's
//! own schedule, the system of record's side (checked, and repaired when configured); write it
//! as JSON, CSV and HTML to the report sink and emit its metrics. The reconcile function only
//! wires DynamoDB, SQS, S3, Google and the CRM client to these ports.

use super::{
    CrmSection, Observations, QueueFigures, SweepResult, build_report, data_manager_requests,
    fold_request_status, sweep,
};
use crate::crm_check::{CheckError, CrmCheck, restate};
use crate::delivery::Destination;
use crate::ingest::{IngestConfig, IngestReport, Intake};
use crate::mapping::Mapping;
use crate::queue::DeliveryQueue;
use crate::store::{EventStore, StoreError};
use crate::timestamp::{Timestamp, Window};
use async_trait::async_trait;
use serde::Serialize;
use std::collections::BTreeMap;

/// The report periods: name and days back from the run's time.
pub const PERIODS: [(&str, i64); 2] = [("last_day", 1), ("last_7_days", 7)];
/// Stuck pairs re-enqueued per destination and run.
pub const SWEEP_LIMIT: usize = 1000;
/// Data Manager requests whose status is asked per report.
pub const STATUS_CHECKS: usize = 200;

#[derive(Debug, thiserror::Error)]
#[error("report sink: {0}")]
pub struct SinkError(pub String);

/// Where reports are written (S3 in Lambda).
#[async_trait]
pub trait ReportSink: Send + Sync {
    async fn put(&self, key: &str, body: String, content_type: &str) -> Result<(), SinkError>;
}

/// The dead-letter queues' depth and oldest message (SQS in Lambda).
#[async_trait]
pub trait DeadLetterQueues: Send + Sync {
    /// `None` when `d` has no dead-letter queue or it cannot be read.
    async fn figures(&self, d: Destination, now: Timestamp) -> Option<QueueFigures>;
}

/// Data Manager's `requestStatus:retrieve` (the Google client, when configured).
#[async_trait]
pub trait RequestStatus: Send + Sync {
    async fn retrieve(&self, request_id: &str) -> Result<serde_json::Value, String>;
}

/// The system of record's API as reconciliation uses it (HubSpot or Salesforce:
/// `bridge_platforms::crm::CrmClient`).
#[async_trait]
pub trait CrmApi: Send + Sync {
    fn source(&self) -> &'static str;
    /// The CRM's won deals and funnel changes of `window` against the stored events.
    async fn check(
        &self,
        store: &dyn EventStore,
        mapping: &Mapping,
        window: Window,
        now: Timestamp,
    ) -> Result<CrmCheck, CheckError>;
    /// Ingests what `check` found missed, as its webhooks would have been.
    async fn repair(&self, check: &CrmCheck, to: Intake<'_>, now: Timestamp) -> IngestReport;
}

/// The CRM side of a run: the API, whether to repair (template parameter CrmRepair), and the
/// contract and ingest rules a repair follows.
pub struct CrmSide<'a> {
    pub api: &'a dyn CrmApi,
    pub repair: bool,
    pub mapping: &'a Mapping,
    pub ingest: IngestConfig,
}

/// What a run reads and writes.
pub struct Ports<'a> {
    pub store: &'a dyn EventStore,
    pub queue: &'a dyn DeliveryQueue,
    pub dead_letters: &'a dyn DeadLetterQueues,
    pub sink: &'a dyn ReportSink,
    /// Set when Google credentials are configured: Data Manager statuses are checked.
    pub google: Option<&'a dyn RequestStatus>,
    /// Set when the system of record's API is configured.
    pub crm: Option<CrmSide<'a>>,
}

/// What a run did: the sweep per destination and the report keys written.
#[derive(Debug, Default, Serialize)]
pub struct RunSummary {
    pub swept: BTreeMap<Destination, SweepResult>,
    pub reports: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// One run at `now`; `with_crm`: the reports also get the CRM's own side (its own, slower
/// schedule). The keys are `reports/<period>/<now>.<ext>`, so a re-run of the same schedule
/// event writes the same objects.
pub async fn run(p: &Ports<'_>, now: Timestamp, with_crm: bool) -> Result<RunSummary, RunError> {
    let mut seen = Observations::default();
    for dest in Destination::ALL {
        let swept = sweep(p.store, p.queue, dest, now, SWEEP_LIMIT).await?;
        seen.sweeps.insert(dest, swept);
        if let Some(f) = p.dead_letters.figures(dest, now).await {
            seen.queues.insert(dest, f);
        }
    }
    let mut written = Vec::new();
    for (period, days) in PERIODS {
        let from = now.minus_secs(days * 86_400);
        let events = p.store.events_between(from, now).await?;
        seen.platform_status.clear();
        if let Some(g) = p.google {
            let mut counts = BTreeMap::new();
            for id in data_manager_requests(&events, from, now)
                .iter()
                .take(STATUS_CHECKS)
            {
                match g.retrieve(id).await {
                    Ok(v) => fold_request_status(&mut counts, &v),
                    Err(e) => {
                        tracing::warn!(request_id = %id, error = %e, "requestStatus:retrieve failed");
                        *counts.entry("status:unavailable".to_string()).or_insert(0) += 1;
                    }
                }
            }
            if !counts.is_empty() {
                seen.platform_status.insert(Destination::Google, counts);
            }
        }
        let mut report = build_report(period, from, now, now, &events, &seen);
        if let Some(crm) = p.crm.as_ref().filter(|_| with_crm) {
            report.crm = crm_section(crm, p.store, p.queue, from, now).await;
        }
        let stem = format!("reports/{period}/{}", now.canonical());
        for (ext, body, content_type) in [
            ("json", report.to_json(), "application/json"),
            ("csv", report.to_csv(), "text/csv"),
            ("html", report.to_html(), "text/html; charset=utf-8"),
        ] {
            let key = format!("{stem}.{ext}");
            p.sink.put(&key, body, content_type).await?;
            written.push(key);
        }
        for line in report.metrics_lines(now.unix_ms()) {
            crate::metrics::emit(&line);
        }
        for (d, f) in &report.destinations {
            for (currency, c) in &f.currencies {
                tracing::info!(period, destination = %d, currency = %currency, crm_revenue = %c.crm_revenue,
                    delivered_revenue = %c.delivered_revenue, difference = %c.difference,
                    explained_by = c.explained_by.len(), dead_letter_depth = f.dead_letter_queue.depth,
                    re_enqueued = f.sweep.re_enqueued, "reconciliation");
            }
        }
    }
    Ok(RunSummary {
        swept: seen.sweeps,
        reports: written,
    })
}

/// The CRM side for one period: checked, then (with `repair`) what never arrived ingested and
/// lowered amounts restated. A CRM that cannot be read leaves the section out (logged), never
/// the rest of the report.
pub async fn crm_section(
    crm: &CrmSide<'_>,
    store: &dyn EventStore,
    queue: &dyn DeliveryQueue,
    from: Timestamp,
    now: Timestamp,
) -> Option<CrmSection> {
    let source = crm.api.source();
    let check = match crm
        .api
        .check(store, crm.mapping, Window::new(from, now), now)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(source, error = %e, "the CRM could not be reconciled");
            return None;
        }
    };
    let mut repaired = None;
    if crm.repair && check.missed_count() > 0 {
        let report = crm
            .api
            .repair(
                &check,
                Intake::new(crm.mapping, &crm.ingest, store, queue),
                now,
            )
            .await;
        let mut counts = BTreeMap::new();
        for r in &report.results {
            let status = serde_json::to_value(r.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            *counts.entry(status).or_insert(0u64) += 1;
        }
        tracing::info!(source, repaired = ?counts, enqueue_failures = report.enqueue_failures, "missed webhooks repaired");
        repaired = Some(counts);
    }
    if crm.repair
        && check
            .changed
            .iter()
            .any(|c| c.reason == "amount_changed_after_won")
    {
        // Lowered amounts become refunds of the difference, through the refund machinery.
        match restate(&check, store, queue, now).await {
            Ok(r) => {
                for (deal, reason) in &r.not_restated {
                    tracing::warn!(source, order_id = %deal, reason = %reason, "amount change not restated");
                }
                let counts = repaired.get_or_insert_with(BTreeMap::new);
                counts.insert("restated".into(), r.stored as u64);
                counts.insert("restated_before".into(), r.existing as u64);
                counts.insert("not_restated".into(), r.not_restated.len() as u64);
            }
            Err(e) => tracing::warn!(error = %e, "changed amounts could not be restated"),
        }
    }
    Some(CrmSection { check, repaired })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crm_check::{CrmFigures, Missed};
    use crate::delivery::{
        DeliveryLogEntry, DeliveryStatus, DestinationState, PairResult, REQUEST_ID_PREFIX,
    };
    use crate::event::{ValidationContext, parse_event_json, validate};
    use crate::queue::memory::MemoryQueue;
    use crate::store::memory::MemoryStore;
    use crate::webhook::hubspot::CrmError;
    use serde_json::json;
    use std::sync::Mutex;
    use std::time::Duration;

    fn now() -> Timestamp {
        Timestamp::parse_rfc3339("2026-11-28T12:00:00Z").unwrap()
    }

    /// Reports as S3 would hold them: key, body, content type.
    #[derive(Default)]
    struct Sink(Mutex<Vec<(String, String, String)>>);

    #[async_trait]
    impl ReportSink for Sink {
        async fn put(&self, key: &str, body: String, ct: &str) -> Result<(), SinkError> {
            self.0.lock().unwrap().push((key.into(), body, ct.into()));
            Ok(())
        }
    }

    impl Sink {
        fn json(&self, key: &str) -> serde_json::Value {
            let all = self.0.lock().unwrap();
            let (_, body, _) = all.iter().rev().find(|(k, _, _)| k == key).unwrap();
            serde_json::from_str(body).unwrap()
        }
    }

    /// Meta's DLQ holds two messages, the oldest a minute old; Google has none configured.
    struct Dlqs;

    #[async_trait]
    impl DeadLetterQueues for Dlqs {
        async fn figures(&self, d: Destination, _now: Timestamp) -> Option<QueueFigures> {
            (d == Destination::Meta).then_some(QueueFigures {
                depth: 2,
                oldest_age_secs: Some(60),
            })
        }
    }

    /// Data Manager: `req-ok` succeeded with one record refused; anything else unreachable.
    struct Statuses(Mutex<Vec<String>>);

    #[async_trait]
    impl RequestStatus for Statuses {
        async fn retrieve(&self, id: &str) -> Result<serde_json::Value, String> {
            self.0.lock().unwrap().push(id.to_string());
            match id {
                "req-ok" => Ok(
                    json!({"requestStatusPerDestination": [{"requestStatus": "SUCCESS",
                    "errorInfo": {"errorCounts": [{"reason": "INVALID_EMAIL", "recordCount": "1"}]}}]}),
                ),
                _ => Err("connection refused".into()),
            }
        }
    }

    /// The CRM: one won deal that never arrived, or unreadable; counts its repairs.
    struct Crm {
        down: bool,
        repairs: Mutex<usize>,
    }

    #[async_trait]
    impl CrmApi for Crm {
        fn source(&self) -> &'static str {
            "hubspot"
        }
        async fn check(
            &self,
            _store: &dyn EventStore,
            _mapping: &Mapping,
            window: Window,
            _now: Timestamp,
        ) -> Result<CrmCheck, CheckError> {
            if self.down {
                return Err(CrmError::Unavailable("HTTP 503".into()).into());
            }
            Ok(CrmCheck {
                source: "hubspot",
                from: window.from,
                to: window.to,
                per_currency: BTreeMap::from([(
                    "USD".to_string(),
                    CrmFigures {
                        crm_deals: 1,
                        crm_revenue: 75.0,
                        missed: 1,
                        missed_revenue: 75.0,
                        ..Default::default()
                    },
                )]),
                missed: vec![Missed {
                    deal_id: "9002".into(),
                    stage: "closedwon".into(),
                    won_at: Some(window.to.minus_secs(3600)),
                    amount: Some(75.0),
                    currency: Some("USD".into()),
                    notes: vec![],
                    replay: None,
                }],
                changed: vec![],
                funnel: None,
            })
        }
        async fn repair(&self, check: &CrmCheck, to: Intake<'_>, now: Timestamp) -> IngestReport {
            *self.repairs.lock().unwrap() += 1;
            crate::crm_check::repair(check, None, to, now).await
        }
    }

    /// A won delivered to Meta and, through Data Manager, to Google under `request`.
    fn won(store: &MemoryStore, order: &str, request: &str) {
        let v = json!({"source": "hubspot", "event_name": "won", "occurred_at": "2026-11-28T09:00:00Z",
            "entity_type": "opportunity", "entity_id": order, "order_id": order, "value": 100.0,
            "currency": "USD", "identity": {"email": "a@example.com"}});
        let ctx = ValidationContext::for_tests(now());
        let mut e = validate(&parse_event_json(&v.to_string()).unwrap(), &ctx).unwrap();
        for d in Destination::ALL {
            let mut s = DestinationState::new(DeliveryStatus::Delivered, now());
            s.log.push(DeliveryLogEntry {
                platform_ref: (d == Destination::Google)
                    .then(|| format!("{REQUEST_ID_PREFIX}{request}")),
                ..DeliveryLogEntry::new(1, PairResult::Delivered, now())
            });
            e.destinations.insert(d, s);
        }
        store.insert_legacy(&e);
    }

    /// The ports over these twins, the CRM side repairing.
    fn ports<'a>(
        store: &'a MemoryStore,
        queue: &'a MemoryQueue,
        sink: &'a Sink,
        google: Option<&'a dyn RequestStatus>,
        crm: &'a Crm,
        mapping: &'a Mapping,
    ) -> Ports<'a> {
        Ports {
            store,
            queue,
            dead_letters: &Dlqs,
            sink,
            google,
            crm: Some(CrmSide {
                api: crm,
                repair: true,
                mapping,
                ingest: IngestConfig {
                    default_region: crate::identity::Region::US,
                    max_future_skew_secs: 300,
                },
            }),
        }
    }

    #[tokio::test]
    async fn each_period_s_report_is_written_with_its_figures_and_the_crm_side_on_its_schedule() {
        let store = MemoryStore::new();
        let queue = MemoryQueue::new(5, Duration::from_secs(30));
        won(&store, "O1", "req-ok");
        won(&store, "O2", "req-lost");
        let sink = Sink::default();
        let statuses = Statuses(Mutex::new(vec![]));
        let crm = Crm {
            down: false,
            repairs: Mutex::new(0),
        };
        let mapping = Mapping::bundled().unwrap();
        let ports = ports(&store, &queue, &sink, Some(&statuses), &crm, &mapping);
        let summary = run(&ports, now(), false).await.unwrap();
        let stem = "2026-11-28T12:00:00.000Z";
        assert_eq!(
            summary.reports,
            ["json", "csv", "html"]
                .iter()
                .map(|ext| format!("reports/last_day/{stem}.{ext}"))
                .chain(
                    ["json", "csv", "html"]
                        .iter()
                        .map(|ext| format!("reports/last_7_days/{stem}.{ext}"))
                )
                .collect::<Vec<_>>()
        );
        let types: Vec<String> = sink.0.lock().unwrap().iter().map(|x| x.2.clone()).collect();
        assert_eq!(types[2], "text/html; charset=utf-8");
        let day = sink.json(&format!("reports/last_day/{stem}.json"));
        assert_eq!(day["destinations"]["meta"]["dead_letter_queue"]["depth"], 2);
        assert_eq!(
            day["destinations"]["meta"]["currencies"]["USD"]["delivered_revenue"],
            "200.00"
        );
        // Both requests asked once per period; the unreachable one counted, never fatal.
        let status = &day["destinations"]["google"]["platform_status"];
        assert_eq!(status["status:SUCCESS"], 1, "{status}");
        assert_eq!(status["error:INVALID_EMAIL"], 1);
        assert_eq!(status["status:unavailable"], 1);
        assert_eq!(statuses.0.lock().unwrap().len(), 4);
        assert!(day.get("crm").is_none(), "not the CRM's schedule");
        assert_eq!(*crm.repairs.lock().unwrap(), 0);

        // The CRM's schedule: the section in both periods, the missed deal repaired.
        run(&ports, now(), true).await.unwrap();
        let day = sink.json(&format!("reports/last_day/{stem}.json"));
        assert_eq!(day["crm"]["missed"][0]["deal_id"], "9002", "{day}");
        assert!(day["crm"]["repaired"].is_object());
        assert_eq!(*crm.repairs.lock().unwrap(), 2);
    }

    #[tokio::test]
    async fn a_crm_that_cannot_be_read_leaves_out_only_its_section() {
        let store = MemoryStore::new();
        let queue = MemoryQueue::new(5, Duration::from_secs(30));
        won(&store, "O1", "req-ok");
        let sink = Sink::default();
        let crm = Crm {
            down: true,
            repairs: Mutex::new(0),
        };
        let mapping = Mapping::bundled().unwrap();
        let ports = ports(&store, &queue, &sink, None, &crm, &mapping);
        let summary = run(&ports, now(), true).await.unwrap();
        assert_eq!(summary.reports.len(), 6);
        let day = sink.json("reports/last_day/2026-11-28T12:00:00.000Z.json");
        assert!(day.get("crm").is_none());
        assert_eq!(
            day["destinations"]["meta"]["currencies"]["USD"]["delivered_revenue"],
            "100.00"
        );
        assert!(
            day["destinations"]["google"]
                .get("platform_status")
                .is_none()
        );
        assert_eq!(*crm.repairs.lock().unwrap(), 0);
    }
}
