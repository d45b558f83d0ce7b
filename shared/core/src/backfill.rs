//! Backfill of historical CRM events (a JSONL file of canonical events). A real run posts them
//! through the ingest endpoint like any webhook, so idempotency, consent and the mapping apply
//! unchanged (a second run stores and sends nothing new). A dry run takes the same ingest path
//! into an in-memory store, builds every platform row, and asks the platforms to validate them
//! only (Meta `test_event_code`, Google `validateOnly`): it reports what would be sent and what
//! would be rejected and why, and changes no delivery state anywhere.

use crate::delivery::Outcome;
use crate::delivery::pipeline::Platform;
use crate::delivery::{DeliveryStatus, Destination};
use crate::event::{EventName, FieldError, parse_event_json};
use crate::ingest::{IngestConfig, Intake, ItemStatus, ingest};
use crate::mapping::Mapping;
use crate::queue::memory::MemoryQueue;
use crate::store::memory::MemoryStore;
use crate::timestamp::Timestamp;
use crate::webhook::Incoming;
use serde::Serialize;
use std::collections::BTreeMap;

/// The lines of a JSONL file as webhook items; blank lines are skipped, unreadable ones are
/// invalid items naming their line.
pub fn read_jsonl(text: &str) -> Vec<(usize, Incoming)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let item = match parse_event_json(l) {
                Ok(input) => Incoming::Event(Box::new(input)),
                Err(errors) => Incoming::Invalid(errors),
            };
            (i + 1, item)
        })
        .collect()
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct LineProblem {
    pub line: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    pub reason: String,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct DryRunReport {
    pub lines: usize,
    pub valid_events: usize,
    /// destination -> events that would be sent and that the platform accepted in validation.
    pub would_send: BTreeMap<String, usize>,
    /// destination -> events the consent gate would block.
    pub blocked_consent: BTreeMap<String, usize>,
    pub invalid: Vec<LineProblem>,
    pub would_reject: Vec<LineProblem>,
}

fn errors_text(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Validates `lines` through the ingest pipeline into memory, then prepares and
/// validate-only-sends each destination's rows with `platforms` (configured for dry runs).
pub async fn dry_run(
    lines: Vec<(usize, Incoming)>,
    source: &str,
    mapping: &Mapping,
    cfg: &IngestConfig,
    platforms: &[&dyn DryRunPlatform],
    now: Timestamp,
) -> DryRunReport {
    let store = MemoryStore::new();
    let queue = MemoryQueue::new(1000, std::time::Duration::from_secs(30));
    let line_numbers: Vec<usize> = lines.iter().map(|(n, _)| *n).collect();
    let items: Vec<Incoming> = lines.into_iter().map(|(_, i)| i).collect();
    let report = ingest(
        items,
        source,
        Intake::new(mapping, cfg, &store, &queue),
        now,
    )
    .await;
    let mut out = DryRunReport {
        lines: line_numbers.len(),
        ..Default::default()
    };
    let mut line_of: BTreeMap<String, usize> = BTreeMap::new();
    for r in &report.results {
        let line = line_numbers.get(r.index).copied().unwrap_or(0);
        match r.status {
            ItemStatus::Accepted | ItemStatus::Duplicate => {
                if let Some(id) = &r.event_id {
                    line_of.insert(id.clone(), line);
                }
            }
            _ => out.invalid.push(LineProblem {
                line,
                event_id: None,
                destination: None,
                reason: if r.errors.is_empty() {
                    format!("{:?}", r.status).to_lowercase()
                } else {
                    errors_text(&r.errors)
                },
            }),
        }
    }
    let events = store.all();
    out.valid_events = events.len();
    for p in platforms {
        let dest = p.destination();
        let mut rows = Vec::new();
        for e in &events {
            let Some(state) = e.destinations.get(&dest) else {
                continue;
            };
            let line = line_of.get(&e.event_id).copied().unwrap_or(0);
            let problem = |reason: String| LineProblem {
                line,
                event_id: Some(e.event_id.clone()),
                destination: Some(dest.as_str().into()),
                reason,
            };
            match state.status {
                DeliveryStatus::Pending => {}
                DeliveryStatus::BlockedConsent => {
                    *out.blocked_consent.entry(dest.as_str().into()).or_insert(0) += 1;
                    continue;
                }
                other => {
                    out.would_reject.push(problem(other.as_str().into()));
                    continue;
                }
            }
            // A refund is prepared as if its won event (in the file) had been delivered.
            let order: Vec<_> = match (&e.order_id, e.event_name) {
                (Some(o), EventName::Refund) => events
                    .iter()
                    .filter(|x| x.order_id.as_deref() == Some(o))
                    .cloned()
                    .map(|mut x| {
                        if x.event_name == EventName::Won
                            && let Some(s) = x.destinations.get_mut(&dest)
                            && s.status == DeliveryStatus::Pending
                        {
                            s.status = DeliveryStatus::Delivered;
                        }
                        x
                    })
                    .collect(),
                _ => Vec::new(),
            };
            match p.check(e, &order, now) {
                Ok(group) => rows.push((e.event_id.clone(), line, group)),
                Err(reason) => out.would_reject.push(problem(reason)),
            }
        }
        let outcomes = p.validate(&events, &rows, now).await;
        for ((event_id, line, _), o) in rows.iter().zip(outcomes) {
            match o {
                Outcome::Delivered { .. } => {
                    *out.would_send.entry(dest.as_str().into()).or_insert(0) += 1
                }
                Outcome::Retryable { error, .. }
                | Outcome::Rejected { error, .. }
                | Outcome::Wait { error, .. }
                | Outcome::Closed { error, .. } => out.would_reject.push(LineProblem {
                    line: *line,
                    event_id: Some(event_id.clone()),
                    destination: Some(dest.as_str().into()),
                    reason: format!("{}: {}", error.code, error.message),
                }),
            }
        }
    }
    out.would_reject
        .sort_by(|a, b| (a.line, &a.destination).cmp(&(b.line, &b.destination)));
    out
}

/// A destination as the dry run drives it: prepare one event (or say why it cannot go), then
/// send the prepared rows in validation mode.
#[async_trait::async_trait]
pub trait DryRunPlatform: Send + Sync {
    fn destination(&self) -> Destination;
    fn check(
        &self,
        event: &crate::event::CanonicalEvent,
        order: &[crate::event::CanonicalEvent],
        now: Timestamp,
    ) -> Result<String, String>;
    async fn validate(
        &self,
        events: &[crate::event::CanonicalEvent],
        rows: &[(String, usize, String)],
        now: Timestamp,
    ) -> Vec<Outcome>;
}

/// Any `Platform` (built in its dry-run mode) drives a dry run.
pub struct Checked<P>(pub P);

#[async_trait::async_trait]
impl<P: Platform> DryRunPlatform for Checked<P> {
    fn destination(&self) -> Destination {
        self.0.destination()
    }

    fn check(
        &self,
        event: &crate::event::CanonicalEvent,
        order: &[crate::event::CanonicalEvent],
        now: Timestamp,
    ) -> Result<String, String> {
        self.0
            .prepare(event, order, now)
            .map(|(group, _)| group)
            .map_err(|e| format!("{}: {}", e.code, e.message))
    }

    async fn validate(
        &self,
        events: &[crate::event::CanonicalEvent],
        rows: &[(String, usize, String)],
        now: Timestamp,
    ) -> Vec<Outcome> {
        // Rebuild the items (they are cheap) and send each group in chunks.
        let by_id: BTreeMap<&str, &crate::event::CanonicalEvent> =
            events.iter().map(|e| (e.event_id.as_str(), e)).collect();
        let mut out = vec![None; rows.len()];
        let mut groups: BTreeMap<String, Vec<(usize, P::Item)>> = BTreeMap::new();
        for (k, (id, _, _)) in rows.iter().enumerate() {
            let Some(e) = by_id.get(id.as_str()) else {
                continue;
            };
            let order: Vec<_> = e
                .order_id
                .as_ref()
                .map(|o| {
                    events
                        .iter()
                        .filter(|x| x.order_id.as_ref() == Some(o))
                        .cloned()
                        .map(|mut x| {
                            if x.event_name == EventName::Won
                                && let Some(s) = x.destinations.get_mut(&self.0.destination())
                            {
                                s.status = DeliveryStatus::Delivered;
                            }
                            x
                        })
                        .collect()
                })
                .unwrap_or_default();
            if let Ok((g, item)) = self.0.prepare(e, &order, now) {
                groups.entry(g).or_default().push((k, item));
            }
        }
        for (group, items) in groups {
            for chunk in items.chunks(self.0.max_batch().max(1)) {
                let batch: Vec<P::Item> = chunk.iter().map(|(_, i)| i.clone()).collect();
                let outcomes = self
                    .0
                    .send(&group, &batch, crate::delivery::Limits::DEFAULT)
                    .await;
                for ((k, _), o) in chunk.iter().zip(outcomes) {
                    out[*k] = Some(o);
                }
            }
        }
        out.into_iter()
            .map(|o| {
                o.unwrap_or(Outcome::Rejected {
                    error: crate::delivery::ErrorInfo::new(
                        crate::delivery::ErrorCode::NotValidated,
                        "could not be prepared",
                    ),
                    dead_letter: false,
                    alert: false,
                })
            })
            .collect()
    }
}
