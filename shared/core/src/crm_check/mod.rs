//! Reconciling against the CRM itself: the won deals the system of record shows for a period
//! (HubSpot's deal search, or Salesforce's won opportunities) and its lead funnel's stage
//! changes (contacts' lifecycle stage history, or leads' status history), compared with the
//! events the bridge stored, so a change whose webhook never arrived (HubSpot gave up after its
//! retries, a Salesforce callout that is never retried, a paused subscription) is found, and on
//! request ingested exactly as its webhook would have been.
//!
//! A missed deal becomes the webhook the CRM would have sent (`occurred_at` = the stage
//! history's own time of the change, never the time of the repair) and goes through that
//! webhook's own parsing and the ingest use case: the same validation, consent and event_id
//! rules. A late webhook for the same change is then a duplicate, and the order guard keeps an
//! order counted once either way. Each CRM is one [`CrmSide`]: `hubspot` and `salesforce`.

pub mod hubspot;
pub mod salesforce;

use crate::delivery::DeliveryStatus;
use crate::event::{CanonicalEvent, EventName};
use crate::ingest::{IngestReport, Intake, ingest};
use crate::mapping::Mapping;
use crate::money::Money;
use crate::queue::DeliveryMessage;
use crate::queue::DeliveryQueue;
use crate::store::PutOutcome;
use crate::store::{EventStore, StoreError};
use crate::timestamp::{Timestamp, Window};
use crate::webhook::Incoming;
use crate::webhook::hubspot::{CrmError, HubSpotEvent, HubSpotRecords, ResolveOptions, resolve};
use async_trait::async_trait;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};

pub use hubspot::{HubSpotSearch, check_hubspot};
pub use salesforce::{SalesforceApi, SfContact, SfOpportunity, check_salesforce};

/// Meta refuses an event older than 7 days (and the whole request that holds one): a repair
/// later than that reaches Google only. source: M-EVENT
const META_WINDOW_SECS: i64 = 7 * 86_400;

/// A deal as the CRM's search lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct CrmDeal {
    pub id: String,
    pub stage: String,
    pub amount: Option<f64>,
    pub currency: Option<String>,
}

/// One CRM as the check needs it: its won deals of a period, what it knows about the ones the
/// bridge never stored, and why a stored won is no longer listed.
#[async_trait]
pub trait CrmSide: Send + Sync {
    /// The source name the webhooks of this CRM are stored under.
    fn source(&self) -> &'static str;
    /// Every deal in one of `stages` whose close date is in `window`, all pages read.
    async fn won_deals(&self, stages: &[String], window: Window) -> Result<Vec<CrmDeal>, CrmError>;
    /// What each of `deals` (none of them stored) would be as its webhook: when it entered its
    /// stage, and the webhook to replay, or notes saying why there is none.
    async fn explain_missed(
        &self,
        deals: &[CrmDeal],
        mapping: &Mapping,
        now: Timestamp,
    ) -> Result<Vec<Missed>, CheckError>;
    /// For each stored won whose deal (`orders`) the search did not list: `deleted_in_crm`,
    /// `reopened_in_crm`, or `None` when it is still won (its close date is outside the period).
    async fn why_not_listed(
        &self,
        orders: &[String],
        stages: &[String],
    ) -> Result<Vec<Option<&'static str>>, CheckError>;
    /// The lead funnel: every entry of a record into one of `stages` (lifecycle stages the
    /// mapping maps to lead, MQL or SQL) at a time in `window`, from the CRM's own stage
    /// history. `None` where this side does not read them (the report says so).
    async fn stage_entries(
        &self,
        _stages: &[String],
        _window: Window,
    ) -> Result<Option<Vec<StageEntry>>, CheckError> {
        Ok(None)
    }
    /// For each of `entries` (none of them stored): the webhook the CRM would have sent for it,
    /// and notes on what a repair of it will not reach.
    async fn replay_stages(
        &self,
        entries: &[StageEntry],
        _mapping: &Mapping,
    ) -> Result<Vec<(Option<Replay>, Vec<String>)>, CheckError> {
        Ok(entries.iter().map(|_| (None, Vec::new())).collect())
    }
}

/// A record's entry into a lifecycle stage, as the CRM's property history shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct StageEntry {
    pub record_id: String,
    pub stage: String,
    pub at: Timestamp,
}

/// A lead-funnel change (lead, MQL, SQL) the CRM shows and the bridge never stored.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MissedStage {
    pub record_id: String,
    pub stage: String,
    pub event_name: &'static str,
    /// The history's time of the change: the `occurredAt` its webhook carried.
    pub entered_at: Timestamp,
    pub notes: Vec<String>,
    #[serde(skip)]
    pub replay: Option<Replay>,
}

/// Per funnel event: the stage entries the CRM shows against the events the bridge stored.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct StageFigures {
    pub crm_changes: u64,
    pub stored: u64,
    pub missed: u64,
}

/// The lead funnel's side of the check.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Funnel {
    /// By event name (`lead`, `mql`, `sql`).
    pub per_stage: BTreeMap<&'static str, StageFigures>,
    pub missed: Vec<MissedStage>,
}

/// How far a stored change's `occurred_at` may be from the history's time of the same change
/// and still be that change: the window the webhook path confirms a change within
/// (`ResolveOptions::confirm_window_ms`), so the two never disagree on what arrived.
const STAGE_MATCH_MS: i64 = 300_000;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("the mapping contract maps no {0} deal stage to won")]
    NoWonStage(&'static str),
    #[error(transparent)]
    Crm(#[from] CrmError),
    #[error("event store: {0}")]
    Store(#[from] StoreError),
}

/// The webhook a CRM would have sent for a missed deal.
#[derive(Clone, Debug, PartialEq)]
pub enum Replay {
    /// A `deal.propertyChange` of `dealstage`, resolved against the record as a live one is.
    HubSpot(HubSpotEvent),
    /// One change item as a Salesforce Flow posts it (`webhook::salesforce`), as JSON.
    Salesforce(String),
}

/// A won deal the bridge never stored.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Missed {
    pub deal_id: String,
    pub stage: String,
    /// When the deal entered the stage, from its stage history (the webhook's time).
    pub won_at: Option<Timestamp>,
    pub amount: Option<f64>,
    pub currency: Option<String>,
    /// Why it cannot be repaired as it stands, or what a repair cannot reach.
    pub notes: Vec<String>,
    #[serde(skip)]
    pub replay: Option<Replay>,
}

impl Missed {
    fn new(deal: &CrmDeal) -> Missed {
        Missed {
            deal_id: deal.id.clone(),
            stage: deal.stage.clone(),
            won_at: None,
            amount: deal.amount,
            currency: deal.currency.clone(),
            notes: Vec::new(),
            replay: None,
        }
    }

    /// Records when the deal was won, with the note a repair past Meta's window needs.
    fn won_at(&mut self, at: Timestamp, now: Timestamp) {
        self.won_at = Some(at);
        if now.secs_since(&at) > META_WINDOW_SECS {
            self.notes
                .push("older than 7 days: Meta refuses it, so a repair reaches Google only".into());
        }
    }
}

/// A won the bridge stored whose CRM record says something else now.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Changed {
    pub deal_id: String,
    pub stored_value: Option<f64>,
    pub stored_currency: Option<String>,
    /// `None` when the deal is no longer won (reopened, lost or deleted).
    pub crm_amount: Option<f64>,
    pub crm_currency: Option<String>,
    pub reason: &'static str,
}

/// Per currency: what the CRM shows won against what the bridge stored.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct CrmFigures {
    pub crm_deals: u64,
    pub crm_revenue: f64,
    pub stored_wons: u64,
    pub stored_revenue: f64,
    pub missed: u64,
    pub missed_revenue: f64,
}

/// The CRM side of reconciliation for one period.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CrmCheck {
    pub source: &'static str,
    pub from: Timestamp,
    pub to: Timestamp,
    pub per_currency: BTreeMap<String, CrmFigures>,
    pub missed: Vec<Missed>,
    pub changed: Vec<Changed>,
    /// The lead funnel (contacts' lifecycle stages), where the CRM side reads it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub funnel: Option<Funnel>,
}

impl CrmCheck {
    /// Every missed change, deals and funnel stages: the figure the alarm watches.
    pub fn missed_count(&self) -> usize {
        self.missed.len() + self.funnel.as_ref().map_or(0, |f| f.missed.len())
    }

    /// Why `deal_id` changed in the CRM after it was won, if it did.
    pub fn change_of(&self, deal_id: &str) -> Option<&'static str> {
        self.changed
            .iter()
            .find(|c| c.deal_id == deal_id)
            .map(|c| c.reason)
    }
}

const UNKNOWN_CURRENCY: &str = "(none)";

fn stored_won<'a>(events: &'a [CanonicalEvent], source: &str) -> Option<&'a CanonicalEvent> {
    events
        .iter()
        .filter(|e| e.source == source && e.event_name == EventName::Won)
        .min_by_key(|e| e.occurred_at)
}

/// The `crm_stage` of the refunds a repair stores to restate a won to the CRM's lower amount.
pub const RESTATEMENT_STAGE: &str = "crm_amount_restated";

/// What the bridge already restated of an order's won (its restatement refunds).
fn restated(events: &[CanonicalEvent]) -> Money {
    events
        .iter()
        .filter(|e| {
            e.event_name == EventName::Refund && e.crm_stage.as_deref() == Some(RESTATEMENT_STAGE)
        })
        .filter_map(|e| e.value)
        .fold(Money::ZERO, Money::saturating_add)
}

fn differs(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(x), Some(y)) => (x - y).abs() >= 0.005,
        (None, None) => false,
        _ => true,
    }
}

/// What one check covers: the HubSpot account (`portalId`, put on the webhooks a repair
/// replays; unused for Salesforce) and the period of close dates.
#[derive(Clone, Copy, Debug)]
pub struct Period {
    pub portal_id: Option<i64>,
    pub window: Window,
}

/// The stages the mapping contract maps to won for `source`, as the contract spells them.
fn won_stages(mapping: &Mapping, source: &'static str) -> Result<Vec<String>, CheckError> {
    let mut stages: Vec<String> = mapping
        .source(source)
        .map(|s| {
            s.stages
                .iter()
                .filter(|(_, e)| **e == EventName::Won)
                .map(|(stage, _)| stage.clone())
                .collect()
        })
        .unwrap_or_default();
    stages.sort();
    if stages.is_empty() {
        return Err(CheckError::NoWonStage(source));
    }
    Ok(stages)
}

/// The stages the mapping contract maps to a funnel event (lead, MQL, SQL) for `source`.
fn funnel_stages(mapping: &Mapping, source: &'static str) -> Vec<String> {
    let mut stages: Vec<String> = mapping
        .source(source)
        .map(|s| {
            s.stages
                .iter()
                .filter(|(_, e)| !e.is_revenue())
                .map(|(stage, _)| stage.clone())
                .collect()
        })
        .unwrap_or_default();
    stages.sort();
    stages
}

/// Compares the CRM's won deals of `window` with the stored events. Asks the CRM about the
/// missed deals (for their replays) and the stored wons it no longer lists; stores nothing.
pub async fn check(
    side: &dyn CrmSide,
    store: &dyn EventStore,
    mapping: &Mapping,
    window: Window,
    now: Timestamp,
) -> Result<CrmCheck, CheckError> {
    let source = side.source();
    let stages = won_stages(mapping, source)?;
    let deals = side.won_deals(&stages, window).await?;
    let mut check = CrmCheck {
        source,
        from: window.from,
        to: window.to,
        per_currency: BTreeMap::new(),
        missed: Vec::new(),
        changed: Vec::new(),
        funnel: None,
    };
    // The period's stored events, and a match window either side for the funnel's changes: a
    // won whose order id is not the CRM's record id (a Flow may send its own `order_id`) is
    // still found by its record (`entity_id`).
    let wide = window.widened_ms(STAGE_MATCH_MS);
    let around = store.events_between(wide.from, wide.to).await?;
    let period_events: Vec<&CanonicalEvent> = around
        .iter()
        .filter(|e| window.contains(e.occurred_at))
        .collect();
    let order_of_record: HashMap<&str, &str> = period_events
        .iter()
        .filter(|e| e.source == source && e.event_name == EventName::Won)
        .filter_map(|e| Some((e.entity_id.as_str(), e.order_id.as_deref()?)))
        .collect();
    let mut seen = HashSet::new();
    let mut missed = Vec::new();
    for deal in &deals {
        seen.insert(deal.id.clone());
        let cur = deal
            .currency
            .clone()
            .unwrap_or_else(|| UNKNOWN_CURRENCY.into());
        let amount = deal.amount.unwrap_or(0.0);
        {
            let f = check.per_currency.entry(cur.clone()).or_default();
            f.crm_deals += 1;
            f.crm_revenue += amount;
        }
        let mut events = store.find_by_order(&deal.id).await?;
        if stored_won(&events, source).is_none()
            && let Some(order) = order_of_record.get(deal.id.as_str())
        {
            events = store.find_by_order(order).await?;
        }
        if let Some(won) = stored_won(&events, source) {
            if let Some(order) = &won.order_id {
                seen.insert(order.clone());
            }
            // The won as the platforms now hold it: less what a repair already restated.
            let value = won
                .value
                .map(|m| m.saturating_sub(restated(&events)).as_f64());
            // Stored revenue counts in the won's own currency.
            let stored_cur = won.currency.clone().unwrap_or(cur);
            let f = check.per_currency.entry(stored_cur).or_default();
            f.stored_wons += 1;
            f.stored_revenue += value.unwrap_or(0.0);
            // A deal without a currency is in the account's own; only a named one can differ.
            let currency_moved = deal.currency.is_some() && won.currency != deal.currency;
            if differs(value, deal.amount) || currency_moved {
                check.changed.push(Changed {
                    deal_id: deal.id.clone(),
                    stored_value: value,
                    stored_currency: won.currency.clone(),
                    crm_amount: deal.amount,
                    crm_currency: deal.currency.clone(),
                    reason: "amount_changed_after_won",
                });
            }
            continue;
        }
        let f = check.per_currency.entry(cur).or_default();
        f.missed += 1;
        f.missed_revenue += amount;
        missed.push(deal.clone());
    }
    check.missed = side.explain_missed(&missed, mapping, now).await?;
    // Stored wons of the period the search did not list: the CRM says whether the deal was
    // reopened or deleted, or only has a close date outside the period (then all is well).
    // The CRM is asked by record id (`entity_id`: the deal or opportunity).
    let mut unlisted: Vec<&CanonicalEvent> = Vec::new();
    for e in period_events.iter().copied() {
        let Some(order) = e.order_id.as_deref() else {
            continue;
        };
        if e.source != source
            || e.event_name != EventName::Won
            || seen.contains(order)
            || seen.contains(&e.entity_id)
        {
            continue;
        }
        seen.insert(order.to_string());
        seen.insert(e.entity_id.clone());
        unlisted.push(e);
    }
    let records: Vec<String> = unlisted.iter().map(|e| e.entity_id.clone()).collect();
    let reasons = side.why_not_listed(&records, &stages).await?;
    for (e, reason) in unlisted.iter().zip(reasons) {
        let Some(reason) = reason else {
            continue;
        };
        check.changed.push(Changed {
            deal_id: e.entity_id.clone(),
            stored_value: e.value.map(|m| m.as_f64()),
            stored_currency: e.currency.clone(),
            crm_amount: None,
            crm_currency: None,
            reason,
        });
    }
    check.funnel = funnel(side, mapping, &around, window, now).await?;
    Ok(check)
}

/// The lead funnel: each stage entry the CRM's history shows in `window` against the stored
/// events of the same record and funnel event within [`STAGE_MATCH_MS`] of it.
async fn funnel(
    side: &dyn CrmSide,
    mapping: &Mapping,
    stored: &[CanonicalEvent],
    window: Window,
    now: Timestamp,
) -> Result<Option<Funnel>, CheckError> {
    let source = side.source();
    let stages = funnel_stages(mapping, source);
    if stages.is_empty() {
        return Ok(None);
    }
    let Some(entries) = side.stage_entries(&stages, window).await? else {
        return Ok(None);
    };
    let mut times: HashMap<(&str, EventName), Vec<i64>> = HashMap::new();
    for e in stored.iter().filter(|e| e.source == source) {
        times
            .entry((e.entity_id.as_str(), e.event_name))
            .or_default()
            .push(e.occurred_at.unix_ms());
    }
    let mut out = Funnel::default();
    let mut missed = Vec::new();
    for entry in entries {
        let Some(event) = mapping
            .lifecycle_for(source, &entry.stage)
            .filter(|e| !e.is_revenue())
        else {
            continue;
        };
        let figures = out.per_stage.entry(event.as_str()).or_default();
        figures.crm_changes += 1;
        let at = entry.at.unix_ms();
        let arrived = times
            .get(&(entry.record_id.as_str(), event))
            .is_some_and(|t| {
                t.iter()
                    .any(|s| s.abs_diff(at) <= STAGE_MATCH_MS.unsigned_abs())
            });
        if arrived {
            figures.stored += 1;
            continue;
        }
        figures.missed += 1;
        missed.push((entry, event));
    }
    let entries: Vec<StageEntry> = missed.iter().map(|(e, _)| e.clone()).collect();
    let replays = side.replay_stages(&entries, mapping).await?;
    for ((entry, event), (replay, mut notes)) in missed.into_iter().zip(replays) {
        if now.secs_since(&entry.at) > META_WINDOW_SECS {
            notes
                .push("older than 7 days: Meta refuses it, so a repair reaches Google only".into());
        }
        if replay.is_none() && notes.is_empty() {
            notes.push("no webhook of this CRM replays the change".into());
        }
        out.missed.push(MissedStage {
            record_id: entry.record_id,
            stage: entry.stage,
            event_name: event.as_str(),
            entered_at: entry.at,
            notes,
            replay,
        });
    }
    out.missed
        .sort_by(|a, b| (a.entered_at, &a.record_id).cmp(&(b.entered_at, &b.record_id)));
    Ok(Some(out))
}

/// Ingests the missed deals and funnel changes as their webhooks would have been: a HubSpot
/// replay resolved against the CRM (`hubspot` gives the record reader and the resolution
/// options), a Salesforce one parsed as its Flow's post; then the ingest use case. Those
/// without a replay (see their notes) are left out.
pub async fn repair(
    check: &CrmCheck,
    hubspot: Option<(&dyn HubSpotRecords, &ResolveOptions)>,
    to: Intake<'_>,
    now: Timestamp,
) -> IngestReport {
    let mapping = to.mapping;
    let mut hooks: Vec<HubSpotEvent> = Vec::new();
    let mut items: Vec<Incoming> = Vec::new();
    let funnel = check.funnel.iter().flat_map(|f| &f.missed);
    for replay in check
        .missed
        .iter()
        .map(|m| &m.replay)
        .chain(funnel.map(|m| &m.replay))
    {
        match replay {
            Some(Replay::HubSpot(e)) => hooks.push(e.clone()),
            Some(Replay::Salesforce(raw)) => items.push(crate::webhook::salesforce::parse_item(
                raw,
                check.source,
                mapping,
            )),
            None => {}
        }
    }
    if !hooks.is_empty() {
        match hubspot {
            Some((records, opts)) => {
                items.extend(resolve(&hooks, records, mapping, opts, &HashSet::new()).await)
            }
            None => items.extend(hooks.iter().map(|_| {
                Incoming::Unavailable("no HubSpot API client to resolve the replay with".into())
            })),
        }
    }
    ingest(items, check.source, to, now).await
}

/// What restating changed amounts did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Restated {
    /// Restatement refunds stored now (and enqueued to every platform that counted the won).
    pub stored: usize,
    /// Already stored by an earlier run for the same CRM amount: nothing new.
    pub existing: usize,
    /// Amount changes a refund cannot express, by deal, with the reason.
    pub not_restated: Vec<(String, String)>,
    /// Messages that could not be enqueued: the sweep enqueues the pending pairs.
    pub enqueue_failures: usize,
}

/// The refund that brings `won` (already restated by `so_far`) down to `crm_amount`: the won's
/// identity hashes, consent and order, a pending pair at each platform that counted the won or
/// still may, and a key derived from the won and what was restated before, so a second run
/// stores nothing.
pub fn restatement(
    won: &CanonicalEvent,
    so_far: Money,
    crm_amount: Money,
    now: Timestamp,
) -> Option<CanonicalEvent> {
    let delta = won.value?.saturating_sub(so_far).saturating_sub(crm_amount);
    if delta <= Money::ZERO {
        return None;
    }
    // Keyed by what was restated before: two runs that start from the same state (the
    // schedule and an operator's command at once) store one refund between them.
    let so_far_micros = so_far.micros().to_string();
    let event_id = crate::hashing::sha256_hex_joined(&[
        RESTATEMENT_STAGE,
        won.key.as_str(),
        so_far_micros.as_str(),
    ]);
    // Wherever the won counts or may still count: the refund waits for its won there.
    let destinations = won
        .destinations
        .iter()
        .filter(|(_, s)| {
            s.status.is_delivered() || s.status.is_open() || s.status == DeliveryStatus::DeadLetter
        })
        .map(|(d, _)| *d);
    Some(CanonicalEvent {
        crm_stage: Some(RESTATEMENT_STAGE.into()),
        occurred_at: now,
        received_at: now,
        value: Some(delta),
        ..CanonicalEvent::derived_from_won(won, event_id, EventName::Refund, destinations, now)
    })
}

/// Restates, through the refund machinery, each stored won whose deal the CRM now shows at a
/// lower amount in the same currency: a refund of the difference, stored before any delivery
/// and enqueued to the platforms that counted the won (Google restates the conversion, Meta
/// gets the refund event its `refund_policy` says). A higher amount or another currency cannot
/// be restated by a refund and is reported. The won is read again, so an erasure since the
/// check is not undone by a copy.
pub async fn restate(
    check: &CrmCheck,
    store: &dyn EventStore,
    queue: &dyn DeliveryQueue,
    now: Timestamp,
) -> Result<Restated, StoreError> {
    let mut out = Restated::default();
    let mut messages = Vec::new();
    for c in check
        .changed
        .iter()
        .filter(|c| c.reason == "amount_changed_after_won")
    {
        let (Some(crm), Some(stored)) = (c.crm_amount, c.stored_value) else {
            continue;
        };
        if c.crm_currency.is_some() && c.crm_currency != c.stored_currency {
            out.not_restated.push((
                c.deal_id.clone(),
                "the currency changed: a refund cannot restate it".into(),
            ));
            continue;
        }
        if crm > stored {
            out.not_restated.push((
                c.deal_id.clone(),
                "the amount rose: a refund cannot add revenue, and Meta takes no negative value"
                    .into(),
            ));
            continue;
        }
        let Some(crm) = Money::from_f64(crm).filter(|m| !m.is_negative()) else {
            out.not_restated.push((
                c.deal_id.clone(),
                "the CRM amount is negative: a refund cannot take more than the won".into(),
            ));
            continue;
        };
        let events = store.find_by_order(&c.deal_id).await?;
        let Some(won) = stored_won(&events, check.source) else {
            continue;
        };
        let Some(refund) = restatement(won, restated(&events), crm, now) else {
            continue;
        };
        match store.put_new(&refund).await? {
            PutOutcome::Duplicate => out.existing += 1,
            _ => {
                out.stored += 1;
                messages.extend(
                    refund
                        .destinations
                        .keys()
                        .map(|d| DeliveryMessage::new(&refund.key, *d)),
                );
            }
        }
    }
    for chunk in messages.chunks(10) {
        out.enqueue_failures += queue.enqueue(chunk).await.len();
    }
    Ok(out)
}

impl CrmCheck {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// One line per missed or changed deal: what a person reads into a spreadsheet.
    pub fn to_csv(&self) -> String {
        let num = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_default();
        let mut out = String::from(
            "kind,deal_id,stage,won_at,crm_amount,crm_currency,stored_value,stored_currency,reason\n",
        );
        for m in &self.missed {
            out.push_str(&format!(
                "missed_by_webhook,{},{},{},{},{},,,{}\n",
                csv(&m.deal_id),
                csv(&m.stage),
                m.won_at.map(|t| t.canonical()).unwrap_or_default(),
                num(m.amount),
                csv(m.currency.as_deref().unwrap_or("")),
                csv(&m.notes.join("; ")),
            ));
        }
        for c in &self.changed {
            out.push_str(&format!(
                "changed_in_crm,{},,,{},{},{},{},{}\n",
                csv(&c.deal_id),
                num(c.crm_amount),
                csv(c.crm_currency.as_deref().unwrap_or("")),
                num(c.stored_value),
                csv(c.stored_currency.as_deref().unwrap_or("")),
                c.reason,
            ));
        }
        for m in self.funnel.iter().flat_map(|f| &f.missed) {
            out.push_str(&format!(
                "missed_by_webhook,{},{},{},,,,,{}\n",
                csv(&m.record_id),
                csv(&m.stage),
                m.entered_at.canonical(),
                csv(&m.notes.join("; ")),
            ));
        }
        out
    }
}

/// A CSV field, quoted when it holds a separator, a quote or a line break.
fn csv(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The unit tests' view of a check's lead funnel: per event (lead, MQL, SQL), the CRM's
/// changes, those stored and those missed.
#[cfg(test)]
pub(crate) fn funnel_figures(check: &CrmCheck) -> [(u64, u64, u64); 3] {
    let funnel = check.funnel.as_ref().expect("the side reads the funnel");
    ["lead", "mql", "sql"].map(|e| {
        let f = &funnel.per_stage[e];
        (f.crm_changes, f.stored, f.missed)
    })
}

/// The unit tests' ingest into `store` and `queue`: the rules of `m`, numbers read as US ones.
#[cfg(test)]
pub(crate) async fn test_ingest(
    items: Vec<Incoming>,
    source: &str,
    m: &Mapping,
    store: &dyn EventStore,
    queue: &dyn DeliveryQueue,
    now: Timestamp,
) -> IngestReport {
    let cfg = crate::ingest::IngestConfig {
        default_region: crate::identity::Region::US,
        max_future_skew_secs: 300,
    };
    ingest(items, source, Intake::new(m, &cfg, store, queue), now).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Region;
    use crate::ingest::{IngestConfig, ItemStatus};
    use crate::queue::memory::MemoryQueue;
    use crate::store::memory::MemoryStore;
    use crate::webhook::hubspot::{HistoryEntry, HubSpotRecord};
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Duration;

    const DAY_MS: i64 = 86_400_000;
    const PORTAL: i64 = 62515;

    fn now() -> Timestamp {
        Timestamp::parse_rfc3339("2026-11-28T12:00:00Z").unwrap()
    }

    /// HubSpot as far as these tests need it: deals with a stage history and a contact, and
    /// the search over them by stage and close date.
    #[derive(Default)]
    struct Crm {
        deals: Mutex<HashMap<String, (HubSpotRecord, i64)>>,
        contact: HubSpotRecord,
        /// Archived deals: the search and the record read no longer see them.
        deleted: Mutex<HashSet<String>>,
        /// Contacts of the lead funnel with their own `lifecyclestage` history (any other id
        /// reads as `contact`).
        contacts: Mutex<HashMap<String, HubSpotRecord>>,
    }

    impl Crm {
        fn new() -> Crm {
            let mut contact = HubSpotRecord::default();
            for (k, v) in [
                ("email", "ada@example.com"),
                ("hs_google_click_id", "gc-1"),
                ("ads_consent_status", "granted"),
                ("hs_legal_basis", "Freely given consent"),
            ] {
                contact.properties.insert(k.into(), Some(v.into()));
            }
            Crm {
                contact,
                ..Default::default()
            }
        }

        /// The deal moves to `stage` at `at_ms` (its close date too when won), for `amount`.
        fn set(&self, id: &str, stage: &str, amount: &str, at_ms: i64) {
            let mut deals = self.deals.lock().unwrap();
            let (r, close) = deals.entry(id.to_string()).or_default();
            r.contact_id = Some("101".into());
            r.properties.insert("dealstage".into(), Some(stage.into()));
            r.properties.insert("amount".into(), Some(amount.into()));
            r.properties
                .insert("deal_currency_code".into(), Some("EUR".into()));
            r.history
                .entry("dealstage".into())
                .or_default()
                .push(HistoryEntry {
                    value: stage.into(),
                    at: Timestamp::from_unix_ms(at_ms),
                });
            if stage == "closedwon" {
                *close = at_ms;
            }
        }

        /// The contact enters lifecycle stage `stage` at `at_ms`.
        fn enter(&self, id: &str, stage: &str, at_ms: i64) {
            let mut contacts = self.contacts.lock().unwrap();
            let r = contacts
                .entry(id.to_string())
                .or_insert_with(|| self.contact.clone());
            r.properties
                .insert("lifecyclestage".into(), Some(stage.into()));
            r.history
                .entry("lifecyclestage".into())
                .or_default()
                .push(HistoryEntry {
                    value: stage.into(),
                    at: Timestamp::from_unix_ms(at_ms),
                });
        }

        /// The `contact.propertyChange` HubSpot sends for a change, carrying `at_ms`.
        fn contact_webhook(&self, id: &str, stage: &str, at_ms: i64) -> HubSpotEvent {
            HubSpotEvent {
                event_id: Some(2),
                portal_id: Some(PORTAL),
                subscription_type: "contact.propertyChange".into(),
                object_id: id.parse().unwrap(),
                occurred_at: at_ms,
                property_name: Some("lifecyclestage".into()),
                property_value: Some(stage.into()),
            }
        }

        fn webhook(&self, id: &str) -> HubSpotEvent {
            let deals = self.deals.lock().unwrap();
            let (r, _) = &deals[id];
            let last = r.history["dealstage"].last().unwrap();
            HubSpotEvent {
                event_id: Some(1),
                portal_id: Some(PORTAL),
                subscription_type: "deal.propertyChange".into(),
                object_id: id.parse().unwrap(),
                occurred_at: last.at.unix_ms(),
                property_name: Some("dealstage".into()),
                property_value: Some(last.value.clone()),
            }
        }
    }

    #[async_trait]
    impl HubSpotRecords for Crm {
        async fn contact(&self, id: &str) -> Result<Option<HubSpotRecord>, CrmError> {
            let contacts = self.contacts.lock().unwrap();
            Ok(Some(contacts.get(id).unwrap_or(&self.contact).clone()))
        }
        async fn deal(&self, id: &str) -> Result<Option<HubSpotRecord>, CrmError> {
            if self.deleted.lock().unwrap().contains(id) {
                return Ok(None);
            }
            Ok(self.deals.lock().unwrap().get(id).map(|(r, _)| r.clone()))
        }
    }

    #[async_trait]
    impl HubSpotSearch for Crm {
        async fn won_deals(&self, stages: &[String], w: Window) -> Result<Vec<CrmDeal>, CrmError> {
            let deals = self.deals.lock().unwrap();
            let prop = |r: &HubSpotRecord, k: &str| r.properties.get(k).cloned().flatten();
            let mut out: Vec<CrmDeal> = deals
                .iter()
                .filter(|(id, _)| !self.deleted.lock().unwrap().contains(*id))
                .filter(|(_, (r, close))| {
                    prop(r, "dealstage").is_some_and(|s| stages.contains(&s))
                        && w.contains(Timestamp::from_unix_ms(*close))
                })
                .map(|(id, (r, _))| CrmDeal {
                    id: id.clone(),
                    stage: prop(r, "dealstage").unwrap_or_default(),
                    amount: prop(r, "amount").and_then(|a| a.parse().ok()),
                    currency: prop(r, "deal_currency_code"),
                })
                .collect();
            out.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(out)
        }
        async fn archived(&self, ids: &[String]) -> Result<HashSet<String>, CrmError> {
            let deleted = self.deleted.lock().unwrap();
            Ok(ids
                .iter()
                .filter(|id| deleted.contains(*id))
                .cloned()
                .collect())
        }
        async fn contacts_modified(&self, since: Timestamp) -> Result<Vec<String>, CrmError> {
            let contacts = self.contacts.lock().unwrap();
            Ok(contacts
                .iter()
                .filter(|(_, r)| r.history.values().flatten().any(|h| h.at >= since))
                .map(|(id, _)| id.clone())
                .collect())
        }
        async fn lifecycle_histories(
            &self,
            ids: &[String],
        ) -> Result<HashMap<String, Vec<HistoryEntry>>, CrmError> {
            let contacts = self.contacts.lock().unwrap();
            Ok(ids
                .iter()
                .filter_map(|id| {
                    let h = contacts.get(id)?.history.get("lifecyclestage")?;
                    Some((id.clone(), h.clone()))
                })
                .collect())
        }
    }

    fn cfg() -> IngestConfig {
        IngestConfig {
            default_region: Region::US,
            max_future_skew_secs: 300,
        }
    }

    fn period(from: Timestamp, to: Timestamp) -> Period {
        Period {
            portal_id: Some(PORTAL),
            window: Window::new(from, to),
        }
    }

    fn opts() -> ResolveOptions {
        ResolveOptions {
            portal_id: Some(PORTAL),
            ..Default::default()
        }
    }

    /// What a repair with this CRM's records stores.
    async fn repaired(
        check: &CrmCheck,
        crm: &Crm,
        store: &MemoryStore,
        queue: &MemoryQueue,
    ) -> IngestReport {
        let m = Mapping::bundled().unwrap();
        let cfg = cfg();
        let to = Intake::new(&m, &cfg, store, queue);
        repair(check, Some((crm, &opts())), to, now()).await
    }

    /// What the webhook path stores for these deliveries.
    async fn deliver(
        crm: &Crm,
        ids: &[&str],
        store: &MemoryStore,
        queue: &MemoryQueue,
    ) -> IngestReport {
        let m = Mapping::bundled().unwrap();
        let hooks: Vec<HubSpotEvent> = ids.iter().map(|id| crm.webhook(id)).collect();
        let items = resolve(&hooks, crm, &m, &opts(), &HashSet::new()).await;
        ingest(
            items,
            "hubspot",
            Intake::new(&m, &cfg(), store, queue),
            now(),
        )
        .await
    }

    #[tokio::test]
    async fn missed_webhooks_are_found_repaired_once_and_changes_reported() {
        let m = Mapping::bundled().unwrap();
        let crm = Crm::new();
        let store = MemoryStore::new();
        let queue = MemoryQueue::new(5, Duration::from_secs(30));
        let t = now().unix_ms();
        crm.set("1001", "closedwon", "100", t - 2 * DAY_MS);
        crm.set("1002", "closedwon", "200", t - 3 * DAY_MS);
        crm.set("1003", "closedwon", "300", t - 10 * DAY_MS);
        crm.set("1004", "closedwon", "150", t - 4 * DAY_MS);
        crm.set("1005", "closedwon", "50", t - 5 * DAY_MS);
        // The webhooks of 1001, 1004 and 1005 arrived; those of 1002 and 1003 never did.
        let r = deliver(&crm, &["1001", "1004", "1005"], &store, &queue).await;
        assert!(
            r.results.iter().all(|x| x.status == ItemStatus::Accepted),
            "{r:?}"
        );
        // Then the CRM changed: 1004's amount, and 1005 reopened.
        crm.set("1004", "closedwon", "175", t - 4 * DAY_MS);
        crm.set("1005", "appointmentscheduled", "50", t - DAY_MS);

        let (from, to) = (now().minus_secs(30 * 86_400), now());
        let check = check_hubspot(&crm, &crm, &store, &m, period(from, to), now())
            .await
            .unwrap();
        let missed: Vec<&str> = check.missed.iter().map(|x| x.deal_id.as_str()).collect();
        assert_eq!(missed, ["1002", "1003"]);
        assert_eq!(
            check.missed[0].won_at,
            Some(Timestamp::from_unix_ms(t - 3 * DAY_MS)),
            "the stage history's time, never the repair's"
        );
        assert!(check.missed[0].notes.is_empty());
        assert!(check.missed[1].notes[0].contains("Meta refuses it"));
        let changed: Vec<(&str, &str)> = check
            .changed
            .iter()
            .map(|c| (c.deal_id.as_str(), c.reason))
            .collect();
        assert_eq!(
            changed,
            [
                ("1004", "amount_changed_after_won"),
                ("1005", "reopened_in_crm")
            ]
        );
        let eur = &check.per_currency["EUR"];
        assert_eq!((eur.crm_deals, eur.stored_wons, eur.missed), (4, 2, 2));
        assert_eq!((eur.crm_revenue, eur.missed_revenue), (775.0, 500.0));
        let csv = check.to_csv();
        assert_eq!(csv.lines().count(), 5, "{csv}");
        assert!(csv.contains("missed_by_webhook,1002,closedwon,"), "{csv}");

        let r = repaired(&check, &crm, &store, &queue).await;
        let statuses: Vec<ItemStatus> = r.results.iter().map(|x| x.status).collect();
        assert_eq!(statuses, [ItemStatus::Accepted, ItemStatus::Accepted]);
        let won = stored_won(&store.find_by_order("1002").await.unwrap(), "hubspot")
            .cloned()
            .unwrap();
        assert_eq!(won.occurred_at, Timestamp::from_unix_ms(t - 3 * DAY_MS));
        assert_eq!(won.value.map(|v| v.as_f64()), Some(200.0));

        // 1004's amount rose (150 -> 175): a refund cannot restate that, so it is reported.
        let r = restate(&check, &store, &queue, now()).await.unwrap();
        assert_eq!((r.stored, r.existing), (0, 0));
        assert_eq!(r.not_restated[0].0, "1004");
        assert!(r.not_restated[0].1.contains("rose"));

        // Run again: nothing is missed, so a repair sends nothing.
        let again = check_hubspot(&crm, &crm, &store, &m, period(from, to), now())
            .await
            .unwrap();
        assert!(again.missed.is_empty(), "{:?}", again.missed);
        let r = repaired(&again, &crm, &store, &queue).await;
        assert!(r.results.is_empty());
        // The webhook that was late all along is a duplicate of the repair.
        let late = deliver(&crm, &["1002"], &store, &queue).await;
        assert_eq!(late.results[0].status, ItemStatus::Duplicate);
        // 1001 deleted in HubSpot: gone from the search, named by the archived batch read.
        crm.deleted.lock().unwrap().insert("1001".into());
        let gone = check_hubspot(&crm, &crm, &store, &m, period(from, to), now())
            .await
            .unwrap();
        assert_eq!(gone.change_of("1001"), Some("deleted_in_crm"));
    }

    #[tokio::test]
    async fn the_lead_funnel_is_checked_from_each_contacts_stage_history() {
        let m = Mapping::bundled().unwrap();
        let crm = Crm::new();
        let store = MemoryStore::new();
        let queue = MemoryQueue::new(5, Duration::from_secs(30));
        let t = now().unix_ms();
        let (from, to) = (now().minus_secs(7 * 86_400), now());
        // 201 became a lead and an MQL, both webhooks arrived; 202's lead arrived, its MQL
        // never did; 203's SQL never arrived; 204's lead webhook carried a time a minute off
        // the history's (still that change); 205 became a lead before the period and then a
        // customer, a stage the mapping does not map.
        let changes = [
            ("201", "lead", t - 3 * DAY_MS, Some(0)),
            ("201", "marketingqualifiedlead", t - 2 * DAY_MS, Some(0)),
            ("202", "lead", t - 2 * DAY_MS, Some(0)),
            ("202", "marketingqualifiedlead", t - DAY_MS, None),
            ("203", "salesqualifiedlead", t - DAY_MS, None),
            ("204", "lead", t - DAY_MS, Some(60_000)),
            ("205", "lead", t - 9 * DAY_MS, Some(0)),
            ("205", "customer", t - DAY_MS, None),
        ];
        let mut hooks = Vec::new();
        for (id, stage, at, arrived) in changes {
            crm.enter(id, stage, at);
            if let Some(late) = arrived {
                hooks.push(crm.contact_webhook(id, stage, at + late));
            }
        }
        let items = resolve(&hooks, &crm, &m, &opts(), &HashSet::new()).await;
        let r = test_ingest(items, "hubspot", &m, &store, &queue, now()).await;
        assert!(
            r.results.iter().all(|x| x.status == ItemStatus::Accepted),
            "{r:?}"
        );

        let check = check_hubspot(&crm, &crm, &store, &m, period(from, to), now())
            .await
            .unwrap();
        assert_eq!(funnel_figures(&check), [(3, 3, 0), (2, 1, 1), (1, 0, 1)]);
        let missed: Vec<(&str, &str, i64)> = check
            .funnel
            .as_ref()
            .unwrap()
            .missed
            .iter()
            .map(|x| (x.record_id.as_str(), x.event_name, x.entered_at.unix_ms()))
            .collect();
        assert_eq!(
            missed,
            [("202", "mql", t - DAY_MS), ("203", "sql", t - DAY_MS)]
        );
        assert_eq!(check.missed_count(), 2);
        let csv = check.to_csv();
        assert!(
            csv.contains("missed_by_webhook,202,marketingqualifiedlead,"),
            "{csv}"
        );

        // The repair replays each as HubSpot's webhook at the history's time, once.
        let r = repaired(&check, &crm, &store, &queue).await;
        let statuses: Vec<ItemStatus> = r.results.iter().map(|x| x.status).collect();
        assert_eq!(statuses, [ItemStatus::Accepted, ItemStatus::Accepted]);
        let stored = store.events_between(from, to).await.unwrap();
        let mql = stored
            .iter()
            .find(|e| e.entity_id == "202" && e.event_name == EventName::Mql)
            .expect("202's MQL stored");
        assert_eq!(mql.occurred_at, Timestamp::from_unix_ms(t - DAY_MS));
        assert_eq!(mql.crm_stage.as_deref(), Some("marketingqualifiedlead"));
        let again = check_hubspot(&crm, &crm, &store, &m, period(from, to), now())
            .await
            .unwrap();
        let funnel = again.funnel.unwrap();
        assert!(funnel.missed.is_empty(), "{:?}", funnel.missed);
        assert_eq!(
            funnel.per_stage["mql"],
            StageFigures {
                crm_changes: 2,
                stored: 2,
                missed: 0
            }
        );
        // The webhook that was only late is a duplicate of the repair.
        let late = crm.contact_webhook("202", "marketingqualifiedlead", t - DAY_MS);
        let items = resolve(&[late], &crm, &m, &opts(), &HashSet::new()).await;
        let r = test_ingest(items, "hubspot", &m, &store, &queue, now()).await;
        assert_eq!(r.results[0].status, ItemStatus::Duplicate);
    }

    #[tokio::test]
    async fn a_mapping_without_a_won_stage_is_refused() {
        let text = crate::mapping::BUNDLED.replace("closedwon = \"won\"", "");
        let m = Mapping::load(&text).unwrap();
        let crm = Crm::new();
        let store = MemoryStore::new();
        let err = check_hubspot(&crm, &crm, &store, &m, period(now(), now()), now())
            .await
            .unwrap_err();
        assert!(matches!(err, CheckError::NoWonStage("hubspot")), "{err}");
    }

    #[tokio::test]
    async fn a_lowered_amount_is_restated_by_a_refund_once_per_crm_amount() {
        let m = Mapping::bundled().unwrap();
        let crm = Crm::new();
        let store = MemoryStore::new();
        let queue = MemoryQueue::new(5, Duration::from_secs(30));
        let t = now().unix_ms();
        crm.set("2001", "closedwon", "400", t - 2 * DAY_MS);
        deliver(&crm, &["2001"], &store, &queue).await;
        // The pair was delivered to Meta (the platform that counted it).
        let key = store.find_by_order("2001").await.unwrap()[0].key.clone();
        store.update_sync(&key, |e| {
            for (d, s) in e.destinations.iter_mut() {
                s.status = if *d == crate::delivery::Destination::Meta {
                    DeliveryStatus::Delivered
                } else {
                    DeliveryStatus::BlockedConsent
                };
            }
        });
        let (from, to) = (now().minus_secs(30 * 86_400), now());
        let run = || async {
            let c = check_hubspot(&crm, &crm, &store, &m, period(from, to), now())
                .await
                .unwrap();
            let r = restate(&c, &store, &queue, now()).await.unwrap();
            (c, r)
        };
        crm.set("2001", "closedwon", "300", t - 2 * DAY_MS);
        let (c, r) = run().await;
        assert_eq!(c.changed[0].reason, "amount_changed_after_won");
        assert_eq!((r.stored, r.existing), (1, 0));
        let refunds: Vec<CanonicalEvent> = store
            .find_by_order("2001")
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.event_name == EventName::Refund)
            .collect();
        assert_eq!(refunds.len(), 1);
        assert_eq!(refunds[0].value.map(|v| v.as_f64()), Some(100.0));
        assert_eq!(refunds[0].crm_stage.as_deref(), Some(RESTATEMENT_STAGE));
        assert_eq!(
            refunds[0].destinations.keys().collect::<Vec<_>>(),
            [&crate::delivery::Destination::Meta],
            "only where the won was counted"
        );
        assert_eq!(queue.messages(crate::delivery::Destination::Meta).len(), 2);
        // Restated: the next check sees the won at 300 and reports nothing.
        let (c, r) = run().await;
        assert!(c.changed.is_empty(), "{:?}", c.changed);
        assert_eq!((r.stored, r.existing), (0, 0));
        // Lowered again: only the further 50.
        crm.set("2001", "closedwon", "250", t - 2 * DAY_MS);
        let (_, r) = run().await;
        assert_eq!(r.stored, 1);
        let total = restated(&store.find_by_order("2001").await.unwrap());
        assert_eq!(total.as_f64(), 150.0);
        // A negative CRM amount is reported, never a refund larger than the won.
        crm.set("2001", "closedwon", "-5", t - 2 * DAY_MS);
        let (_, r) = run().await;
        assert_eq!(r.stored, 0);
        assert!(r.not_restated[0].1.contains("negative"), "{r:?}");
    }
}
