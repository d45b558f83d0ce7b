//! Reconciliation: the stuck-pair sweep (outbox recovery) and the report of what the CRM said
//! versus what each platform was told, per destination and currency, as JSON, CSV and a
//! self-contained HTML page (`html`). Pure over its inputs: the same events and queue figures
//! give byte-identical output.

pub mod html;
pub mod run;

use crate::delivery::{DeliveryStatus, Destination, PairResult, SWEEP_GRACE_SECS};
use crate::event::{CanonicalEvent, EventName};
use crate::money::Money;
use crate::queue::{DeliveryMessage, DeliveryQueue};
use crate::store::{EventStore, StoreError};
use crate::timestamp::Timestamp;
use serde::Serialize;
use std::collections::BTreeMap;

/// What one sweep did for one destination.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SweepResult {
    pub re_enqueued: usize,
    pub enqueue_failed: usize,
    /// Age of the most overdue open pair found, in seconds.
    pub oldest_overdue_secs: i64,
}

/// Re-enqueues every open pair of `dest` whose progress is overdue (pending with no message
/// in flight, sending past its lease, retry past its time), then moves its next look one
/// grace period on, so each stuck pair is re-enqueued once per period. The claim keeps a
/// re-enqueued pair that was not really stuck from being sent twice.
pub async fn sweep(
    store: &dyn EventStore,
    queue: &dyn DeliveryQueue,
    dest: Destination,
    now: Timestamp,
    limit: usize,
) -> Result<SweepResult, StoreError> {
    let stuck = store.stuck(dest, now, limit).await?;
    let mut out = SweepResult::default();
    if stuck.is_empty() {
        return Ok(out);
    }
    out.oldest_overdue_secs = stuck
        .iter()
        .map(|s| now.secs_since(&s.due))
        .max()
        .unwrap_or(0);
    let messages: Vec<DeliveryMessage> = stuck
        .iter()
        .map(|s| DeliveryMessage::new(&s.key, dest))
        .collect();
    let failed = queue.enqueue(&messages).await;
    let next = now.plus_secs(SWEEP_GRACE_SECS);
    for s in &stuck {
        if failed.iter().any(|m| m.key == s.key) {
            out.enqueue_failed += 1;
            continue;
        }
        store.defer_sweep(&s.key, dest, s.status, next).await?;
        out.re_enqueued += 1;
        tracing::info!(key = %s.key, destination = %dest, status = s.status.as_str(), result = "re_enqueued", "sweep");
    }
    Ok(out)
}

/// A dead-letter queue's depth and its oldest message's age (from a sample), as read by the
/// reconcile function.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct QueueFigures {
    pub depth: u64,
    pub oldest_age_secs: Option<i64>,
}

/// One revenue event that explains a difference between the CRM and a platform.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub event_id: String,
    pub order_id: String,
    pub event_name: String,
    pub amount: String,
    pub state: String,
    pub error_code: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CurrencyFigures {
    /// Won minus refunds, as the CRM recorded it.
    pub crm_revenue: String,
    /// Won minus refunds, as the platform was told (delivered events only).
    pub delivered_revenue: String,
    pub difference: String,
    pub explained_by: Vec<Explanation>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DestinationFigures {
    /// lifecycle stage -> final state -> events.
    pub by_stage: BTreeMap<String, BTreeMap<String, u64>>,
    pub by_state: BTreeMap<String, u64>,
    pub currencies: BTreeMap<String, CurrencyFigures>,
    /// Attempts that ended in a retry.
    pub retries: u64,
    /// Sends the bridge did not repeat, or that the platform recognised as replays.
    pub duplicates_prevented: u64,
    pub dead_letter_queue: QueueFigures,
    pub sweep: SweepResult,
    /// What the platform itself reports for the period's requests (Data Manager
    /// `requestStatus:retrieve`: request statuses and error counts by reason).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub platform_status: BTreeMap<String, u64>,
    /// Wons moved to another action by the correction command: step -> state -> events. Not
    /// CRM events, so in no other figure: a correction moves revenue between actions, it does
    /// not add any.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub corrections: BTreeMap<String, BTreeMap<String, u64>>,
}

/// The Data Manager requestIds recorded on the period's Google deliveries (deduplicated).
pub fn data_manager_requests(
    events: &[CanonicalEvent],
    from: Timestamp,
    to: Timestamp,
) -> Vec<String> {
    let mut ids: Vec<String> = events
        .iter()
        .filter(|e| e.occurred_at >= from && e.occurred_at < to)
        .filter_map(|e| e.destinations.get(&Destination::Google))
        .flat_map(|s| s.log.iter())
        .filter_map(|l| {
            l.platform_ref
                .as_deref()?
                .strip_prefix(crate::delivery::REQUEST_ID_PREFIX)
        })
        .map(str::to_string)
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Folds one `requestStatus:retrieve` answer into counts: `status:<STATUS>` per destination
/// and `error:<REASON>` record counts.
pub fn fold_request_status(counts: &mut BTreeMap<String, u64>, status: &serde_json::Value) {
    for d in status["requestStatusPerDestination"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let st = d["requestStatus"].as_str().unwrap_or("UNKNOWN");
        *counts.entry(format!("status:{st}")).or_insert(0) += 1;
        for e in d["errorInfo"]["errorCounts"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let reason = e["reason"].as_str().unwrap_or("UNKNOWN");
            let n = e["recordCount"]
                .as_str()
                .and_then(|x| x.parse().ok())
                .or(e["recordCount"].as_u64())
                .unwrap_or(1);
            *counts.entry(format!("error:{reason}")).or_insert(0) += n;
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub period: String,
    pub from: String,
    pub to: String,
    pub generated_at: String,
    pub events: u64,
    pub destinations: BTreeMap<String, DestinationFigures>,
    /// Revenue per business day (UTC) and currency: the CRM's against what each platform was
    /// told, for the charts a person reads.
    pub daily: Vec<DayRevenue>,
    /// The CRM's own side, when the run could ask the CRM (HubSpot configured): its won deals
    /// against the stored events, what never arrived by webhook and what changed since.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crm: Option<CrmSection>,
}

/// The CRM side of a report: [`crate::crm_check::CrmCheck`] and, when the run repaired, what
/// the repair ingested per item status.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CrmSection {
    #[serde(flatten)]
    pub check: crate::crm_check::CrmCheck,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repaired: Option<BTreeMap<String, u64>>,
}

/// One day's revenue in one currency: won minus refunds as the CRM stated it (the system of
/// record's events, each order once), and as each platform was told (delivered events only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DayRevenue {
    pub day: String,
    pub currency: String,
    pub crm: String,
    pub delivered: BTreeMap<String, String>,
}

/// The per-day revenue of `events` (already restricted to the period, corrections left out).
fn daily_revenue(events: &[&CanonicalEvent]) -> Vec<DayRevenue> {
    let zero = Money::from_micros(0);
    let mut days: BTreeMap<(String, String), (Money, BTreeMap<Destination, Money>)> =
        BTreeMap::new();
    for e in events {
        let (Some(v), Some(c)) = (e.value, e.currency.clone()) else {
            continue;
        };
        if !e.event_name.is_revenue() || e.correction.is_some() || e.destinations.is_empty() {
            continue;
        }
        // Not the truth (another source's revenue), or an order already counted by its holder.
        if e.destinations.values().any(|s| {
            matches!(
                s.status,
                DeliveryStatus::RejectedNotSystemOfRecord | DeliveryStatus::DuplicateOrder
            )
        }) {
            continue;
        }
        let signed = if e.event_name == EventName::Refund {
            zero.saturating_sub(v)
        } else {
            v
        };
        let day: String = e.occurred_at.canonical().chars().take(10).collect();
        let entry = days
            .entry((day, c))
            .or_insert_with(|| (zero, BTreeMap::new()));
        entry.0 = entry.0.saturating_add(signed);
        for (d, s) in &e.destinations {
            let told = entry.1.entry(*d).or_insert(zero);
            if s.status.is_delivered() {
                *told = told.saturating_add(signed);
            }
        }
    }
    days.into_iter()
        .map(|((day, currency), (crm, told))| DayRevenue {
            day,
            currency,
            crm: money(crm),
            delivered: Destination::ALL
                .iter()
                .map(|d| {
                    (
                        d.as_str().to_string(),
                        money(told.get(d).copied().unwrap_or(zero)),
                    )
                })
                .collect(),
        })
        .collect()
}

fn money(m: Money) -> String {
    format!("{:.2}", m.as_f64())
}

/// What the reconcile run observed besides the events: DLQ figures, the sweep's result and
/// what the platform reports about its requests, per destination.
#[derive(Clone, Debug, Default)]
pub struct Observations {
    pub queues: BTreeMap<Destination, QueueFigures>,
    pub sweeps: BTreeMap<Destination, SweepResult>,
    pub platform_status: BTreeMap<Destination, BTreeMap<String, u64>>,
}

/// The report for events whose business time is in `[from, to)`.
pub fn build_report(
    period: &str,
    from: Timestamp,
    to: Timestamp,
    generated_at: Timestamp,
    events: &[CanonicalEvent],
    seen: &Observations,
) -> Report {
    let (queues, sweeps, platform_status) = (&seen.queues, &seen.sweeps, &seen.platform_status);
    let mut sorted: Vec<&CanonicalEvent> = events
        .iter()
        .filter(|e| e.occurred_at >= from && e.occurred_at < to)
        .collect();
    sorted.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    let mut destinations = BTreeMap::new();
    for dest in Destination::ALL {
        let mut f = DestinationFigures {
            dead_letter_queue: queues.get(&dest).cloned().unwrap_or_default(),
            sweep: sweeps.get(&dest).cloned().unwrap_or_default(),
            platform_status: platform_status.get(&dest).cloned().unwrap_or_default(),
            ..Default::default()
        };
        let mut crm: BTreeMap<String, Money> = BTreeMap::new();
        let mut told: BTreeMap<String, Money> = BTreeMap::new();
        for e in &sorted {
            let Some(s) = e.destinations.get(&dest) else {
                continue;
            };
            let state = s.status.as_str().to_string();
            if let Some(c) = &e.correction {
                *f.corrections
                    .entry(c.step.as_str().to_string())
                    .or_default()
                    .entry(state)
                    .or_insert(0) += 1;
                continue;
            }
            *f.by_state.entry(state.clone()).or_insert(0) += 1;
            *f.by_stage
                .entry(e.event_name.as_str().to_string())
                .or_default()
                .entry(state.clone())
                .or_insert(0) += 1;
            for l in &s.log {
                match l.result {
                    PairResult::Retry => f.retries += 1,
                    PairResult::DeliveredReplay => f.duplicates_prevented += 1,
                    _ => {}
                }
            }
            if s.status == DeliveryStatus::DuplicateOrder {
                // A second won of an order already counted: never sent, and the CRM's revenue
                // for the order is the holder's.
                f.duplicates_prevented += 1;
                continue;
            }
            // Revenue the CRM's system of record stated; other sources' revenue is not the truth.
            let (Some(v), Some(c)) = (e.value, e.currency.clone()) else {
                continue;
            };
            if !e.event_name.is_revenue() || s.status == DeliveryStatus::RejectedNotSystemOfRecord {
                continue;
            }
            let signed = if e.event_name == EventName::Refund {
                Money::from_micros(0).saturating_sub(v)
            } else {
                v
            };
            let c_entry = crm.entry(c.clone()).or_insert(Money::from_micros(0));
            *c_entry = c_entry.saturating_add(signed);
            let t_entry = told.entry(c.clone()).or_insert(Money::from_micros(0));
            if s.status.is_delivered() {
                *t_entry = t_entry.saturating_add(signed);
            }
            if !s.status.is_delivered() || s.status == DeliveryStatus::RetractionUnsupported {
                f.currencies
                    .entry(c)
                    .or_default()
                    .explained_by
                    .push(Explanation {
                        event_id: e.event_id.clone(),
                        order_id: e.order_id.clone().unwrap_or_default(),
                        event_name: e.event_name.as_str().into(),
                        amount: money(signed),
                        state,
                        error_code: s
                            .last_error
                            .as_ref()
                            .map(|x| x.code.to_string())
                            .unwrap_or_default(),
                    });
            }
        }
        for (c, total) in crm {
            let delivered = told.get(&c).copied().unwrap_or(Money::from_micros(0));
            let entry = f.currencies.entry(c).or_default();
            entry.crm_revenue = money(total);
            entry.delivered_revenue = money(delivered);
            entry.difference = money(total.saturating_sub(delivered));
        }
        destinations.insert(dest.as_str().to_string(), f);
    }
    Report {
        period: period.to_string(),
        from: from.canonical(),
        to: to.canonical(),
        generated_at: generated_at.canonical(),
        events: sorted.iter().filter(|e| e.correction.is_none()).count() as u64,
        destinations,
        daily: daily_revenue(&sorted),
        crm: None,
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

impl Report {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// One row per figure: `period,destination,section,key,subkey,value`.
    pub fn to_csv(&self) -> String {
        let mut out = String::from("period,destination,section,key,subkey,value\n");
        let mut row = |d: &str, section: &str, key: &str, sub: &str, value: &str| {
            out.push_str(&format!(
                "{},{},{},{},{},{}\n",
                csv_field(&self.period),
                csv_field(d),
                section,
                csv_field(key),
                csv_field(sub),
                csv_field(value)
            ));
        };
        for (d, f) in &self.destinations {
            for (state, n) in &f.by_state {
                row(d, "state", state, "", &n.to_string());
            }
            for (stage, states) in &f.by_stage {
                for (state, n) in states {
                    row(d, "stage", stage, state, &n.to_string());
                }
            }
            for (step, states) in &f.corrections {
                for (state, n) in states {
                    row(d, "correction", step, state, &n.to_string());
                }
            }
            for (c, m) in &f.currencies {
                row(d, "revenue", c, "crm", &m.crm_revenue);
                row(d, "revenue", c, "delivered", &m.delivered_revenue);
                row(d, "revenue", c, "difference", &m.difference);
                for x in &m.explained_by {
                    row(
                        d,
                        "explained_by",
                        c,
                        &x.event_id,
                        &format!(
                            "{} {} {} {} {}",
                            x.event_name, x.order_id, x.amount, x.state, x.error_code
                        ),
                    );
                }
            }
            row(d, "retries", "", "", &f.retries.to_string());
            row(
                d,
                "duplicates_prevented",
                "",
                "",
                &f.duplicates_prevented.to_string(),
            );
            row(
                d,
                "dead_letter_queue",
                "depth",
                "",
                &f.dead_letter_queue.depth.to_string(),
            );
            row(
                d,
                "dead_letter_queue",
                "oldest_age_secs",
                "",
                &f.dead_letter_queue
                    .oldest_age_secs
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            );
            row(
                d,
                "sweep",
                "re_enqueued",
                "",
                &f.sweep.re_enqueued.to_string(),
            );
        }
        for day in &self.daily {
            row("crm", "daily", &day.day, &day.currency, &day.crm);
            for (d, v) in &day.delivered {
                row(d, "daily", &day.day, &day.currency, v);
            }
        }
        if let Some(crm) = &self.crm {
            let c = &crm.check;
            let d = format!("crm:{}", c.source);
            for (cur, f) in &c.per_currency {
                row(&d, "crm_won", cur, "deals", &f.crm_deals.to_string());
                row(
                    &d,
                    "crm_won",
                    cur,
                    "revenue",
                    &format!("{:.2}", f.crm_revenue),
                );
                row(&d, "crm_won", cur, "stored", &f.stored_wons.to_string());
                row(
                    &d,
                    "crm_won",
                    cur,
                    "stored_revenue",
                    &format!("{:.2}", f.stored_revenue),
                );
                row(&d, "crm_won", cur, "missed", &f.missed.to_string());
                row(
                    &d,
                    "crm_won",
                    cur,
                    "missed_revenue",
                    &format!("{:.2}", f.missed_revenue),
                );
            }
            for m in &c.missed {
                let amount = m.amount.map(|a| format!("{a:.2}")).unwrap_or_default();
                row(
                    &d,
                    "missed_by_webhook",
                    &m.deal_id,
                    &m.won_at.map(|t| t.canonical()).unwrap_or_default(),
                    format!(
                        "{amount} {} {}",
                        m.currency.as_deref().unwrap_or(""),
                        m.notes.join("; ")
                    )
                    .trim(),
                );
            }
            for x in &c.changed {
                row(&d, "changed_in_crm", &x.deal_id, x.reason, "");
            }
            for (event, f) in c.funnel.iter().flat_map(|f| &f.per_stage) {
                row(
                    &d,
                    "crm_funnel",
                    event,
                    "changes",
                    &f.crm_changes.to_string(),
                );
                row(&d, "crm_funnel", event, "stored", &f.stored.to_string());
                row(&d, "crm_funnel", event, "missed", &f.missed.to_string());
            }
            for m in c.funnel.iter().flat_map(|f| &f.missed) {
                row(
                    &d,
                    "missed_by_webhook",
                    &m.record_id,
                    &m.entered_at.canonical(),
                    format!("{} {}", m.event_name, m.notes.join("; ")).trim(),
                );
            }
            for (status, n) in crm.repaired.iter().flatten() {
                row(&d, "repaired", status, "", &n.to_string());
            }
        }
        out
    }

    /// The log summary and EMF metrics of one report.
    pub fn metrics_lines(&self, timestamp_ms: i64) -> Vec<String> {
        self.destinations
            .iter()
            .map(|(d, f)| {
                let diff: f64 = f
                    .currencies
                    .values()
                    .filter_map(|c| c.difference.parse::<f64>().ok())
                    .map(f64::abs)
                    .sum();
                crate::metrics::emf_line(
                    timestamp_ms,
                    &[
                        ("destination", d.as_str()),
                        ("period", self.period.as_str()),
                    ],
                    &[
                        ("dead_letter_size", f.dead_letter_queue.depth as f64),
                        ("re_enqueued", f.sweep.re_enqueued as f64),
                        ("revenue_difference", diff),
                        (
                            "blocked_consent",
                            f.by_state.get("blocked_consent").copied().unwrap_or(0) as f64,
                        ),
                    ],
                )
            })
            .chain(self.crm.iter().map(|crm| {
                let missed_revenue: f64 = crm
                    .check
                    .per_currency
                    .values()
                    .map(|f| f.missed_revenue)
                    .sum();
                crate::metrics::emf_line(
                    timestamp_ms,
                    &[
                        ("source", crm.check.source),
                        ("period", self.period.as_str()),
                    ],
                    &[
                        ("missed_by_webhook", crm.check.missed_count() as f64),
                        ("missed_by_webhook_revenue", missed_revenue),
                        ("changed_in_crm", crm.check.changed.len() as f64),
                    ],
                )
            }))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::{DeliveryLogEntry, DestinationState, ErrorCode, ErrorInfo};
    use crate::event::{ValidationContext, parse_event_json, validate};
    use crate::queue::memory::MemoryQueue;
    use crate::store::memory::MemoryStore;
    use serde_json::json;

    fn now() -> Timestamp {
        Timestamp::parse_rfc3339("2026-11-28T12:00:00Z").unwrap()
    }

    fn ev(
        v: serde_json::Value,
        states: &[(Destination, DeliveryStatus, &[&str])],
    ) -> CanonicalEvent {
        let ctx = ValidationContext::for_tests(now());
        let mut e = validate(&parse_event_json(&v.to_string()).unwrap(), &ctx).unwrap();
        for (d, st, log) in states {
            let mut s = DestinationState::new(*st, now());
            for (i, r) in log.iter().enumerate() {
                let result = serde_json::from_value(json!(r)).unwrap();
                s.log
                    .push(DeliveryLogEntry::new(i as u32 + 1, result, now()));
            }
            if *st == DeliveryStatus::DeadLetter {
                s.last_error = Some(ErrorInfo::new(ErrorCode::platform("CLICK_NOT_FOUND"), "x"));
            }
            e.destinations.insert(*d, s);
        }
        e
    }

    fn won(id: &str, order: &str, value: f64) -> serde_json::Value {
        json!({"source": "hubspot", "event_name": "won", "occurred_at": "2026-11-28T09:00:00Z", "entity_type": "opportunity",
               "entity_id": id, "order_id": order, "value": value, "currency": "USD", "identity": {"email": "a@example.com"}})
    }

    /// A known scenario, computed by hand: two won deals (1,000 and 500), a partial refund of
    /// 200 on the first, a third deal of 300 blocked by consent, a fourth of 50 dead-lettered
    /// on Google, and a lead.
    fn scenario() -> Vec<CanonicalEvent> {
        use DeliveryStatus::*;
        let (m, g) = (Destination::Meta, Destination::Google);
        let mut refund = won("R1", "O1", 200.0);
        refund["event_name"] = json!("refund");
        refund["entity_type"] = json!("order");
        refund["occurred_at"] = json!("2026-11-28T10:00:00Z");
        let lead = json!({"source": "hubspot", "event_name": "lead", "occurred_at": "2026-11-28T08:00:00Z", "entity_type": "lead",
                          "entity_id": "L1", "identity": {"email": "a@example.com"}});
        vec![
            ev(
                won("D1", "O1", 1000.0),
                &[
                    (m, Delivered, &["retry", "delivered"]),
                    (g, Delivered, &["delivered"]),
                ],
            ),
            ev(
                won("D2", "O2", 500.0),
                &[
                    (m, Delivered, &["delivered"]),
                    (g, Delivered, &["delivered_replay"]),
                ],
            ),
            ev(
                refund,
                &[
                    (m, Delivered, &["delivered"]),
                    (g, Delivered, &["delivered"]),
                ],
            ),
            ev(
                won("D3", "O3", 300.0),
                &[(m, BlockedConsent, &[]), (g, BlockedConsent, &[])],
            ),
            ev(
                won("D4", "O4", 50.0),
                &[
                    (m, Delivered, &["delivered"]),
                    (g, DeadLetter, &["dead_letter"]),
                ],
            ),
            ev(lead, &[(m, Delivered, &["delivered"])]),
        ]
    }

    #[test]
    fn report_matches_hand_computed_figures_and_is_deterministic() {
        let events = scenario();
        let mut seen = Observations::default();
        seen.queues.insert(
            Destination::Google,
            QueueFigures {
                depth: 1,
                oldest_age_secs: Some(600),
            },
        );
        let from = now().minus_secs(86_400);
        let r = build_report("last_day", from, now(), now(), &events, &seen);
        let meta = &r.destinations["meta"];
        let usd = &meta.currencies["USD"];
        // CRM: 1000 + 500 + 300 + 50 - 200 = 1650; Meta was told all but the blocked 300.
        assert_eq!(
            (
                usd.crm_revenue.as_str(),
                usd.delivered_revenue.as_str(),
                usd.difference.as_str()
            ),
            ("1650.00", "1350.00", "300.00")
        );
        assert_eq!(usd.explained_by.len(), 1);
        assert_eq!(
            (
                usd.explained_by[0].order_id.as_str(),
                usd.explained_by[0].state.as_str()
            ),
            ("O3", "blocked_consent")
        );
        assert_eq!(meta.by_state["delivered"], 5);
        assert_eq!(meta.by_stage["won"]["blocked_consent"], 1);
        assert_eq!(meta.retries, 1);
        let google = &r.destinations["google"];
        let usd = &google.currencies["USD"];
        // Google: 1000 + 500 - 200 = 1300 told; 300 blocked and 50 dead-lettered explain 350.
        assert_eq!(
            (
                usd.crm_revenue.as_str(),
                usd.delivered_revenue.as_str(),
                usd.difference.as_str()
            ),
            ("1650.00", "1300.00", "350.00")
        );
        let mut why: Vec<(&str, &str)> = usd
            .explained_by
            .iter()
            .map(|x| (x.state.as_str(), x.error_code.as_str()))
            .collect();
        why.sort();
        assert_eq!(
            why,
            [("blocked_consent", ""), ("dead_letter", "CLICK_NOT_FOUND")]
        );
        assert_eq!(google.duplicates_prevented, 1);
        assert_eq!(
            google.dead_letter_queue,
            QueueFigures {
                depth: 1,
                oldest_age_secs: Some(600)
            }
        );
        // Identical input, identical bytes, whatever the input order.
        let mut shuffled = events.clone();
        shuffled.reverse();
        let again = build_report("last_day", from, now(), now(), &shuffled, &seen);
        assert_eq!(r.to_json(), again.to_json());
        assert_eq!(r.to_csv(), again.to_csv());
        assert!(
            r.to_csv()
                .contains("last_day,google,revenue,USD,difference,350.00\n")
        );
        // Per day: the CRM's 1,650 against each platform's, as the charts draw them.
        assert_eq!(
            r.daily,
            [DayRevenue {
                day: "2026-11-28".into(),
                currency: "USD".into(),
                crm: "1650.00".into(),
                delivered: BTreeMap::from([
                    ("google".to_string(), "1300.00".to_string()),
                    ("meta".to_string(), "1350.00".to_string())
                ]),
            }]
        );
        assert!(
            r.to_csv()
                .contains("last_day,crm,daily,2026-11-28,USD,1650.00\n")
        );
        let page = r.to_html();
        assert_eq!(page, again.to_html());
        for figure in [
            "data-figure=\"daily.2026-11-28.USD.crm\">1650.00<",
            "data-figure=\"daily.2026-11-28.USD.google\">1300.00<",
            "data-figure=\"revenue.google.USD.difference\">350.00<",
            "data-figure=\"stage.meta.won.blocked_consent\">1<",
            "data-figure=\"dlq.google\">1<",
        ] {
            assert!(page.contains(figure), "{figure}");
        }
        for external in ["http:", "https:", "<script", "src=", "url("] {
            assert!(!page.contains(external), "self-contained: {external}");
        }
        for line in r.metrics_lines(1) {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(
                v["_aws"]["CloudWatchMetrics"][0]["Namespace"],
                "ConversionBridge"
            );
            assert!(v["dead_letter_size"].is_number());
        }
    }

    #[test]
    fn data_manager_statuses_fold_into_counts() {
        let mut c = BTreeMap::new();
        fold_request_status(
            &mut c,
            &json!({"requestStatusPerDestination": [
            {"requestStatus": "PARTIAL_SUCCESS", "errorInfo": {"errorCounts": [{"reason": "CLICK_NOT_FOUND", "recordCount": "3"}]}},
            {"requestStatus": "SUCCESS"}]}),
        );
        assert_eq!(c["status:PARTIAL_SUCCESS"], 1);
        assert_eq!(c["status:SUCCESS"], 1);
        assert_eq!(c["error:CLICK_NOT_FOUND"], 3);
    }

    #[tokio::test]
    async fn sweep_re_enqueues_exactly_the_stuck_pairs_once_per_grace_period() {
        use DeliveryStatus::*;
        let store = MemoryStore::new();
        let old = json!({"source": "hubspot", "event_name": "lead", "occurred_at": "2026-11-28T08:00:00Z", "entity_type": "lead",
                         "entity_id": "S1", "identity": {"email": "a@example.com"}});
        let mut fresh = old.clone();
        fresh["entity_id"] = json!("S2");
        let mut done = old.clone();
        done["entity_id"] = json!("S3");
        let mut stuck = ev(old, &[(Destination::Meta, Pending, &[])]);
        stuck
            .destinations
            .get_mut(&Destination::Meta)
            .unwrap()
            .updated_at = now().minus_secs(3600);
        let mut recent = ev(fresh, &[(Destination::Meta, Pending, &[])]);
        recent
            .destinations
            .get_mut(&Destination::Meta)
            .unwrap()
            .updated_at = now();
        let finished = ev(done, &[(Destination::Meta, Delivered, &["delivered"])]);
        for e in [&stuck, &recent, &finished] {
            store.put_new(e).await.unwrap();
        }
        let queue = MemoryQueue::new(5, std::time::Duration::from_secs(30));
        let r = sweep(&store, &queue, Destination::Meta, now(), 100)
            .await
            .unwrap();
        assert_eq!(r.re_enqueued, 1);
        let sent: Vec<String> = queue
            .messages(Destination::Meta)
            .iter()
            .map(|m| m.message.key.clone())
            .collect();
        assert_eq!(sent, [stuck.event_id.clone()]);
        let again = sweep(&store, &queue, Destination::Meta, now().plus_secs(60), 100)
            .await
            .unwrap();
        assert_eq!(again.re_enqueued, 0, "once per grace period");
        let later = sweep(
            &store,
            &queue,
            Destination::Meta,
            now().plus_secs(SWEEP_GRACE_SECS + 1),
            100,
        )
        .await
        .unwrap();
        assert_eq!(
            later.re_enqueued, 2,
            "still stuck: again, and the other pending pair is now overdue too"
        );
    }

    #[test]
    fn the_crm_side_goes_into_the_csv_and_the_metrics() {
        use crate::crm_check::{Changed, CrmCheck, CrmFigures, Missed};
        let from = now().minus_secs(86_400);
        let mut r = build_report(
            "last_day",
            from,
            now(),
            now(),
            &scenario(),
            &Default::default(),
        );
        let plain_rows = r.to_csv().lines().count();
        let figures = CrmFigures {
            crm_deals: 3,
            crm_revenue: 600.0,
            stored_wons: 2,
            stored_revenue: 400.0,
            missed: 1,
            missed_revenue: 200.0,
        };
        r.crm = Some(CrmSection {
            check: CrmCheck {
                source: "hubspot",
                from,
                to: now(),
                per_currency: BTreeMap::from([("EUR".to_string(), figures)]),
                missed: vec![Missed {
                    deal_id: "9002".into(),
                    stage: "closedwon".into(),
                    won_at: Some(now().minus_secs(3600)),
                    amount: Some(200.0),
                    currency: Some("EUR".into()),
                    notes: vec![],
                    replay: None,
                }],
                changed: vec![Changed {
                    deal_id: "9001".into(),
                    stored_value: Some(100.0),
                    stored_currency: Some("EUR".into()),
                    crm_amount: None,
                    crm_currency: None,
                    reason: "reopened_in_crm",
                }],
                funnel: Some(crate::crm_check::Funnel {
                    per_stage: BTreeMap::from([(
                        "mql",
                        crate::crm_check::StageFigures {
                            crm_changes: 4,
                            stored: 3,
                            missed: 1,
                        },
                    )]),
                    missed: vec![crate::crm_check::MissedStage {
                        record_id: "101".into(),
                        stage: "marketingqualifiedlead".into(),
                        event_name: "mql",
                        entered_at: now().minus_secs(7200),
                        notes: vec![],
                        replay: None,
                    }],
                }),
            },
            repaired: Some(BTreeMap::from([("accepted".to_string(), 1)])),
        });
        let csv = r.to_csv();
        let crm: Vec<&str> = csv.lines().skip(plain_rows).collect();
        assert_eq!(
            crm,
            [
                "last_day,crm:hubspot,crm_won,EUR,deals,3",
                "last_day,crm:hubspot,crm_won,EUR,revenue,600.00",
                "last_day,crm:hubspot,crm_won,EUR,stored,2",
                "last_day,crm:hubspot,crm_won,EUR,stored_revenue,400.00",
                "last_day,crm:hubspot,crm_won,EUR,missed,1",
                "last_day,crm:hubspot,crm_won,EUR,missed_revenue,200.00",
                "last_day,crm:hubspot,missed_by_webhook,9002,2026-11-28T11:00:00.000Z,200.00 EUR",
                "last_day,crm:hubspot,changed_in_crm,9001,reopened_in_crm,",
                "last_day,crm:hubspot,crm_funnel,mql,changes,4",
                "last_day,crm:hubspot,crm_funnel,mql,stored,3",
                "last_day,crm:hubspot,crm_funnel,mql,missed,1",
                "last_day,crm:hubspot,missed_by_webhook,101,2026-11-28T10:00:00.000Z,mql",
                "last_day,crm:hubspot,repaired,accepted,,1",
            ]
        );
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["crm"]["missed"][0]["deal_id"], "9002");
        assert_eq!(json["crm"]["repaired"]["accepted"], 1);
        assert_eq!(json["crm"]["funnel"]["per_stage"]["mql"]["missed"], 1);
        assert_eq!(json["crm"]["funnel"]["missed"][0]["record_id"], "101");
        let metrics = r.metrics_lines(0);
        let last: serde_json::Value = serde_json::from_str(metrics.last().unwrap()).unwrap();
        assert_eq!(last["source"], "hubspot");
        assert_eq!(last["missed_by_webhook"], 2.0, "the deal and the MQL");
        assert_eq!(last["missed_by_webhook_revenue"], 200.0);
        assert_eq!(last["changed_in_crm"], 1.0);
    }
}
