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

use crate::delivery::{DeliveryStatus, Destination, ErrorCode, ErrorInfo, Outcome};
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
    /// When the operator confirmed the correction: the retraction's time, and what orders
    /// one move before the next. (The event's `received_at` is the won's, so a correction
    /// expires with the won it corrects.)
    pub made_at: Timestamp,
}

impl Correction {
    /// The same correction (one won, one move), any step.
    fn same_move(&self, other: &Correction) -> bool {
        self.of == other.of && self.from == other.from && self.to == other.to
    }
}

/// The longest a conversion may have been recorded for and still be corrected: Google refuses
/// adjustments to conversions more than 54 days old (G-ERR-ADJ `CONVERSION_EXPIRED`), and a
/// day is kept for the steps after the retraction (the restatement is an adjustment too).
pub const MAX_AGE_DAYS: i64 = 53;

/// Where Google holds a won's conversion, given the corrections delivered so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Held {
    /// Where the won was delivered: no correction step of it was delivered.
    Original,
    /// Uploaded again under this action by a correction.
    Moved(String),
    /// A correction retracted it and its upload has not been delivered: Google counts
    /// nothing for the order until the upload goes (a refund waits).
    Retracted,
}

/// Where Google holds `won`'s conversion: the newest delivered correction step of it decides.
pub fn where_held<'a>(won_key: &str, order: impl IntoIterator<Item = &'a CanonicalEvent>) -> Held {
    let newest = order
        .into_iter()
        .filter(|e| delivered(e, Destination::Google))
        .filter_map(|e| e.correction.as_ref().filter(|c| c.of == won_key))
        .max_by_key(|c| (c.made_at, c.step));
    match newest {
        None => Held::Original,
        Some(c) if c.step == CorrectionStep::Retract => Held::Retracted,
        Some(c) => Held::Moved(c.to.clone()),
    }
}

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
    /// Moves an earlier run stored whole and that are on their way (or done).
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

/// The corrections of `won` among the order's events.
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

/// The action Google holds `won`'s conversion under now. `Err`: not known, or not held.
fn held_under(
    won: &CanonicalEvent,
    order: &[&CanonicalEvent],
    old: &Mapping,
) -> Result<String, String> {
    match where_held(&won.key, order.iter().copied()) {
        Held::Moved(a) => return Ok(a),
        Held::Retracted => {
            return Err("a correction retracted the conversion and its upload was not delivered: fix the cause and redrive the dead-lettered step".into());
        }
        Held::Original => {}
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

/// Every action the order was ever uploaded under: Google keeps an order id once per action,
/// even after a retraction (`ORDER_ID_ALREADY_IN_USE`), so it can never go there again.
fn uploaded_under(won: &CanonicalEvent, order: &[&CanonicalEvent], from: &str) -> Vec<String> {
    let mut out = vec![from.to_string()];
    let logged = won
        .destinations
        .get(&Destination::Google)
        .into_iter()
        .flat_map(|s| s.log.iter())
        .filter(|l| l.result.is_delivered())
        .filter_map(|l| l.sent_as.clone());
    out.extend(logged);
    out.extend(
        corrections_of(won, order)
            .filter(|(e, c)| c.step == CorrectionStep::Upload && delivered(e, Destination::Google))
            .map(|(_, c)| c.to.clone()),
    );
    out
}

/// The click-through window a mapping declares for `action` (the new mapping first).
fn window_of(action: &str, old: &Mapping, new: &Mapping) -> Option<u32> {
    [new, old]
        .iter()
        .filter_map(|m| m.google.as_ref())
        .flat_map(|g| g.conversions.values())
        .filter(|c| c.action == action)
        .find_map(|c| c.click_through_lookback_window_days)
}

/// Why `won` cannot move from `from` to `to` now, if it cannot: Google would refuse a step or
/// lose the conversion. A retraction is final, so everything the upload needs is checked first.
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
    if uploaded_under(won, order, from).contains(&to.action) {
        return Err(format!(
            "the order was uploaded under {} before: Google keeps an order id once per action, even after a retraction (ORDER_ID_ALREADY_IN_USE)",
            to.action
        ));
    }
    let from_customer = GoogleConversion::from_resource(from)
        .map(|c| c.customer_id)
        .unwrap_or_default();
    if from_customer != to.customer_id {
        return Err(format!(
            "the new action is in another Google Ads account ({} rather than {from_customer}): the click may not belong to it (INVALID_CUSTOMER_FOR_CLICK)",
            to.customer_id
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
    // inside the new one's only if that is no shorter (EXPIRED_EVENT otherwise). Both must be
    // stated: a default could hide an old 90-day window behind a new 30-day one.
    let (Some(was), Some(will)) = (window_of(from, old, new), window_of(&to.action, old, new))
    else {
        return Err(format!(
            "the click-through windows are not stated: set click_through_lookback_window_days for {from} and {} in the mappings (each action's setting in Google Ads), so the click can be checked against the new window",
            to.action
        ));
    };
    if will < was {
        return Err(format!(
            "the new action's click-through window ({will} days) is shorter than the old one's ({was} days): the click may be outside it (EXPIRED_EVENT)"
        ));
    }
    if let Some(g) = &new.google
        && g.backend_for(&from_customer) == GoogleBackend::DataManager
        && g.full_refund_policy != FullRefundPolicy::RetractViaAdsApi
    {
        return Err("the conversion went through the Data Manager API, which cannot retract; set google.full_refund_policy = \"retract_via_ads_api\" where the account may use the Ads API".into());
    }
    Ok((value, currency, refunded))
}

/// What stands of an earlier run's move of `won` from `from` to `to`.
enum Earlier {
    /// No move stored, or one stored in part (the retraction is stored last): plan it (again).
    None,
    /// Stored whole: on its way or done.
    Stored,
    /// A step ended without delivery: the reason, for the report.
    Failed(String),
}

fn earlier_move(won: &CanonicalEvent, order: &[&CanonicalEvent], from: &str, to: &str) -> Earlier {
    let steps: Vec<(&CanonicalEvent, &Correction)> = corrections_of(won, order)
        .filter(|(_, c)| c.from == from && c.to == to)
        .collect();
    if !steps.iter().any(|(_, c)| c.step == CorrectionStep::Retract) {
        return Earlier::None;
    }
    for (e, c) in &steps {
        if let Some(s) = e.destinations.get(&Destination::Google)
            && !s.status.is_open()
            && !s.status.is_delivered()
        {
            let code = s.last_error.as_ref().map_or("", |x| x.code.as_str());
            return Earlier::Failed(format!(
                "the {} step of an earlier correction ended {} ({code}): fix the cause and redrive it from the dead-letter queue",
                c.step.as_str(),
                s.status.as_str()
            ));
        }
    }
    Earlier::Stored
}

/// The won whose conversion Google holds for an order with several delivered wons (stored
/// before the order guard): the Ads API keeps the first upload of an order id, Data Manager
/// the last value written.
fn holder<'a>(wons: &[&'a CanonicalEvent], data_manager: bool) -> Option<&'a CanonicalEvent> {
    let key = |e: &&&CanonicalEvent| (e.occurred_at, e.key.clone());
    let delivered = wons.iter().filter(|w| delivered(w, Destination::Google));
    if data_manager {
        delivered.max_by_key(key).copied()
    } else {
        delivered.min_by_key(key).copied()
    }
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
    let target_on_dm = target.is_some_and(|t| {
        new.google
            .as_ref()
            .is_some_and(|g| g.backend_for(&t.customer_id) == GoogleBackend::DataManager)
    });
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
        let to_name = target.map_or("(not sent)", |t| t.action.as_str());
        let order_wons: Vec<&CanonicalEvent> = order
            .iter()
            .copied()
            .filter(|e| e.event_name == EventName::Won)
            .collect();
        if order_wons.len() > 1
            && holder(&order_wons, target_on_dm).is_some_and(|h| h.key != won.key)
        {
            out.not_corrected.push(not(
                Destination::Google,
                "(another won)",
                to_name,
                "another won of this order (stored before the order guard) holds its conversion at Google; that one is corrected".into(),
            ));
            continue;
        }
        let from = match held_under(won, order, old) {
            Ok(a) => a,
            Err(reason) => {
                out.not_corrected
                    .push(not(Destination::Google, "(unknown)", to_name, reason));
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
        match earlier_move(won, order, &from, &to.action) {
            Earlier::Stored => {
                out.already_corrected += 1;
                continue;
            }
            Earlier::Failed(reason) => {
                out.not_corrected
                    .push(not(Destination::Google, &from, &to.action, reason));
                continue;
            }
            Earlier::None => {}
        }
        match check_google(won, order, &from, to, old, new, now) {
            Ok((value, currency, refunded)) => {
                let net = value.saturating_sub(refunded);
                let moved = out
                    .revenue_moved
                    .entry(currency.clone())
                    .or_insert(Money::from_micros(0));
                *moved = moved.saturating_add(net);
                // The Ads API keeps the first upload's value, so the refunds known when the
                // step goes (there may be more by then than now) are restated after it; Data
                // Manager keeps the last value written, so its upload carries the net value.
                let mut steps = vec![CorrectionStep::Retract, CorrectionStep::Upload];
                if !target_on_dm {
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
/// plans.
pub async fn plan_from_store(
    store: &dyn EventStore,
    old: &Mapping,
    new: &Mapping,
    from: Timestamp,
    to: Timestamp,
    now: Timestamp,
) -> Result<CorrectionPlan, StoreError> {
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
    Ok(plan(&events, old, new, now))
}

/// The correction events of one planned correction, in step order: the won's own fields
/// (business and receipt time, so a correction expires with its won; order, value, identity
/// hashes, consent), a key derived from the won and both actions, and a pending pair.
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
            CanonicalEvent {
                mapping_version: to_mapping_version.to_string(),
                correction: Some(Correction {
                    of: won.key.clone(),
                    step,
                    from: p.from.clone(),
                    to: p.to.clone(),
                    from_mapping_version: from_mapping_version.to_string(),
                    to_mapping_version: to_mapping_version.to_string(),
                    made_at: now,
                }),
                ..CanonicalEvent::derived_from_won(
                    won,
                    event_id,
                    EventName::Correction,
                    [p.destination],
                    now,
                )
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
    /// Wons no longer in the store (expired or erased since the plan was made): not corrected.
    pub missing: Vec<String>,
}

/// Stores the correction events of `plan` (written before any delivery, like every event) and
/// enqueues their delivery. The wons are read again, so an erasure since the plan was made is
/// not undone by a copy. Each move's retraction is stored last: a run stopped half way leaves
/// steps that wait for a retraction that is not there (nothing is retracted), and the next
/// plan stores the move again.
pub async fn apply(
    plan: &CorrectionPlan,
    store: &dyn EventStore,
    queue: &dyn DeliveryQueue,
    now: Timestamp,
) -> Result<ApplyReport, StoreError> {
    let mut report = ApplyReport::default();
    let keys: Vec<String> = plan.corrections.iter().map(|p| p.key.clone()).collect();
    let wons = store.get_many(&keys).await?;
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
        for e in events.iter().rev() {
            match store.put_new(e).await? {
                PutOutcome::Duplicate => report.existing += 1,
                _ => report.stored += 1,
            }
        }
        messages.extend(
            events
                .iter()
                .map(|e| DeliveryMessage::new(&e.key, p.destination)),
        );
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
                ErrorCode::CorrectionStepFailed,
                format!(
                    "the {} step of this correction ended {}; the {} step is not sent",
                    before.as_str(),
                    s.as_str(),
                    c.step.as_str()
                ),
            ),
            dead_letter: true,
            alert: true,
        }),
        // Not stored yet, on its way, or in the dead-letter queue waiting for a redrive.
        _ => Err(Outcome::Wait {
            error: ErrorInfo::new(
                ErrorCode::CorrectionStepPending,
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

/// Whether a refund of the order must wait at `dest`: a correction's retraction is on its way,
/// or it retracted the conversion and the upload has not gone yet. The refund's adjustment
/// must reach the conversion that will count, not the one being retracted. A retraction that
/// failed retracted nothing: the refund adjusts the conversion where it is (a redriven move
/// restates every refund under the new action).
pub fn in_progress(order: &[CanonicalEvent], dest: Destination) -> bool {
    let open = order.iter().any(|e| {
        e.correction_step() == Some(CorrectionStep::Retract)
            && e.destinations
                .get(&dest)
                .is_some_and(|s| s.status.is_open())
    });
    open || order
        .iter()
        .filter(|e| e.event_name == EventName::Won)
        .any(|w| where_held(&w.key, order) == Held::Retracted)
}

/// Every correction step is delivered or dead-lettered, never closed quietly: a retraction
/// without its upload loses the order, so a refusal goes to the dead-letter queue with an
/// alert, for a person to fix and redrive.
pub fn escalate(event: &CanonicalEvent, outcome: Outcome) -> Outcome {
    match outcome {
        Outcome::Rejected { error, .. } if event.correction.is_some() => Outcome::Rejected {
            error,
            dead_letter: true,
            alert: true,
        },
        o => o,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::DestinationState;
    use crate::delivery::{DeliveryLogEntry, PairResult};
    use crate::event::{ValidationContext, parse_event_json, validate};
    use crate::queue::memory::MemoryQueue;
    use crate::store::memory::MemoryStore;
    use serde_json::{Value, json};

    const OLD: &str = "customers/1234567890/conversionActions/987654321";
    const NEW: &str = "customers/1234567890/conversionActions/555";

    fn now() -> Timestamp {
        Timestamp::parse_rfc3339("2026-11-28T12:00:00Z").unwrap()
    }

    /// The bundled mapping with the won action `id` and its click-through window.
    fn mapping(id: &str, window: Option<u32>, version: &str) -> Mapping {
        let mut line = format!("action = \"customers/1234567890/conversionActions/{id}\"");
        if let Some(w) = window {
            line.push_str(&format!("\nclick_through_lookback_window_days = {w}"));
        }
        let text = include_str!("../../../infra/mapping.toml")
            .replace(
                "action = \"customers/1234567890/conversionActions/987654321\"",
                &line,
            )
            .replacen("version = \"", &format!("version = \"{version}"), 1);
        Mapping::load(&text).unwrap()
    }

    fn mappings() -> (Mapping, Mapping) {
        (
            mapping("987654321", Some(30), ""),
            mapping("555", Some(30), "new-"),
        )
    }

    fn event(v: Value) -> CanonicalEvent {
        let mut ctx = ValidationContext::for_tests(now());
        ctx.mapping_version = mappings().0.version;
        validate(&parse_event_json(&v.to_string()).unwrap(), &ctx).unwrap()
    }

    fn delivered_as(e: &mut CanonicalEvent, d: Destination, sent_as: Option<&str>) {
        let mut s = DestinationState::new(DeliveryStatus::Delivered, now());
        s.log.push(DeliveryLogEntry {
            sent_as: sent_as.map(str::to_string),
            ..DeliveryLogEntry::new(1, PairResult::Delivered, now())
        });
        e.destinations.insert(d, s);
    }

    fn set_status(e: &mut CanonicalEvent, status: DeliveryStatus) {
        e.destinations
            .insert(Destination::Google, DestinationState::new(status, now()));
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
        set_status(&mut e, status);
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

    fn steps_of(won: &CanonicalEvent, old: &Mapping, new: &Mapping) -> Vec<CanonicalEvent> {
        let p = plan(std::slice::from_ref(won), old, new, now());
        correction_events(won, &p.corrections[0], &old.version, &new.version, now())
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
        let all = [
            CorrectionStep::Retract,
            CorrectionStep::Upload,
            CorrectionStep::Restate,
        ];
        assert_eq!(b.steps, all);
        assert_eq!(
            p.corrections[1].steps, all,
            "restated even without a refund now: one may come before the step goes"
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
    fn windows_accounts_and_data_manager_decide_whether_the_upload_can_succeed() {
        let old = mapping("987654321", Some(30), "");
        let a = || vec![won("A", 2, 100.0, gclid())];
        let shorter = mapping("555", Some(7), "new-");
        assert!(reason(&plan(&a(), &old, &shorter, now()), "A").contains("shorter"));
        let unstated = mapping("555", None, "new-");
        assert!(reason(&plan(&a(), &old, &unstated, now()), "A").contains("not stated"));
        let longer = mapping("555", Some(90), "new-");
        assert_eq!(plan(&a(), &old, &longer, now()).corrections.len(), 1);
        let mut elsewhere = longer.clone();
        let g = elsewhere.google.as_mut().unwrap();
        let w = g.conversions.get_mut(&EventName::Won).unwrap();
        w.action = "customers/9999999999/conversionActions/555".into();
        w.customer_id = "9999999999".into();
        assert!(
            reason(&plan(&a(), &old, &elsewhere, now()), "A")
                .contains("another Google Ads account")
        );

        let mut dm = longer.clone();
        dm.google.as_mut().unwrap().backend = GoogleBackend::DataManager;
        assert!(reason(&plan(&a(), &old, &dm, now()), "A").contains("cannot retract"));
        dm.google.as_mut().unwrap().full_refund_policy = FullRefundPolicy::RetractViaAdsApi;
        let mut events = a();
        events.push(refund("A", 10.0, DeliveryStatus::Delivered));
        let p = plan(&events, &old, &dm, now());
        assert_eq!(
            p.corrections[0].steps,
            [CorrectionStep::Retract, CorrectionStep::Upload],
            "Data Manager's upload carries the net value: nothing to restate"
        );
        assert_eq!(p.corrections[0].net.as_f64(), 90.0);
    }

    #[test]
    fn an_order_never_goes_back_to_an_action_it_was_uploaded_under() {
        // A to B, then the mapping goes back to A: Google keeps the order id once per action.
        let (old, new) = mappings();
        let a = won("A", 2, 100.0, gclid());
        let mut events = vec![a.clone()];
        for mut e in steps_of(&a, &old, &new) {
            let step = e.correction.as_ref().unwrap().step;
            let sent = if step == CorrectionStep::Retract {
                OLD
            } else {
                NEW
            };
            delivered_as(&mut e, Destination::Google, Some(sent));
            events.push(e);
        }
        let back = mapping("987654321", Some(30), "back-");
        let p = plan(&events, &new, &back, now());
        assert!(p.corrections.is_empty());
        assert!(reason(&p, "A").contains("ORDER_ID_ALREADY_IN_USE"), "{p:?}");
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
    fn of_two_delivered_wons_only_the_one_google_holds_is_moved() {
        // Two wons of one order delivered before the order guard existed: the Ads API holds
        // the first upload, so only that one is corrected and its revenue counted once.
        let (old, new) = mappings();
        let first = won("A", 3, 100.0, gclid());
        let mut second = won("A", 2, 100.0, gclid());
        second.entity_id = "D-A-again".into();
        second.key = "second".into();
        let p = plan(&[first.clone(), second], &old, &new, now());
        assert_eq!(p.corrections.len(), 1);
        assert_eq!(p.corrections[0].key, first.key);
        assert_eq!(p.revenue_moved["EUR"].as_f64(), 100.0);
        assert!(reason(&p, "A").contains("another won of this order"));
    }

    #[test]
    fn correction_events_are_deterministic_expire_with_their_won_and_are_found_again() {
        let (old, new) = mappings();
        let a = won("A", 2, 100.0, gclid());
        let first = steps_of(&a, &old, &new);
        let p = plan(std::slice::from_ref(&a), &old, &new, now());
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
        assert_eq!(
            first[1].received_at, a.received_at,
            "it expires with the won"
        );

        let mut events = vec![a.clone()];
        events.extend(first.clone());
        let p2 = plan(&events, &old, &new, now());
        assert!(p2.corrections.is_empty());
        assert_eq!(p2.already_corrected, 1);
        // Once the upload is delivered, Google holds the conversion under the new action.
        delivered_as(&mut events[1], Destination::Google, Some(OLD));
        delivered_as(&mut events[2], Destination::Google, Some(NEW));
        let p3 = plan(&events, &old, &new, now());
        assert_eq!(
            (p3.unchanged[&Destination::Google], p3.already_corrected),
            (1, 0)
        );
        // A failed step is reported, with what to do, not counted as corrected.
        set_status(&mut events[1], DeliveryStatus::DeadLetter);
        set_status(&mut events[2], DeliveryStatus::Pending);
        let p4 = plan(&events, &old, &new, now());
        assert!(reason(&p4, "A").contains("redrive"), "{p4:?}");
    }

    #[tokio::test]
    async fn a_run_stopped_half_way_retracts_nothing_and_the_next_run_completes_it() {
        let (old, new) = mappings();
        let a = won("A", 2, 100.0, gclid());
        let store = MemoryStore::new();
        store.put_new(&a).await.unwrap();
        let queue = MemoryQueue::new(5, Duration::from_secs(30));
        // The first run stopped after storing the upload: the retraction is stored last.
        let steps = steps_of(&a, &old, &new);
        store.put_new(&steps[1]).await.unwrap();
        let everything = || store.all();
        assert!(
            matches!(
                gate(
                    &steps[1],
                    Destination::Google,
                    &everything(),
                    Duration::from_secs(1)
                ),
                Err(Outcome::Wait { .. })
            ),
            "the upload waits for a retraction that is not there"
        );
        let p = plan(&everything(), &old, &new, now());
        assert_eq!(p.corrections.len(), 1, "planned again: {p:?}");
        let r = apply(&p, &store, &queue, now()).await.unwrap();
        assert_eq!((r.stored, r.existing), (2, 1));
        assert_eq!(queue.depth(Destination::Google), 3);
        let r = apply(&p, &store, &queue, now()).await.unwrap();
        assert_eq!(
            (r.stored, r.existing),
            (0, 3),
            "a second run stores nothing"
        );
    }

    #[test]
    fn each_step_waits_for_the_one_before_and_a_failure_goes_to_a_person() {
        let (old, new) = mappings();
        let a = won("A", 2, 100.0, gclid());
        let mut steps = steps_of(&a, &old, &new);
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
        // Retracted, and the upload failed: Google counts nothing for the order, refunds wait.
        set_status(&mut steps[1], DeliveryStatus::DeadLetter);
        set_status(&mut steps[2], DeliveryStatus::DeadLetter);
        assert_eq!(where_held(&a.key, &order(&steps)), Held::Retracted);
        assert!(in_progress(&order(&steps), g));
        set_status(&mut steps[0], DeliveryStatus::DeadLetter);
        assert!(
            !in_progress(&order(&steps), g),
            "nothing was retracted: refunds adjust the conversion where it is"
        );
        set_status(&mut steps[0], DeliveryStatus::Rejected);
        match gate(&steps[1], g, &steps, wait) {
            Err(Outcome::Rejected {
                error,
                alert,
                dead_letter,
            }) => {
                assert_eq!(error.code, "correction_step_failed");
                assert!(alert && dead_letter);
            }
            other => panic!("{other:?}"),
        }
        // A refusal of any step goes to the dead-letter queue with an alert.
        let refused = Outcome::Rejected {
            error: ErrorInfo::new(ErrorCode::platform("EVENT_NOT_FOUND"), "no click"),
            dead_letter: false,
            alert: false,
        };
        assert!(matches!(
            escalate(&steps[1], refused.clone()),
            Outcome::Rejected {
                dead_letter: true,
                alert: true,
                ..
            }
        ));
        assert_eq!(escalate(&a, refused.clone()), refused, "a won's is its own");
        delivered_as(&mut steps[0], g, Some(OLD));
        delivered_as(&mut steps[1], g, Some(NEW));
        delivered_as(&mut steps[2], g, Some(NEW));
        assert!(!in_progress(&order(&steps), g));
        assert_eq!(where_held(&a.key, &order(&steps)), Held::Moved(NEW.into()));
    }
}
