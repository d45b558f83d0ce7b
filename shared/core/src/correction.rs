//! Correcting conversions delivered under an action the mapping no longer maps them to: the
//! plan (which delivered wons moved, which can be corrected, and why not), the correction
//! events that carry it through the normal delivery pipeline, and the gate that keeps each
//! conversion's steps in order.
//!
//! Google cannot move a conversion to another action: an adjustment only targets the action
//! the conversion was uploaded under (the lookup is per action, `CONVERSION_NOT_FOUND`). The
//! fix is a RETRACTION under the old action (final: count and value to zero), an upload under
//! the new one, and the order's refunds restated there. Each step is an event of its own in
//! the store, so claims, retries, the dead-letter queue, the sweep and the delivery log all
//! apply, and each step's `event_id` is a pure function of the won and both actions, so
//! running the command again stores and sends nothing new.
//!
//! Meta has no retraction: a second event under a new name would count the sale twice, so the
//! plan reports wons sent under an old Meta event name and corrects nothing there.

use crate::delivery::{DeliveryStatus, Destination, DestinationState, ErrorInfo, Outcome};
use crate::event::{CanonicalEvent, EventName};
use crate::hashing::sha256_hex_joined;
use crate::mapping::{FullRefundPolicy, GoogleBackend, GoogleConversion, Mapping};
use crate::money::Money;
use crate::queue::{DeliveryMessage, DeliveryQueue};
use crate::store::{EventStore, PutOutcome, StoreError};
use crate::timestamp::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// The steps of one correction, in the order they are delivered.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum CorrectionStep {
    /// RETRACTION of the order's conversion under the action it was delivered as.
    Retract,
    /// The won uploaded again under the action the mapping now names.
    Upload,
    /// The refunds already applied, restated under the new action.
    Restate,
}

impl CorrectionStep {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Retract => "retract",
            Self::Upload => "upload",
            Self::Restate => "restate",
        }
    }

    /// The step that must be delivered before this one is sent.
    pub fn after(&self) -> Option<CorrectionStep> {
        match self {
            Self::Retract => None,
            Self::Upload => Some(Self::Retract),
            Self::Restate => Some(Self::Upload),
        }
    }
}

/// What a correction event carries beside its won's fields.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Correction {
    /// The store key of the won corrected.
    pub of: String,
    pub step: CorrectionStep,
    /// The action the conversion is held under now (the delivery log's `sent_as`).
    pub from: String,
    /// The action the mapping now maps the won to.
    pub to: String,
    /// The mapping version the won was delivered under, and the one it is corrected to.
    pub from_mapping_version: String,
    pub to_mapping_version: String,
}

impl Correction {
    /// The same correction (one won, one move), any step.
    fn same_move(&self, other: &Correction) -> bool {
        self.of == other.of && self.from == other.from && self.to == other.to
    }
}

/// The longest a conversion may have been recorded for and still be corrected: Google refuses
/// adjustments to conversions more than 54 days old (G-ERR-ADJ `CONVERSION_EXPIRED`), and a
/// day is kept for the steps to go through (the upload waits for the retraction).
pub const MAX_AGE_DAYS: i64 = 53;

/// One won to correct.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct PlannedCorrection {
    pub event_id: String,
    pub key: String,
    pub order_id: String,
    pub destination: Destination,
    pub from: String,
    pub to: String,
    pub value: Money,
    /// Refunds already delivered for the order: restated under the new action.
    pub refunded: Money,
    /// What Google counts for the order after the correction (value less refunds).
    pub net: Money,
    pub currency: String,
    pub steps: Vec<CorrectionStep>,
}

/// A won sent under an old action or event name that is not corrected, and why.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct NotCorrected {
    pub event_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    pub destination: Destination,
    pub from: String,
    pub to: String,
    pub reason: String,
}

#[derive(Serialize, Clone, Debug, Default, PartialEq)]
pub struct CorrectionPlan {
    pub old_mapping_version: String,
    pub new_mapping_version: String,
    /// Delivered wons looked at, per destination.
    pub examined: BTreeMap<Destination, usize>,
    /// Already under the action (or event name) the new mapping names, per destination.
    pub unchanged: BTreeMap<Destination, usize>,
    /// Corrections already stored by an earlier run (sent, or on their way).
    pub already_corrected: usize,
    pub corrections: Vec<PlannedCorrection>,
    pub not_corrected: Vec<NotCorrected>,
    /// Revenue moved to the new actions, per currency (net of refunds).
    pub revenue_moved: BTreeMap<String, Money>,
}

fn delivered(e: &CanonicalEvent, d: Destination) -> bool {
    e.destinations
        .get(&d)
        .is_some_and(|s| s.status.is_delivered())
}

/// The corrections of `won` at Google among the order's events.
fn corrections_of<'a>(
    won: &'a CanonicalEvent,
    order: &'a [&'a CanonicalEvent],
) -> impl Iterator<Item = (&'a CanonicalEvent, &'a Correction)> + 'a {
    order.iter().filter_map(move |e| {
        e.correction
            .as_ref()
            .filter(|c| c.of == won.key)
            .map(|c| (*e, c))
    })
}

/// The action Google holds `won`'s conversion under now: the newest delivered correction
/// upload's, else what the won was delivered as. `Err`: not known (delivered before the action
/// was recorded, under a mapping version other than `old`'s).
fn held_under(
    won: &CanonicalEvent,
    order: &[&CanonicalEvent],
    old: &Mapping,
) -> Result<String, String> {
    let uploaded = corrections_of(won, order)
        .filter(|(e, c)| c.step == CorrectionStep::Upload && delivered(e, Destination::Google))
        .max_by_key(|(e, _)| e.received_at)
        .map(|(_, c)| c.to.clone());
    if let Some(a) = uploaded {
        return Ok(a);
    }
    let state = won.destinations.get(&Destination::Google);
    if let Some(a) = state.and_then(|s| s.delivered_as()) {
        return Ok(a.to_string());
    }
    if won.mapping_version == old.version
        && let Some(c) = old
            .google
            .as_ref()
            .and_then(|g| g.conversions.get(&EventName::Won))
    {
        return Ok(c.action.clone());
    }
    Err(format!(
        "delivered before the bridge recorded the action, under mapping version {}: give that version's file as the old mapping",
        won.mapping_version
    ))
}

/// The click-through window of `action` as a mapping declares it (the new mapping first).
fn window_of(action: &str, old: &Mapping, new: &Mapping) -> u32 {
    [new, old]
        .iter()
        .filter_map(|m| m.google.as_ref())
        .flat_map(|g| g.conversions.values())
        .find(|c| c.action == action)
        .map_or(
            crate::mapping::DEFAULT_CLICK_WINDOW_DAYS,
            GoogleConversion::click_window_days,
        )
}

/// Why `won` cannot move from `from` to `to` now, if it cannot: Google refuses the steps or
/// would lose the conversion. A retraction is final, so everything the upload needs is checked
/// first.
fn check_google(
    won: &CanonicalEvent,
    order: &[&CanonicalEvent],
    from: &str,
    to: &GoogleConversion,
    old: &Mapping,
    new: &Mapping,
    now: Timestamp,
) -> Result<(Money, String, Money), String> {
    let (Some(value), Some(currency)) = (won.value, won.currency.clone()) else {
        return Err("the won has no value and currency".into());
    };
    let age_days = now.secs_since(&won.occurred_at) / 86_400;
    if age_days > MAX_AGE_DAYS {
        return Err(format!(
            "the conversion is {age_days} days old: Google adjusts conversions up to 54 days old (CONVERSION_EXPIRED), so the old one could not be retracted"
        ));
    }
    let refunds: Vec<&&CanonicalEvent> = order
        .iter()
        .filter(|e| e.event_name == EventName::Refund)
        .collect();
    if refunds.iter().any(|r| {
        r.destinations
            .get(&Destination::Google)
            .is_some_and(|s| s.status.is_open())
    }) {
        return Err(
            "a refund of this order is still being delivered: run again when it is done".into(),
        );
    }
    let refunded = refunds
        .iter()
        .filter(|r| delivered(r, Destination::Google))
        .filter(|r| r.currency.as_deref() == Some(currency.as_str()))
        .filter_map(|r| r.value)
        .fold(Money::from_micros(0), Money::saturating_add);
    let net = value.saturating_sub(refunded);
    if net.micros() <= 0 {
        return Err("the order was refunded in full: its conversion is already retracted".into());
    }
    let click = &won.identity.click;
    let has_click = click.gclid.is_some() || click.gbraid.is_some() || click.wbraid.is_some();
    let has_user_data = won.identity.google.email.is_some() || won.identity.google.phone.is_some();
    if !(has_click || to.allow_without_click_id && has_user_data) {
        return Err(if to.allow_without_click_id {
            "neither a click id nor an email or phone hash is still stored (retention or erasure): the new upload could not match".into()
        } else {
            format!(
                "the click id is no longer stored (retention or erasure), and {} needs one",
                to.action
            )
        });
    }
    // The click was inside the old action's window (Google accepted the upload); it is surely
    // inside the new one's only if that is no shorter (EXPIRED_EVENT otherwise).
    let (was, will) = (window_of(from, old, new), to.click_window_days());
    if will < was {
        return Err(format!(
            "the new action's click-through window ({will} days) is shorter than the old one's ({was} days): the click may be outside it (EXPIRED_EVENT)"
        ));
    }
    if let Some(g) = &new.google {
        let old_customer = GoogleConversion::from_resource(from)
            .map(|c| c.customer_id)
            .unwrap_or_default();
        if g.backend_for(&old_customer) == GoogleBackend::DataManager
            && g.full_refund_policy != FullRefundPolicy::RetractViaAdsApi
        {
            return Err("the conversion went through the Data Manager API, which cannot retract; set google.full_refund_policy = \"retract_via_ads_api\" where the account may use the Ads API".into());
        }
    }
    Ok((value, currency, refunded))
}

/// The plan for moving every delivered won in `events` (a period's events, the wons with their
/// identity) to what `new` maps it to. `old` is the mapping the wons were delivered under (it
/// is needed only for wons delivered before the bridge recorded the action).
pub fn plan(
    events: &[CanonicalEvent],
    old: &Mapping,
    new: &Mapping,
    now: Timestamp,
) -> CorrectionPlan {
    let mut out = CorrectionPlan {
        old_mapping_version: old.version.clone(),
        new_mapping_version: new.version.clone(),
        ..Default::default()
    };
    let mut by_order: BTreeMap<&str, Vec<&CanonicalEvent>> = BTreeMap::new();
    for e in events {
        if let Some(o) = e.order_id.as_deref() {
            by_order.entry(o).or_default().push(e);
        }
    }
    let target = new
        .google
        .as_ref()
        .and_then(|g| g.conversions.get(&EventName::Won));
    let meta_target = new
        .meta
        .as_ref()
        .and_then(|m| m.events.get(&EventName::Won))
        .map(|e| e.event_name.clone());
    let mut wons: Vec<&CanonicalEvent> = events
        .iter()
        .filter(|e| e.event_name == EventName::Won)
        .collect();
    wons.sort_by(|a, b| (a.occurred_at, &a.key).cmp(&(b.occurred_at, &b.key)));
    for won in wons {
        let order: &[&CanonicalEvent] = won
            .order_id
            .as_deref()
            .and_then(|o| by_order.get(o))
            .map_or(&[], Vec::as_slice);
        let not = |d: Destination, from: &str, to: &str, reason: String| NotCorrected {
            event_id: won.event_id.clone(),
            order_id: won.order_id.clone(),
            destination: d,
            from: from.to_string(),
            to: to.to_string(),
            reason,
        };
        if delivered(won, Destination::Meta) {
            *out.examined.entry(Destination::Meta).or_insert(0) += 1;
            let sent = won
                .destinations
                .get(&Destination::Meta)
                .and_then(|s| s.delivered_as())
                .map(str::to_string)
                .or_else(|| {
                    (won.mapping_version == old.version)
                        .then(|| old.meta.as_ref()?.events.get(&EventName::Won))
                        .flatten()
                        .map(|e| e.event_name.clone())
                });
            let to = meta_target.as_deref().unwrap_or("(not sent)");
            match sent {
                Some(s) if s == to => *out.unchanged.entry(Destination::Meta).or_insert(0) += 1,
                s => out.not_corrected.push(not(
                    Destination::Meta,
                    s.as_deref().unwrap_or("(unknown)"),
                    to,
                    "Meta has no retraction: a second event under the new name would count the sale twice, so it is left as sent".into(),
                )),
            }
        }
        if !delivered(won, Destination::Google) {
            continue;
        }
        *out.examined.entry(Destination::Google).or_insert(0) += 1;
        let from = match held_under(won, order, old) {
            Ok(a) => a,
            Err(reason) => {
                let to = target.map_or("(not sent)", |t| t.action.as_str());
                out.not_corrected
                    .push(not(Destination::Google, "(unknown)", to, reason));
                continue;
            }
        };
        let Some(to) = target else {
            out.not_corrected.push(not(
                Destination::Google,
                &from,
                "(not sent)",
                "the new mapping sends won to no Google action: retracting would lose the conversion, so it is left as sent".into(),
            ));
            continue;
        };
        if from == to.action {
            *out.unchanged.entry(Destination::Google).or_insert(0) += 1;
            continue;
        }
        // An earlier run stored this move already: its steps are on their way (or done).
        if corrections_of(won, order).any(|(_, c)| c.from == from && c.to == to.action) {
            out.already_corrected += 1;
            continue;
        }
        match check_google(won, order, &from, to, old, new, now) {
            Ok((value, currency, refunded)) => {
                let net = value.saturating_sub(refunded);
                let moved = out
                    .revenue_moved
                    .entry(currency.clone())
                    .or_insert(Money::from_micros(0));
                *moved = moved.saturating_add(net);
                // The Ads API keeps the first upload's value, so the refunds are restated
                // after it; Data Manager keeps the last value written, so its upload carries
                // the net value and needs no restatement.
                let mut steps = vec![CorrectionStep::Retract, CorrectionStep::Upload];
                let ads_api = new
                    .google
                    .as_ref()
                    .is_some_and(|g| g.backend_for(&to.customer_id) == GoogleBackend::AdsApi);
                if refunded.micros() > 0 && ads_api {
                    steps.push(CorrectionStep::Restate);
                }
                out.corrections.push(PlannedCorrection {
                    event_id: won.event_id.clone(),
                    key: won.key.clone(),
                    order_id: won.order_id.clone().unwrap_or_default(),
                    destination: Destination::Google,
                    from,
                    to: to.action.clone(),
                    value,
                    refunded,
                    net,
                    currency,
                    steps,
                });
            }
            Err(reason) => {
                out.not_corrected
                    .push(not(Destination::Google, &from, &to.action, reason))
            }
        }
    }
    out
}

/// Reads the events of `[from, to)` (business time) from the store, the wons whole with their
/// identity (a period read may leave it out; an upload needs the click id and hashes), and
/// plans. Returns the plan and the wons, for [`apply`].
pub async fn plan_from_store(
    store: &dyn EventStore,
    old: &Mapping,
    new: &Mapping,
    from: Timestamp,
    to: Timestamp,
    now: Timestamp,
) -> Result<(CorrectionPlan, Vec<CanonicalEvent>), StoreError> {
    let mut events = store.events_between(from, to).await?;
    let keys: Vec<String> = events
        .iter()
        .filter(|e| e.event_name == EventName::Won)
        .filter(|e| e.destinations.values().any(|s| s.status.is_delivered()))
        .map(|e| e.key.clone())
        .collect();
    let wons = store.get_many(&keys).await?;
    for e in events.iter_mut() {
        if let Some(w) = wons.iter().find(|w| w.key == e.key) {
            *e = w.clone();
        }
    }
    Ok((plan(&events, old, new, now), wons))
}

/// The correction events of one planned correction: the won's own fields (business time,
/// order, value, identity hashes, consent), a key derived from the won and both actions, and a
/// pending Google pair.
pub fn correction_events(
    won: &CanonicalEvent,
    p: &PlannedCorrection,
    from_mapping_version: &str,
    to_mapping_version: &str,
    now: Timestamp,
) -> Vec<CanonicalEvent> {
    p.steps
        .iter()
        .map(|&step| {
            let event_id = sha256_hex_joined(&[
                "correction",
                won.key.as_str(),
                p.from.as_str(),
                p.to.as_str(),
                step.as_str(),
            ]);
            let mut state = DestinationState::new(DeliveryStatus::Pending, now);
            state.consent_reason = won
                .destinations
                .get(&p.destination)
                .and_then(|s| s.consent_reason.clone());
            CanonicalEvent {
                key: event_id.clone(),
                event_id,
                event_id_origin: crate::event::EventIdOrigin::Derived,
                source: won.source.clone(),
                event_name: EventName::Correction,
                crm_stage: None,
                occurred_at: won.occurred_at,
                received_at: now,
                entity_type: won.entity_type,
                entity_id: won.entity_id.clone(),
                order_id: won.order_id.clone(),
                value: won.value,
                currency: won.currency.clone(),
                identity: won.identity.clone(),
                warnings: Vec::new(),
                consent: won.consent.clone(),
                mapping_version: to_mapping_version.to_string(),
                correction: Some(Correction {
                    of: won.key.clone(),
                    step,
                    from: p.from.clone(),
                    to: p.to.clone(),
                    from_mapping_version: from_mapping_version.to_string(),
                    to_mapping_version: to_mapping_version.to_string(),
                }),
                destinations: BTreeMap::from([(p.destination, state)]),
            }
        })
        .collect()
}

/// What applying a plan did.
#[derive(Serialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Correction events stored now.
    pub stored: usize,
    /// Already stored by an earlier run: nothing new.
    pub existing: usize,
    /// Delivery messages that could not be enqueued: the events stay pending and the
    /// reconciliation sweep enqueues them.
    pub enqueue_failures: usize,
    /// Wons not read back from the store (erased since the plan was made): not corrected.
    pub missing: Vec<String>,
}

/// Stores the correction events of `plan` (written before any delivery, like every event) and
/// enqueues their delivery. `wons` holds the planned wons as stored, with their identity.
pub async fn apply(
    plan: &CorrectionPlan,
    wons: &[CanonicalEvent],
    store: &dyn EventStore,
    queue: &dyn DeliveryQueue,
    now: Timestamp,
) -> Result<ApplyReport, StoreError> {
    let mut report = ApplyReport::default();
    let mut messages = Vec::new();
    for p in &plan.corrections {
        let Some(won) = wons.iter().find(|w| w.key == p.key) else {
            report.missing.push(p.event_id.clone());
            continue;
        };
        let events = correction_events(
            won,
            p,
            &plan.old_mapping_version,
            &plan.new_mapping_version,
            now,
        );
        for e in &events {
            match store.put_new(e).await? {
                PutOutcome::Duplicate => report.existing += 1,
                _ => report.stored += 1,
            }
            messages.push(DeliveryMessage::new(&e.key, p.destination));
        }
    }
    for chunk in messages.chunks(10) {
        report.enqueue_failures += queue.enqueue(chunk).await.len();
    }
    Ok(report)
}

/// Before a correction step is prepared: the step before it must have been delivered. The
/// upload waits for the retraction (a conversion under both actions would count twice), the
/// restatement for the upload (it adjusts that conversion).
pub fn gate(
    event: &CanonicalEvent,
    dest: Destination,
    order: &[CanonicalEvent],
    wait: Duration,
) -> Result<(), Outcome> {
    let Some(c) = &event.correction else {
        return Ok(());
    };
    let Some(before) = c.step.after() else {
        return Ok(());
    };
    let prior = order.iter().find(|e| {
        e.correction
            .as_ref()
            .is_some_and(|p| p.step == before && p.same_move(c))
    });
    let status = prior
        .and_then(|e| e.destinations.get(&dest))
        .map(|s| s.status);
    match status {
        Some(s) if s.is_delivered() => Ok(()),
        Some(s) if !s.is_open() && s != DeliveryStatus::DeadLetter => Err(Outcome::Rejected {
            error: ErrorInfo::new(
                "correction_step_failed",
                format!(
                    "the {} step of this correction ended {}; the {} step is not sent",
                    before.as_str(),
                    s.as_str(),
                    c.step.as_str()
                ),
            ),
            dead_letter: false,
            alert: true,
        }),
        _ => Err(Outcome::Wait {
            error: ErrorInfo::new(
                "correction_step_pending",
                format!(
                    "waiting for the {} step of this correction",
                    before.as_str()
                ),
            ),
            after: wait,
            on_deadline: Some(DeliveryStatus::DeadLetter),
        }),
    }
}

/// Whether a correction of the order is still on its way at `dest`: a refund waits for it, so
/// its restatement reaches the conversion that will count, not the one being retracted.
pub fn in_progress(order: &[CanonicalEvent], dest: Destination) -> bool {
    order.iter().any(|e| {
        e.correction.is_some()
            && e.destinations
                .get(&dest)
                .is_some_and(|s| s.status.is_open() || s.status == DeliveryStatus::DeadLetter)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::{DeliveryLogEntry, PairResult};
    use crate::event::{ValidationContext, parse_event_json, validate};
    use serde_json::{Value, json};

    const OLD: &str = "customers/1234567890/conversionActions/987654321";
    const NEW: &str = "customers/1234567890/conversionActions/555";

    fn now() -> Timestamp {
        Timestamp::parse_rfc3339("2026-11-28T12:00:00Z").unwrap()
    }

    fn mappings() -> (Mapping, Mapping) {
        let old = Mapping::bundled().unwrap();
        let text = include_str!("../../../infra/mapping.toml")
            .replace("987654321\"", "555\"")
            .replace("version = \"", "version = \"new-");
        let new = Mapping::load(&text).unwrap();
        (old, new)
    }

    fn event(v: Value) -> CanonicalEvent {
        let mut ctx = ValidationContext::for_tests(now());
        ctx.mapping_version = Mapping::bundled().unwrap().version;
        validate(&parse_event_json(&v.to_string()).unwrap(), &ctx).unwrap()
    }

    fn delivered_as(e: &mut CanonicalEvent, d: Destination, sent_as: Option<&str>) {
        let mut s = DestinationState::new(DeliveryStatus::Delivered, now());
        s.log.push(DeliveryLogEntry {
            attempt: 1,
            result: PairResult::Delivered,
            request_at: now(),
            response_at: now(),
            error: None,
            platform_ref: None,
            sent_as: sent_as.map(str::to_string),
        });
        e.destinations.insert(d, s);
    }

    fn won(order: &str, days_ago: i64, value: f64, identity: Value) -> CanonicalEvent {
        let at = now().minus_secs(days_ago * 86_400).canonical();
        let mut e = event(
            json!({"source": "hubspot", "event_name": "won", "occurred_at": at,
            "entity_type": "opportunity", "entity_id": format!("D-{order}"), "order_id": order,
            "value": value, "currency": "EUR", "identity": identity}),
        );
        delivered_as(&mut e, Destination::Google, Some(OLD));
        e
    }

    fn refund(order: &str, value: f64, status: DeliveryStatus) -> CanonicalEvent {
        let at = now().minus_secs(3600).canonical();
        let mut e = event(
            json!({"source": "hubspot", "event_name": "refund", "occurred_at": at,
            "entity_type": "order", "entity_id": format!("R-{order}-{value}"), "order_id": order,
            "value": value, "currency": "EUR", "identity": {}}),
        );
        e.destinations
            .insert(Destination::Google, DestinationState::new(status, now()));
        e
    }

    fn gclid() -> Value {
        json!({"gclid": "Cj0KCQ", "email": "a@example.com"})
    }

    fn reason<'a>(p: &'a CorrectionPlan, order: &str) -> &'a str {
        p.not_corrected
            .iter()
            .find(|n| n.order_id.as_deref() == Some(order) && n.destination == Destination::Google)
            .map_or("", |n| n.reason.as_str())
    }

    #[test]
    fn the_plan_moves_delivered_wons_and_says_why_it_leaves_the_others() {
        let (old, new) = mappings();
        let a = won("A", 2, 100.0, gclid());
        let b = won("B", 3, 200.0, gclid());
        let b_refund = refund("B", 50.0, DeliveryStatus::Delivered);
        let no_click = won("C", 2, 300.0, json!({"email": "c@example.com"}));
        let old_one = won("D", 60, 400.0, gclid());
        let mut unknown = won("E", 2, 500.0, gclid());
        delivered_as(&mut unknown, Destination::Google, None);
        unknown.mapping_version = "2025-01-01.1".into();
        let mut moved = won("F", 2, 600.0, gclid());
        delivered_as(&mut moved, Destination::Google, Some(NEW));
        let full = won("G", 2, 700.0, gclid());
        let full_refund = refund("G", 700.0, DeliveryStatus::Delivered);
        let busy = won("H", 2, 800.0, gclid());
        let busy_refund = refund("H", 10.0, DeliveryStatus::Retry);
        let events = vec![
            a,
            b,
            b_refund,
            no_click,
            old_one,
            unknown,
            moved,
            full,
            full_refund,
            busy,
            busy_refund,
        ];
        let p = plan(&events, &old, &new, now());
        let planned: Vec<&str> = p.corrections.iter().map(|c| c.order_id.as_str()).collect();
        assert_eq!(planned, ["B", "A"], "oldest first");
        let b = &p.corrections[0];
        assert_eq!((b.from.as_str(), b.to.as_str()), (OLD, NEW));
        assert_eq!(b.net.as_f64(), 150.0);
        assert_eq!(
            b.steps,
            [
                CorrectionStep::Retract,
                CorrectionStep::Upload,
                CorrectionStep::Restate
            ]
        );
        assert_eq!(
            p.corrections[1].steps,
            [CorrectionStep::Retract, CorrectionStep::Upload]
        );
        assert_eq!(p.revenue_moved["EUR"].as_f64(), 250.0);
        assert_eq!(
            p.unchanged[&Destination::Google],
            1,
            "F is under the new action already"
        );
        assert!(
            reason(&p, "C").contains("click id is no longer stored"),
            "{p:?}"
        );
        assert!(reason(&p, "D").contains("54 days"), "{}", reason(&p, "D"));
        assert!(
            reason(&p, "E").contains("2025-01-01.1"),
            "{}",
            reason(&p, "E")
        );
        assert!(reason(&p, "G").contains("refunded in full"));
        assert!(reason(&p, "H").contains("still being delivered"));
        assert_eq!(p.examined[&Destination::Google], 8);
    }

    #[test]
    fn a_shorter_window_or_data_manager_without_the_ads_api_is_not_corrected() {
        let (old, mut new) = mappings();
        let g = new.google.as_mut().unwrap();
        g.conversions
            .get_mut(&EventName::Won)
            .unwrap()
            .click_through_lookback_window_days = Some(7);
        let p = plan(&[won("A", 2, 100.0, gclid())], &old, &new, now());
        assert!(reason(&p, "A").contains("shorter"), "{p:?}");

        let (old, mut new) = mappings();
        new.google.as_mut().unwrap().backend = GoogleBackend::DataManager;
        let p = plan(&[won("A", 2, 100.0, gclid())], &old, &new, now());
        assert!(reason(&p, "A").contains("cannot retract"), "{p:?}");
        new.google.as_mut().unwrap().full_refund_policy = FullRefundPolicy::RetractViaAdsApi;
        let events = [
            won("A", 2, 100.0, gclid()),
            refund("A", 10.0, DeliveryStatus::Delivered),
        ];
        let p = plan(&events, &old, &new, now());
        assert_eq!(p.corrections.len(), 1);
        assert_eq!(
            p.corrections[0].steps,
            [CorrectionStep::Retract, CorrectionStep::Upload],
            "Data Manager's upload carries the net value: nothing to restate"
        );
        assert_eq!(p.corrections[0].net.as_f64(), 90.0);
    }

    #[test]
    fn meta_wons_under_an_old_event_name_are_reported_never_resent() {
        let (old, mut new) = mappings();
        new.meta
            .as_mut()
            .unwrap()
            .events
            .get_mut(&EventName::Won)
            .unwrap()
            .event_name = "Subscribe".into();
        let mut a = won("A", 2, 100.0, gclid());
        delivered_as(&mut a, Destination::Meta, Some("Purchase"));
        let p = plan(&[a], &old, &new, now());
        let m: Vec<_> = p
            .not_corrected
            .iter()
            .filter(|n| n.destination == Destination::Meta)
            .collect();
        assert_eq!(m.len(), 1);
        assert_eq!(
            (m[0].from.as_str(), m[0].to.as_str()),
            ("Purchase", "Subscribe")
        );
        assert!(m[0].reason.contains("no retraction"));
        assert!(
            p.corrections
                .iter()
                .all(|c| c.destination == Destination::Google)
        );
    }

    #[test]
    fn correction_events_are_deterministic_and_a_second_plan_finds_them() {
        let (old, new) = mappings();
        let a = won("A", 2, 100.0, gclid());
        let p = plan(std::slice::from_ref(&a), &old, &new, now());
        let first = correction_events(&a, &p.corrections[0], &old.version, &new.version, now());
        let again = correction_events(
            &a,
            &p.corrections[0],
            &old.version,
            &new.version,
            now().plus_secs(60),
        );
        let ids = |v: &[CanonicalEvent]| v.iter().map(|e| e.event_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&first), ids(&again), "the same move, the same events");
        assert!(
            first
                .iter()
                .all(|e| e.event_id != a.event_id && e.key == e.event_id)
        );
        let c = first[0].correction.as_ref().unwrap();
        assert_eq!(
            (
                c.from_mapping_version.as_str(),
                c.to_mapping_version.as_str()
            ),
            (old.version.as_str(), new.version.as_str())
        );
        assert_eq!(
            first[1].identity, a.identity,
            "the upload matches like the won"
        );
        assert_eq!(
            first[1].occurred_at, a.occurred_at,
            "business time is the won's"
        );

        let mut events = vec![a.clone()];
        events.extend(first.clone());
        let p2 = plan(&events, &old, &new, now());
        assert!(p2.corrections.is_empty());
        assert_eq!(p2.already_corrected, 1);
        // Once the upload is delivered, Google holds the conversion under the new action.
        delivered_as(&mut events[2], Destination::Google, Some(NEW));
        let p3 = plan(&events, &old, &new, now());
        assert_eq!(
            (p3.unchanged[&Destination::Google], p3.already_corrected),
            (1, 0)
        );
    }

    #[test]
    fn each_step_waits_for_the_one_before_and_stops_if_it_failed() {
        let (old, new) = mappings();
        let a = won("A", 2, 100.0, gclid());
        let p = plan(std::slice::from_ref(&a), &old, &new, now());
        let mut steps = correction_events(&a, &p.corrections[0], &old.version, &new.version, now());
        let wait = Duration::from_secs(60);
        let g = Destination::Google;
        assert!(
            gate(&steps[0], g, &steps, wait).is_ok(),
            "the retraction goes first"
        );
        assert!(matches!(
            gate(&steps[1], g, &steps, wait),
            Err(Outcome::Wait { .. })
        ));
        let order = |steps: &[CanonicalEvent]| {
            let mut o = vec![a.clone()];
            o.extend(steps.iter().cloned());
            o
        };
        assert!(
            in_progress(&order(&steps), g),
            "a refund waits for the move"
        );
        delivered_as(&mut steps[0], g, Some(OLD));
        assert!(gate(&steps[1], g, &steps, wait).is_ok());
        steps[0].destinations.get_mut(&g).unwrap().status = DeliveryStatus::Rejected;
        match gate(&steps[1], g, &steps, wait) {
            Err(Outcome::Rejected { error, alert, .. }) => {
                assert_eq!(error.code, "correction_step_failed");
                assert!(alert);
            }
            other => panic!("{other:?}"),
        }
        delivered_as(&mut steps[0], g, Some(OLD));
        delivered_as(&mut steps[1], g, Some(NEW));
        assert!(!in_progress(&order(&steps), g));
    }
}
