//! Building Google rows from stored events: Ads API click conversions and adjustments, Data
//! Manager events, with identifiers, consent and times in each API's form.

use super::err;
use bridge_core::consent::{Consent, GoogleSignal};
use bridge_core::correction::{Correction, CorrectionStep, Held, where_held};
use bridge_core::delivery::{DeliveryStatus, Destination, ErrorCode, ErrorInfo};
use bridge_core::event::{CanonicalEvent, EventName};
use bridge_core::identity::{ClickIds, GoogleHashes};
use bridge_core::mapping::{
    FullRefundPolicy, GoogleBackend, GoogleConversion, GoogleMapping, GoogleRefundPolicy, Mapping,
};
use bridge_core::money::Money;
use bridge_core::timestamp::Timestamp;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

/// Which API and which call a row belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Ads API `uploadClickConversions`.
    Click,
    /// Ads API `uploadConversionAdjustments`.
    Adjustment,
    /// Data Manager `events:ingest`.
    DataManager,
}

/// One row, ready to batch.
#[derive(Clone, Debug, PartialEq)]
pub struct GoogleItem {
    pub kind: Kind,
    pub row: Value,
    pub customer_id: String,
    pub login_customer_id: Option<String>,
    /// The conversion action id (Data Manager's productDestinationId).
    pub action_id: String,
    /// The row carries hashed user data, so the customer data terms must be accepted.
    pub has_user_data: bool,
    /// This delivery attempt (1-based), for errors that allow only a few tries.
    pub attempt: u32,
    /// A full refund restated to 0 because the back end cannot retract.
    pub restated_to_zero: bool,
}

impl GoogleItem {
    /// The conversion action's resource name.
    pub fn action(&self) -> String {
        format!(
            "customers/{}/conversionActions/{}",
            self.customer_id, self.action_id
        )
    }

    /// The order the row is for (`orderId`, or Data Manager's `transactionId`).
    pub fn order(&self) -> Option<&str> {
        self.row
            .get("orderId")
            .or_else(|| self.row.get("transactionId"))
            .and_then(Value::as_str)
    }

    /// The row names a click (gclid, gbraid or wbraid).
    pub fn has_click_id(&self) -> bool {
        ["gclid", "gbraid", "wbraid"]
            .iter()
            .any(|k| self.row.get(*k).is_some())
            || self.row["adIdentifiers"].is_object()
    }

    /// The row without its user identifiers: what may still go when the customer data terms
    /// are not accepted.
    pub fn strip_user_data(&mut self) {
        if let Some(row) = self.row.as_object_mut() {
            row.remove("userIdentifiers");
            row.remove("userData");
        }
        self.has_user_data = false;
    }

    /// Rows are batched per call, customer and manager account (and, for Data Manager, per
    /// conversion action, which is the request's destination).
    pub fn group(&self) -> String {
        let login = self.login_customer_id.as_deref().unwrap_or("-");
        match self.kind {
            Kind::Click => format!("ads-click/{}/{login}", self.customer_id),
            Kind::Adjustment => format!("ads-adjust/{}/{login}", self.customer_id),
            Kind::DataManager => {
                format!(
                    "datamanager/{}/{login}/{}",
                    self.customer_id, self.action_id
                )
            }
        }
    }
}

/// gclid first; otherwise one braid, never both (GBRAID_WBRAID_BOTH_SET).
fn click_id(c: &ClickIds) -> Option<(&'static str, &str)> {
    if let Some(g) = &c.gclid {
        return Some(("gclid", g));
    }
    if let Some(g) = &c.gbraid {
        return Some(("gbraid", g));
    }
    c.wbraid.as_deref().map(|w| ("wbraid", w))
}

/// Ads API user identifiers: one identifier per object (the field is a oneof), hashed email
/// and phone only (the only kinds a click conversion accepts).
fn ads_identifiers(g: &GoogleHashes) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(e) = &g.email {
        out.push(json!({"hashedEmail": e, "userIdentifierSource": "FIRST_PARTY"}));
    }
    if let Some(p) = &g.phone {
        out.push(json!({"hashedPhoneNumber": p, "userIdentifierSource": "FIRST_PARTY"}));
    }
    out
}

/// Data Manager user identifiers: one per object; an address only when all four parts are
/// known (Google matches on the whole address), with names hashed and region/postal code not.
fn dm_identifiers(g: &GoogleHashes) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(e) = &g.email {
        out.push(json!({"emailAddress": e}));
    }
    if let Some(p) = &g.phone {
        out.push(json!({"phoneNumber": p}));
    }
    if let (Some(gn), Some(fam), Some(rc), Some(pc)) = (
        &g.given_name,
        &g.family_name,
        &g.region_code,
        &g.postal_code,
    ) {
        out.push(json!({"address": {"givenName": gn, "familyName": fam, "regionCode": rc, "postalCode": pc}}));
    }
    out
}

/// The Ads API's consent: `adUserData` only. Its Consent message says adPersonalization "can
/// only be set for OfflineUserDataJobService and UserDataService", so it never goes on a click
/// conversion (Data Manager takes both).
/// source: googleapis google/ads/googleads/v25/common/consent.proto (G-CONSENT)
fn ads_consent(c: &Consent) -> Value {
    let s = |g: GoogleSignal| match g {
        GoogleSignal::Granted => "GRANTED",
        GoogleSignal::Denied => "DENIED",
    };
    // Only consented events reach a sender, so an unstated ad_user_data is the granted consent.
    json!({"adUserData": s(c.ad_user_data.unwrap_or(GoogleSignal::Granted))})
}

fn dm_consent(c: &Consent) -> Value {
    let s = |g: GoogleSignal| match g {
        GoogleSignal::Granted => "CONSENT_GRANTED",
        GoogleSignal::Denied => "CONSENT_DENIED",
    };
    let mut v = json!({"adUserData": s(c.ad_user_data.unwrap_or(GoogleSignal::Granted))});
    if let Some(p) = c.ad_personalization {
        v["adPersonalization"] = json!(s(p));
    }
    v
}

fn ads_time(t: Timestamp) -> String {
    t.google_ads_datetime(time::UtcOffset::UTC)
}

/// The order id Google deduplicates on: the deal's order id for revenue; for lead stages the
/// event's store key (its event id when derived here; scoped by source when the caller gave
/// one, so two sources' ids never collide at Google), so a replay of the same lead is
/// recognised (ORDER_ID_ALREADY_IN_USE) too.
fn order_key(e: &CanonicalEvent) -> String {
    e.order_id.clone().unwrap_or_else(|| e.key.clone())
}

/// The Google row for one stored event, or why it can never be valid. `order` holds the
/// order's stored events (refunds only).
pub fn build_item(
    e: &CanonicalEvent,
    order: &[CanonicalEvent],
    mapping: &Mapping,
    now: Timestamp,
) -> Result<GoogleItem, ErrorInfo> {
    let Some(g) = &mapping.google else {
        return Err(err(
            ErrorCode::NotMapped,
            "Google is not enabled in the mapping",
        ));
    };
    if e.occurred_at.secs_since(&now) > 60 {
        return Err(err(
            ErrorCode::EventInFuture,
            "occurred_at is in the future",
        ));
    }
    // The attempt in this retry budget: claims that only waited (a refund for its won) and
    // attempts before an operator's redrive do not count, so CONVERSION_NOT_FOUND's few tries
    // are real tries.
    let attempt = e
        .destinations
        .get(&Destination::Google)
        .map_or(1, |s| s.attempts_in_budget().max(1));
    if e.event_name == EventName::Refund {
        return build_adjustment(e, order, g, now, attempt);
    }
    if let Some(c) = &e.correction {
        return build_correction(e, c, order, mapping, g, now, attempt);
    }
    let Some(conv) = g.conversions.get(&e.event_name) else {
        return Err(err(
            ErrorCode::NotMapped,
            format!(
                "{} is not mapped to a Google conversion action",
                e.event_name
            ),
        ));
    };
    let backend = g.backend_for(&conv.customer_id);
    let click = click_id(&e.identity.click);
    if click.is_none() && !conv.allow_without_click_id {
        return Err(err(
            ErrorCode::NoClickId,
            format!(
                "{} needs a gclid, gbraid or wbraid: the action is not set up for enhanced conversions for leads (allow_without_click_id)",
                conv.action
            ),
        ));
    }
    if e.event_name.is_revenue() && (e.value.is_none() || e.currency.is_none()) {
        return Err(err(
            ErrorCode::MissingValue,
            "a revenue conversion needs value and currency",
        ));
    }
    let item = |kind, row, has_user_data| GoogleItem {
        kind,
        row,
        customer_id: conv.customer_id.clone(),
        login_customer_id: g.login_for(&conv.customer_id).map(str::to_string),
        action_id: conv.action_id.clone(),
        has_user_data,
        attempt,
        restated_to_zero: false,
    };
    match backend {
        GoogleBackend::AdsApi => {
            let ids = ads_identifiers(&e.identity.google);
            if click.is_none() && ids.is_empty() {
                return Err(err(
                    ErrorCode::NoIdentifier,
                    "no click id and no hashed email or phone to match on",
                ));
            }
            let has_user_data = !ids.is_empty();
            Ok(item(
                Kind::Click,
                click_row(e, conv, click, ids, e.value),
                has_user_data,
            ))
        }
        GoogleBackend::DataManager => {
            let row = dm_event(e, e, e.value)?;
            let has_user_data = row.get("userData").is_some();
            Ok(item(Kind::DataManager, row, has_user_data))
        }
    }
}

fn click_row(
    e: &CanonicalEvent,
    conv: &GoogleConversion,
    click: Option<(&str, &str)>,
    ids: Vec<Value>,
    value: Option<Money>,
) -> Value {
    let mut row = Map::new();
    if let Some((k, v)) = click {
        row.insert(k.into(), json!(v));
    }
    row.insert("conversionAction".into(), json!(conv.action));
    row.insert("conversionDateTime".into(), json!(ads_time(e.occurred_at)));
    if let Some(v) = value {
        row.insert("conversionValue".into(), json!(v.as_f64()));
    }
    if let Some(c) = &e.currency {
        row.insert("currencyCode".into(), json!(c));
    }
    row.insert("orderId".into(), json!(order_key(e)));
    if !ids.is_empty() {
        row.insert("userIdentifiers".into(), Value::Array(ids));
    }
    row.insert("consent".into(), ads_consent(&e.consent));
    Value::Object(row)
}

/// A Data Manager event for `original` (the conversion) at `value`, with the consent of
/// `current` (the event being delivered: the conversion itself, or a refund restating it).
fn dm_event(
    original: &CanonicalEvent,
    current: &CanonicalEvent,
    value: Option<Money>,
) -> Result<Value, ErrorInfo> {
    let mut ev = Map::new();
    ev.insert("destinationReferences".into(), json!(["d0"]));
    ev.insert("transactionId".into(), json!(order_key(original)));
    ev.insert(
        "eventTimestamp".into(),
        json!(original.occurred_at.canonical()),
    );
    ev.insert("eventSource".into(), json!("OTHER"));
    if let Some(v) = value {
        ev.insert("conversionValue".into(), json!(v.as_f64()));
    }
    if let Some(c) = &original.currency {
        ev.insert("currency".into(), json!(c));
    }
    ev.insert("consent".into(), dm_consent(&current.consent));
    if let Some((k, v)) = click_id(&original.identity.click) {
        ev.insert("adIdentifiers".into(), json!({ k: v }));
    }
    let ids = dm_identifiers(&original.identity.google);
    if !ids.is_empty() {
        ev.insert("userData".into(), json!({"userIdentifiers": ids}));
    }
    if ev.get("adIdentifiers").is_none() && ev.get("userData").is_none() {
        return Err(err(
            ErrorCode::NoIdentifier,
            "no click id and no hashed user data to match on",
        ));
    }
    Ok(Value::Object(ev))
}

/// A refund restates (or retracts) the won conversion of its order. The restatement carries the
/// order's new total given every refund known now, and its time is a pure function of that set
/// (the latest refund's time plus one second per earlier refund), so: a later restatement is
/// always strictly later; a refund arriving out of order still yields the right total; and
/// re-sending the same state is a duplicate Google ignores, never a second adjustment.
fn build_adjustment(
    refund: &CanonicalEvent,
    order: &[CanonicalEvent],
    g: &GoogleMapping,
    now: Timestamp,
    attempt: u32,
) -> Result<GoogleItem, ErrorInfo> {
    if g.refund_policy == GoogleRefundPolicy::Skip {
        return Err(err(
            ErrorCode::NotMapped,
            "refunds are not sent to Google (refund_policy = skip)",
        ));
    }
    let Some(mapped) = g.conversions.get(&EventName::Won) else {
        return Err(err(
            ErrorCode::NotMapped,
            "no Google conversion action for won",
        ));
    };
    let order_id = refund.order_id.as_deref().unwrap_or_default();
    let delivered = |e: &CanonicalEvent| {
        e.destinations
            .get(&Destination::Google)
            .is_some_and(|s| s.status.is_delivered())
    };
    let wons = order
        .iter()
        .filter(|e| e.event_name == EventName::Won && delivered(e));
    // The conversion Google holds for the order: the Ads API keeps the first upload of an
    // order id (a later one is ORDER_ID_ALREADY_IN_USE); Data Manager keeps the last value
    // written for a transactionId. With the order guard there is one delivered won; a stack
    // upgraded from before it may hold two.
    let key = |e: &&CanonicalEvent| (e.occurred_at, e.key.clone());
    let won = match g.backend_for(&mapped.customer_id) {
        GoogleBackend::AdsApi => wons.min_by_key(key),
        GoogleBackend::DataManager => wons.max_by_key(key),
    };
    let Some(won) = won else {
        return Err(err(
            ErrorCode::OriginalNotDelivered,
            format!("no delivered won event for order {order_id}"),
        ));
    };
    // An adjustment cannot move a conversion to another action: it targets the action the won
    // was really uploaded under, whatever the mapping says now, or the one a correction moved
    // it to.
    let sent_under = match where_held(&won.key, order) {
        Held::Moved(action) => GoogleConversion::from_resource(&action),
        Held::Retracted => {
            return Err(err(
                ErrorCode::ConversionRetracted,
                format!(
                    "a correction retracted the conversion of order {order_id} and its upload under the new action was not delivered"
                ),
            ));
        }
        Held::Original => won
            .destinations
            .get(&Destination::Google)
            .and_then(|s| s.delivered_as())
            .and_then(GoogleConversion::from_resource),
    };
    let conv = sent_under.as_ref().unwrap_or(mapped);
    let (Some(won_value), Some(currency)) = (won.value, won.currency.as_deref()) else {
        return Err(err(
            ErrorCode::MissingValue,
            "the won event has no value to adjust",
        ));
    };
    if refund.currency.as_deref() != Some(currency) {
        return Err(err(
            ErrorCode::CurrencyMismatch,
            format!(
                "refund in {} for a conversion in {currency}",
                refund.currency.as_deref().unwrap_or("no currency")
            ),
        ));
    }
    // Refunds that will never be sent (another source's, blocked, invalid) do not count.
    let counts = |e: &CanonicalEvent| {
        e.event_name == EventName::Refund
            && e.currency.as_deref() == Some(currency)
            && counts_as_refund(e)
    };
    let mut refunds: BTreeMap<&str, &CanonicalEvent> = order
        .iter()
        .filter(|e| counts(e))
        .map(|e| (e.event_id.as_str(), e))
        .collect();
    refunds.insert(refund.event_id.as_str(), refund);
    let refunded = refunds
        .values()
        .filter_map(|e| e.value)
        .fold(Money::from_micros(0), Money::saturating_add);
    let total = won_value.saturating_sub(refunded);
    let latest = refunds
        .values()
        .map(|e| e.occurred_at)
        .max()
        .unwrap_or(refund.occurred_at);
    let mut at = latest.plus_secs(refunds.len() as i64 - 1);
    let after_conversion = won.occurred_at.plus_secs(1);
    if at < after_conversion {
        at = after_conversion;
    }
    // Google rejects adjustments dated in the future; only refunds seconds old can get here.
    if at > now {
        at = now;
    }
    let full = total.micros() <= 0;
    let backend = match (g.backend_for(&conv.customer_id), full, g.full_refund_policy) {
        (GoogleBackend::DataManager, true, FullRefundPolicy::RetractViaAdsApi) => {
            GoogleBackend::AdsApi
        }
        (b, _, _) => b,
    };
    let restate = (!full).then_some((total, currency));
    let mut item = ads_adjustment(conv, g, order_id, at, restate, attempt);
    if backend == GoogleBackend::DataManager {
        // Data Manager overwrites the conversion by transaction id: the net value, 0 when
        // refunded in full (it cannot retract).
        let value = if full { Money::from_micros(0) } else { total };
        item.kind = Kind::DataManager;
        item.row = dm_event(won, refund, Some(value))?;
        item.has_user_data = item.row.get("userData").is_some();
        item.restated_to_zero = full;
    }
    Ok(item)
}

/// One step of a correction (see `bridge_core::correction`): the RETRACTION under the action
/// the conversion was delivered as, the upload under the one the mapping names now, or the
/// order's refunds restated there. Each row is a pure function of the stored events, so a
/// replay sends the same row and Google answers it as a duplicate.
fn build_correction(
    e: &CanonicalEvent,
    c: &Correction,
    order: &[CanonicalEvent],
    mapping: &Mapping,
    g: &GoogleMapping,
    now: Timestamp,
    attempt: u32,
) -> Result<GoogleItem, ErrorInfo> {
    let order_id = e.order_id.as_deref().unwrap_or_default();
    match c.step {
        CorrectionStep::Retract => {
            let Some(from) = GoogleConversion::from_resource(&c.from) else {
                return Err(err(
                    ErrorCode::InvalidAction,
                    format!("{} is not a conversion action resource name", c.from),
                ));
            };
            // A retraction is final: it goes only if the conversion can still be adjusted
            // through the steps after it, and the upload that must follow can be built from
            // what is stored now under the mapping this sender runs.
            let age_days = now.secs_since(&e.occurred_at) / 86_400;
            if age_days > bridge_core::correction::MAX_AGE_DAYS {
                return Err(err(
                    ErrorCode::ConversionTooOld,
                    format!(
                        "the conversion is {age_days} days old: too close to Google's 54-day limit on adjustments (CONVERSION_EXPIRED) to move it"
                    ),
                ));
            }
            correction_upload(e, &c.to, order, mapping, g, now).map_err(|x| {
                err(
                    ErrorCode::UploadWouldFail,
                    format!(
                        "not retracted, since the upload that must follow would fail: {}",
                        x.message
                    ),
                )
            })?;
            // Data Manager has no retraction (DM-ADJ): only the Ads API can retract, where the
            // account may use it.
            if g.backend_for(&from.customer_id) == GoogleBackend::DataManager
                && g.full_refund_policy != FullRefundPolicy::RetractViaAdsApi
            {
                return Err(err(
                    ErrorCode::RetractionUnsupported,
                    "the conversion went through the Data Manager API, which cannot retract (full_refund_policy is not retract_via_ads_api)",
                ));
            }
            // When the correction was made: fixed on the event, so a replay sends the same row;
            // after the conversion (ADJUSTMENT_PRECEDES_CONVERSION) and never in the future.
            let mut at = c.made_at.max(e.occurred_at.plus_secs(1));
            if at > now {
                at = now;
            }
            Ok(ads_adjustment(&from, g, order_id, at, None, attempt))
        }
        CorrectionStep::Upload => Ok(GoogleItem {
            attempt,
            ..correction_upload(e, &c.to, order, mapping, g, now)?
        }),
        CorrectionStep::Restate => {
            // Every refund known now, whether or not it was known when the move was planned:
            // the same restatement the latest refund made, now under the new action.
            let latest = order
                .iter()
                .filter(|r| r.event_name == EventName::Refund && counts_as_refund(r))
                .max_by_key(|r| (r.occurred_at, r.key.clone()));
            let item = match latest {
                Some(refund) => build_adjustment(refund, order, g, now, attempt)?,
                None => {
                    // No refund: restated to the won's own value, which changes nothing but
                    // keeps the step's outcome a platform answer.
                    let (Some(value), Some(currency)) = (e.value, e.currency.as_deref()) else {
                        return Err(err(
                            ErrorCode::MissingValue,
                            "the won has no value to restate",
                        ));
                    };
                    let Some(to) = GoogleConversion::from_resource(&c.to) else {
                        return Err(err(
                            ErrorCode::InvalidAction,
                            format!("{} is not a conversion action resource name", c.to),
                        ));
                    };
                    let mut at = e.occurred_at.plus_secs(1);
                    if at > now {
                        at = now;
                    }
                    ads_adjustment(&to, g, order_id, at, Some((value, currency)), attempt)
                }
            };
            if item.action() != c.to {
                return Err(err(
                    ErrorCode::CorrectionNotUploaded,
                    format!(
                        "the restatement would go to {}, not {}: the upload is not delivered",
                        item.action(),
                        c.to
                    ),
                ));
            }
            Ok(item)
        }
    }
}

/// The upload of a correction: the won again, under the action the mapping this sender runs
/// names, which must be the correction's target `action`. Data Manager keeps the last value
/// written for a transactionId, so its upload carries the order's net value; the Ads API keeps
/// the first upload, so it gets the won's value and the restate step brings the refunds over.
fn correction_upload(
    e: &CanonicalEvent,
    action: &str,
    order: &[CanonicalEvent],
    mapping: &Mapping,
    g: &GoogleMapping,
    now: Timestamp,
) -> Result<GoogleItem, ErrorInfo> {
    let mut won = e.clone();
    won.event_name = EventName::Won;
    won.correction = None;
    let to = GoogleConversion::from_resource(action);
    if to.is_some_and(|t| g.backend_for(&t.customer_id) == GoogleBackend::DataManager)
        && let (Some(v), Some(cur)) = (won.value, won.currency.as_deref())
    {
        won.value = Some(v.saturating_sub(refunded(order, cur)));
    }
    let item = build_item(&won, &[], mapping, now)?;
    if item.action() != action {
        return Err(err(
            ErrorCode::MappingChanged,
            format!(
                "the mapping now sends won to {}, not {}: plan the correction again",
                item.action(),
                action
            ),
        ));
    }
    Ok(item)
}

/// A refund that will be (or was) sent: not another source's, not blocked or invalid.
fn counts_as_refund(e: &CanonicalEvent) -> bool {
    e.destinations.get(&Destination::Google).is_some_and(|s| {
        !matches!(
            s.status,
            DeliveryStatus::RejectedNotSystemOfRecord
                | DeliveryStatus::Rejected
                | DeliveryStatus::BlockedConsent
        )
    })
}

/// An Ads API adjustment of `order_id` under `conv` at `at`: a RESTATEMENT to `restate`'s value
/// and currency, else a RETRACTION.
fn ads_adjustment(
    conv: &GoogleConversion,
    g: &GoogleMapping,
    order_id: &str,
    at: Timestamp,
    restate: Option<(Money, &str)>,
    attempt: u32,
) -> GoogleItem {
    let mut row = json!({
        "conversionAction": conv.action,
        "adjustmentType": if restate.is_some() { "RESTATEMENT" } else { "RETRACTION" },
        "adjustmentDateTime": ads_time(at),
        "orderId": order_id,
    });
    if let Some((value, currency)) = restate {
        row["restatementValue"] =
            json!({"adjustedValue": value.as_f64(), "currencyCode": currency});
    }
    GoogleItem {
        kind: Kind::Adjustment,
        row,
        customer_id: conv.customer_id.clone(),
        login_customer_id: g.login_for(&conv.customer_id).map(str::to_string),
        action_id: conv.action_id.clone(),
        has_user_data: false,
        attempt,
        restated_to_zero: false,
    }
}

/// The refunds of the order in `currency` Google has been told about.
fn refunded(order: &[CanonicalEvent], currency: &str) -> Money {
    order
        .iter()
        .filter(|r| r.event_name == EventName::Refund && r.currency.as_deref() == Some(currency))
        .filter(|r| {
            r.destinations
                .get(&Destination::Google)
                .is_some_and(|s| s.status.is_delivered())
        })
        .filter_map(|r| r.value)
        .fold(Money::from_micros(0), Money::saturating_add)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_core::delivery::{DeliveryLogEntry, DestinationState, PairResult};
    use bridge_core::event::{ValidationContext, parse_event_json, validate};
    use bridge_core::hashing::sha256_hex;
    use bridge_core::mapping::GoogleBackend;

    fn now() -> Timestamp {
        Timestamp::parse_rfc3339("2026-11-28T12:00:00Z").unwrap()
    }

    fn event(v: Value, status: Option<DeliveryStatus>) -> CanonicalEvent {
        let ctx = ValidationContext::for_tests(now());
        let mut e = validate(&parse_event_json(&v.to_string()).unwrap(), &ctx).unwrap();
        if let Some(s) = status {
            e.destinations
                .insert(Destination::Google, DestinationState::new(s, now()));
        }
        e
    }

    fn won(identity: Value) -> Value {
        json!({"source": "hubspot", "event_name": "won", "occurred_at": "2026-11-27T10:00:00Z", "entity_type": "opportunity",
               "entity_id": "D-1", "order_id": "O-1", "value": 100, "currency": "EUR", "identity": identity})
    }

    fn refund(value: f64, at: &str) -> Value {
        json!({"source": "hubspot", "event_name": "refund", "occurred_at": at, "entity_type": "order",
               "entity_id": format!("R-{at}"), "order_id": "O-1", "value": value, "currency": "EUR", "identity": {}})
    }

    fn mapping(backend: GoogleBackend) -> Mapping {
        let mut m = Mapping::bundled().unwrap();
        m.google.as_mut().unwrap().backend = backend;
        m
    }

    #[test]
    fn a_rows_attempt_counts_only_real_tries_in_this_budget() {
        let m = mapping(GoogleBackend::AdsApi);
        let mut w = event(
            won(json!({"gclid": "Cj0"})),
            Some(DeliveryStatus::Delivered),
        );
        w.destinations.get_mut(&Destination::Google).unwrap().log =
            vec![DeliveryLogEntry::new(1, PairResult::Delivered, now())];
        let mut r = event(
            refund(10.0, "2026-11-27T12:00:00Z"),
            Some(DeliveryStatus::Sending),
        );
        let state = r.destinations.get_mut(&Destination::Google).unwrap();
        // Six claims: three only waited for the won, two went before a redrive, one is now.
        state.attempts = 6;
        state.attempts_base = 5;
        let item = build_item(&r, &[w.clone()], &m, now()).unwrap();
        assert_eq!(item.attempt, 1);
        let state = r.destinations.get_mut(&Destination::Google).unwrap();
        state.attempts_base = 2;
        assert_eq!(build_item(&r, &[w], &m, now()).unwrap().attempt, 4);
    }

    #[test]
    fn won_with_gclid_becomes_a_click_conversion() {
        let e = event(
            won(
                json!({"email": "John.Doe+x@gmail.com", "phone": "+44 20 7946 0958", "gclid": "Cj0KCQ", "wbraid": "w"}),
            ),
            None,
        );
        let item = build_item(&e, &[], &mapping(GoogleBackend::AdsApi), now()).unwrap();
        assert_eq!(item.kind, Kind::Click);
        assert_eq!(item.group(), "ads-click/1234567890/-");
        assert!(item.has_user_data);
        assert_eq!(
            item.row,
            json!({
                "gclid": "Cj0KCQ",
                "conversionAction": "customers/1234567890/conversionActions/987654321",
                "conversionDateTime": "2026-11-27 10:00:00+00:00",
                "conversionValue": 100.0,
                "currencyCode": "EUR",
                "orderId": "O-1",
                "userIdentifiers": [
                    {"hashedEmail": sha256_hex("johndoe@gmail.com"), "userIdentifierSource": "FIRST_PARTY"},
                    {"hashedPhoneNumber": sha256_hex("+442079460958"), "userIdentifierSource": "FIRST_PARTY"}
                ],
                "consent": {"adUserData": "GRANTED"}
            }),
            "gclid wins over a braid; one identifier per object; Google's email and phone forms"
        );
    }

    #[test]
    fn click_ids_and_enhanced_conversions_for_leads() {
        let m = mapping(GoogleBackend::AdsApi);
        let both = event(won(json!({"gbraid": "g", "wbraid": "w"})), None);
        let row = build_item(&both, &[], &m, now()).unwrap().row;
        assert_eq!(
            (row["gbraid"].as_str(), row.get("wbraid")),
            (Some("g"), None)
        );
        let no_click = event(won(json!({"email": "a@example.com"})), None);
        assert_eq!(
            build_item(&no_click, &[], &m, now()).unwrap_err().code,
            "no_click_id",
            "won's action is not set up for leads without a click id"
        );
        let mut sql = won(json!({"email": "a@example.com"}));
        sql["event_name"] = json!("sql");
        sql["entity_type"] = json!("lead");
        sql["value"] = Value::Null;
        sql["currency"] = Value::Null;
        sql["order_id"] = Value::Null;
        let e = event(sql.clone(), None);
        let item = build_item(&e, &[], &m, now()).unwrap();
        assert_eq!(
            item.row["orderId"],
            e.event_id.as_str(),
            "leads dedupe on event id"
        );
        assert!(item.row.get("gclid").is_none());
        sql["identity"] = json!({});
        assert_eq!(
            build_item(&event(sql, None), &[], &m, now())
                .unwrap_err()
                .code,
            "no_identifier"
        );
        let mut mql = won(json!({"gclid": "x"}));
        mql["event_name"] = json!("mql");
        assert_eq!(
            build_item(&event(mql, None), &[], &m, now())
                .unwrap_err()
                .code,
            "not_mapped"
        );
    }

    #[test]
    fn data_manager_event() {
        let e = event(
            won(
                json!({"email": "a@example.com", "first_name": "Ann", "last_name": "Lee", "zip": "94105", "country": "US", "gclid": "G"}),
            ),
            None,
        );
        let item = build_item(&e, &[], &mapping(GoogleBackend::DataManager), now()).unwrap();
        assert_eq!(item.kind, Kind::DataManager);
        assert_eq!(item.group(), "datamanager/1234567890/-/987654321");
        assert_eq!(item.row["transactionId"], "O-1");
        assert_eq!(item.row["eventTimestamp"], "2026-11-27T10:00:00.000Z");
        assert_eq!(item.row["adIdentifiers"], json!({"gclid": "G"}));
        assert_eq!(
            item.row["consent"],
            json!({"adUserData": "CONSENT_GRANTED"})
        );
        let ids = item.row["userData"]["userIdentifiers"].as_array().unwrap();
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[0], json!({"emailAddress": sha256_hex("a@example.com")}));
        assert_eq!(ids[1]["address"]["givenName"], sha256_hex("ann"));
        assert_eq!(ids[1]["address"]["postalCode"], "94105", "not hashed");
    }

    #[test]
    fn partial_refunds_restate_to_the_new_total_strictly_later() {
        let m = mapping(GoogleBackend::AdsApi);
        let w = event(won(json!({"gclid": "G"})), Some(DeliveryStatus::Delivered));
        let r1 = event(
            refund(20.0, "2026-11-27T12:00:00Z"),
            Some(DeliveryStatus::Pending),
        );
        let r2 = event(
            refund(30.0, "2026-11-27T13:00:00Z"),
            Some(DeliveryStatus::Pending),
        );
        // The first refund alone.
        let a = build_item(&r1, &[w.clone(), r1.clone()], &m, now()).unwrap();
        assert_eq!(a.kind, Kind::Adjustment);
        assert_eq!(
            a.row,
            json!({"conversionAction": "customers/1234567890/conversionActions/987654321", "adjustmentType": "RESTATEMENT",
                   "adjustmentDateTime": "2026-11-27 12:00:00+00:00", "orderId": "O-1",
                   "restatementValue": {"adjustedValue": 80.0, "currencyCode": "EUR"}})
        );
        // Both known: the total counts both, and the time is later than the first's.
        let order = [w.clone(), r1.clone(), r2.clone()];
        let b = build_item(&r2, &order, &m, now()).unwrap();
        assert_eq!(b.row["restatementValue"]["adjustedValue"], 50.0);
        assert_eq!(b.row["adjustmentDateTime"], "2026-11-27 13:00:01+00:00");
        // Out of order: the earlier refund delivered last still states the full picture, and
        // is identical to the later one's restatement (a duplicate, not a regression).
        let c = build_item(&r1, &order, &m, now()).unwrap();
        assert_eq!(c.row, b.row);
        // A refund arriving after the later one was sent moves the time on.
        let r0 = event(
            refund(5.0, "2026-11-27T11:00:00Z"),
            Some(DeliveryStatus::Pending),
        );
        let d = build_item(&r0, &[w, r1, r2, r0.clone()], &m, now()).unwrap();
        assert_eq!(d.row["restatementValue"]["adjustedValue"], 45.0);
        assert_eq!(d.row["adjustmentDateTime"], "2026-11-27 13:00:02+00:00");
    }

    #[test]
    fn full_refunds_retract_or_restate_to_zero() {
        let w = event(won(json!({"gclid": "G"})), Some(DeliveryStatus::Delivered));
        let r = event(
            refund(100.0, "2026-11-27T12:00:00Z"),
            Some(DeliveryStatus::Pending),
        );
        let order = [w.clone(), r.clone()];
        let a = build_item(&r, &order, &mapping(GoogleBackend::AdsApi), now()).unwrap();
        assert_eq!(a.row["adjustmentType"], "RETRACTION");
        assert!(
            a.row.get("restatementValue").is_none(),
            "never on a RETRACTION"
        );
        let dm = mapping(GoogleBackend::DataManager);
        let b = build_item(&r, &order, &dm, now()).unwrap();
        assert_eq!((b.kind, b.restated_to_zero), (Kind::DataManager, true));
        assert_eq!(b.row["conversionValue"], 0.0);
        assert_eq!(b.row["transactionId"], "O-1");
        assert_eq!(
            b.row["adIdentifiers"]["gclid"], "G",
            "the original's identifiers"
        );
        let mut via_ads = dm.clone();
        via_ads.google.as_mut().unwrap().full_refund_policy = FullRefundPolicy::RetractViaAdsApi;
        let c = build_item(&r, &order, &via_ads, now()).unwrap();
        assert_eq!(
            (c.kind, c.row["adjustmentType"].as_str()),
            (Kind::Adjustment, Some("RETRACTION"))
        );
        // Partial on Data Manager: the same transaction restated to the new total.
        let p = event(
            refund(40.0, "2026-11-27T12:00:00Z"),
            Some(DeliveryStatus::Pending),
        );
        let d = build_item(&p, &[w, p.clone()], &dm, now()).unwrap();
        assert_eq!(
            (d.row["conversionValue"].as_f64(), d.restated_to_zero),
            (Some(60.0), false)
        );
        let mut usd = refund(1.0, "2026-11-27T12:00:00Z");
        usd["currency"] = json!("USD");
        let u = event(usd, Some(DeliveryStatus::Pending));
        assert_eq!(
            build_item(&u, &order, &mapping(GoogleBackend::AdsApi), now())
                .unwrap_err()
                .code,
            "currency_mismatch"
        );
    }

    #[test]
    fn per_account_backend() {
        let m = Mapping::load(&format!(
            "{}\n[google.accounts.\"123-456-7890\"]\nbackend = \"data_manager\"\nlogin_customer_id = \"1112223333\"\n",
            bridge_core::mapping::BUNDLED
        ))
        .unwrap();
        let g = m.google.as_ref().unwrap();
        assert_eq!(g.backend_for("1234567890"), GoogleBackend::DataManager);
        assert_eq!(g.login_for("1234567890"), Some("1112223333"));
        assert_eq!(g.backend_for("9999999999"), GoogleBackend::AdsApi);
        let e = event(won(json!({"gclid": "G"})), None);
        let item = build_item(&e, &[], &m, now()).unwrap();
        assert_eq!(item.group(), "datamanager/1234567890/1112223333/987654321");
    }

    #[test]
    fn click_conversions_carry_no_ad_personalization_and_can_drop_user_data() {
        let m = mapping(GoogleBackend::AdsApi);
        let mut v = won(json!({"gclid": "G", "email": "a@example.com"}));
        v["consent"] =
            json!({"status": "granted", "ad_user_data": "granted", "ad_personalization": "denied"});
        let e = event(v, None);
        let mut item = build_item(&e, &[], &m, now()).unwrap();
        assert_eq!(item.row["consent"], json!({"adUserData": "GRANTED"}));
        assert!(item.has_user_data && item.has_click_id());
        item.strip_user_data();
        assert!(item.row.get("userIdentifiers").is_none());
        assert!(!item.has_user_data);
        assert_eq!(item.row["gclid"], "G", "the click stays");
        // Data Manager takes both signals.
        let dm = build_item(&e, &[], &mapping(GoogleBackend::DataManager), now()).unwrap();
        assert_eq!(dm.row["consent"]["adPersonalization"], "CONSENT_DENIED");
    }

    fn delivered_as(e: &mut CanonicalEvent, action: &str) {
        let mut s = DestinationState::new(DeliveryStatus::Delivered, now());
        s.log = vec![DeliveryLogEntry {
            sent_as: Some(action.into()),
            ..DeliveryLogEntry::new(1, PairResult::Delivered, now())
        }];
        e.destinations.insert(Destination::Google, s);
    }

    #[test]
    fn a_correction_retracts_under_the_old_action_uploads_under_the_new_and_restates() {
        const OLD: &str = "customers/1234567890/conversionActions/987654321";
        const NEW: &str = "customers/1234567890/conversionActions/555";
        let mut old = mapping(GoogleBackend::AdsApi);
        let windowed = |m: &mut Mapping, action: &str| {
            let mut c = GoogleConversion::from_resource(action).unwrap();
            c.click_through_lookback_window_days = Some(30);
            m.google
                .as_mut()
                .unwrap()
                .conversions
                .insert(EventName::Won, c);
        };
        windowed(&mut old, OLD);
        let mut new = old.clone();
        new.version = "new".into();
        windowed(&mut new, NEW);
        let mut w = event(won(json!({"gclid": "G"})), None);
        delivered_as(&mut w, OLD);
        let mut r = event(refund(40.0, "2026-11-27T12:00:00Z"), None);
        delivered_as(&mut r, OLD);
        let plan = bridge_core::correction::plan(&[w.clone(), r.clone()], &old, &new, now());
        assert_eq!(plan.corrections.len(), 1, "{plan:?}");
        let steps = bridge_core::correction::correction_events(
            &w,
            &plan.corrections[0],
            &old.version,
            &new.version,
            now().minus_secs(30),
        );
        let order = |steps: &[CanonicalEvent]| {
            let mut o = vec![w.clone(), r.clone()];
            o.extend(steps.iter().cloned());
            o
        };

        let retract = build_item(&steps[0], &order(&steps), &new, now()).unwrap();
        assert_eq!(retract.kind, Kind::Adjustment);
        assert_eq!(
            retract.row,
            json!({"conversionAction": OLD, "adjustmentType": "RETRACTION",
                   "adjustmentDateTime": "2026-11-28 11:59:30+00:00", "orderId": "O-1"})
        );
        let upload = build_item(&steps[1], &order(&steps), &new, now()).unwrap();
        assert_eq!(
            (upload.kind, upload.action()),
            (Kind::Click, NEW.to_string())
        );
        assert_eq!(upload.row["gclid"], "G");
        assert_eq!(upload.row["orderId"], "O-1");
        assert_eq!(
            upload.row["conversionValue"], 100.0,
            "the Ads API keeps the first upload"
        );
        assert_eq!(
            upload.row["conversionDateTime"],
            "2026-11-27 10:00:00+00:00"
        );
        let stale = build_item(&steps[1], &order(&steps), &old, now()).unwrap_err();
        assert_eq!(stale.code, "mapping_changed");
        // A sender still on the old mapping never retracts: the upload could not follow.
        let held_back = build_item(&steps[0], &order(&steps), &old, now()).unwrap_err();
        assert_eq!(held_back.code, "upload_would_fail");
        assert!(held_back.message.contains("mapping"), "{held_back:?}");
        let mut no_click = steps.clone();
        no_click[0].identity.click.gclid = None;
        assert_eq!(
            build_item(&no_click[0], &order(&no_click), &new, now())
                .unwrap_err()
                .code,
            "upload_would_fail",
            "the click id is gone since the plan"
        );

        // Retracted, not uploaded again yet: a refund has no conversion to adjust.
        let mut done = steps.clone();
        delivered_as(&mut done[0], OLD);
        let late = event(
            refund(10.0, "2026-11-27T13:00:00Z"),
            Some(DeliveryStatus::Pending),
        );
        let mut with_late = order(&done);
        with_late.push(late.clone());
        assert_eq!(
            build_item(&late, &with_late, &new, now()).unwrap_err().code,
            "conversion_retracted"
        );
        delivered_as(&mut done[1], NEW);
        let restate = build_item(&done[2], &order(&done), &new, now()).unwrap();
        assert_eq!(restate.action(), NEW);
        assert_eq!(restate.row["adjustmentType"], "RESTATEMENT");
        assert_eq!(restate.row["restatementValue"]["adjustedValue"], 60.0);
        // Without a refund the restatement states the won's own value.
        let alone = |steps: &[CanonicalEvent]| {
            let mut o = vec![w.clone()];
            o.extend(steps.iter().cloned());
            o
        };
        let plain = build_item(&done[2], &alone(&done), &new, now()).unwrap();
        assert_eq!(plain.row["adjustmentType"], "RESTATEMENT");
        assert_eq!(plain.row["restatementValue"]["adjustedValue"], 100.0);
        assert_eq!(plain.row["adjustmentDateTime"], "2026-11-27 10:00:01+00:00");
        // A refund after the move restates the conversion under the new action.
        let mut with_late = order(&done);
        with_late.push(late.clone());
        let adj = build_item(&late, &with_late, &new, now()).unwrap();
        assert_eq!(adj.action(), NEW);
        assert_eq!(adj.row["restatementValue"]["adjustedValue"], 50.0);

        // Data Manager keeps the last value written: the upload carries the net value.
        let mut dm = new.clone();
        let g = dm.google.as_mut().unwrap();
        g.backend = GoogleBackend::DataManager;
        g.full_refund_policy = FullRefundPolicy::RetractViaAdsApi;
        let up = build_item(&steps[1], &order(&steps), &dm, now()).unwrap();
        assert_eq!(
            (up.kind, up.row["conversionValue"].as_f64()),
            (Kind::DataManager, Some(60.0))
        );
        let rt = build_item(&steps[0], &order(&steps), &dm, now()).unwrap();
        assert_eq!(rt.kind, Kind::Adjustment, "retracted through the Ads API");
        dm.google.as_mut().unwrap().full_refund_policy = FullRefundPolicy::RestateToZero;
        assert_eq!(
            build_item(&steps[0], &order(&steps), &dm, now())
                .unwrap_err()
                .code,
            "retraction_unsupported"
        );
    }
}
