//! `customers/{id}:uploadConversionAdjustments` in the fake Google Ads API: lookup per
//! conversion action by order id or gclid + time, the in-request duplicate rules, and the
//! effect of each adjustment (the latest restatement wins, a retraction is final).

use super::ads::{Upload, UserIdentifier, action_id, check_identifiers, frame, partial_reply};
use super::shared::{RowError, ads_datetime, lock, parse, row_error};
use super::{Conversion, ConversionKey, Data, FakeGoogle, OrderKey};
use crate::fakes::Reply;
use bridge_core::timestamp::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashMap;

const UPLOAD: Upload = Upload {
    kind: "conversionAdjustmentUploadError",
    list: "conversion_adjustments",
    too_many: "TOO_MANY_ADJUSTMENTS_IN_REQUEST",
};

// source: G-ERR-ADJ #6 ("a conversion that occurred more than 54 days ago")
const EXPIRY_MS: i64 = 54 * 86_400 * 1000;

/// ConversionAdjustmentTypeEnum; an unknown string fails the whole request (proto3 JSON
/// mapping, derived).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum AdjustmentType {
    Unspecified,
    Unknown,
    Retraction,
    Restatement,
    Enhancement,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GclidDateTimePair {
    gclid: Option<String>,
    conversion_date_time: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RestatementValue {
    adjusted_value: Option<f64>,
    currency_code: Option<String>,
}

/// ConversionAdjustment (source: G-SVC-ADJ).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Adjustment {
    conversion_action: Option<String>,
    adjustment_type: Option<AdjustmentType>,
    adjustment_date_time: Option<String>,
    order_id: Option<String>,
    gclid_date_time_pair: Option<GclidDateTimePair>,
    restatement_value: Option<RestatementValue>,
    user_identifiers: Option<Vec<UserIdentifier>>,
    user_agent: Option<String>,
}

/// UploadConversionAdjustmentsRequest, with `jobId` (source: G-SVC-ADJ, v25 field 5).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct UploadAdjustments {
    conversion_adjustments: Vec<Adjustment>,
    partial_failure: Option<bool>,
    validate_only: Option<bool>,
    job_id: Option<Value>,
}

/// The conversion an adjustment names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Target {
    Order(String),
    /// gclid and the conversion's instant (Unix ms).
    Click(String, i64),
}

fn target(a: &Adjustment) -> Option<Target> {
    if let Some(o) = &a.order_id {
        return Some(Target::Order(o.clone()));
    }
    let p = a.gclid_date_time_pair.as_ref()?;
    let at = ads_datetime(p.conversion_date_time.as_deref()?)?;
    Some(Target::Click(p.gclid.clone()?, at.unix_ms()))
}

#[derive(Default)]
struct Counts {
    /// (action id, target, adjustment instant) of retractions and restatements
    adjustments: HashMap<(String, Target, i64), usize>,
    /// (action id, order id) of enhancements
    enhancements: HashMap<(String, String), usize>,
}

fn counts(d: &Data, rows: &[Adjustment]) -> Counts {
    let mut c = Counts::default();
    for a in rows {
        let (Ok(action), Some(t)) = (
            action_id(d, UPLOAD, a.conversion_action.as_deref()),
            target(a),
        ) else {
            continue;
        };
        if a.adjustment_type == Some(AdjustmentType::Enhancement) {
            if let Target::Order(o) = t {
                *c.enhancements.entry((action, o)).or_insert(0) += 1;
            }
        } else if let Some(at) = a.adjustment_date_time.as_deref().and_then(ads_datetime) {
            *c.adjustments.entry((action, t, at.unix_ms())).or_insert(0) += 1;
        }
    }
    c
}

/// The conversion under (customer, action) that `t` names, in the request's working state.
fn find(
    d: &Data,
    staged: &HashMap<ConversionKey, Conversion>,
    customer: &str,
    action: &str,
    t: &Target,
) -> Option<(ConversionKey, Conversion)> {
    let mut all = staged.iter().chain(
        d.conversions
            .iter()
            .filter(|(k, _)| !staged.contains_key(*k)),
    );
    all.find(|(k, c)| {
        k.customer == customer
            && k.action_id == action
            && match t {
                Target::Order(o) => k.order == OrderKey::Order(o.clone()),
                // source: platform-semantics §3 (G-SVC-ADJ): "If the conversion had an order id,
                // that id must be used. Otherwise use gclidDateTimePair".
                Target::Click(g, at) => {
                    c.order_id.is_none()
                        && c.gclid.as_deref() == Some(g.as_str())
                        && ads_datetime(&c.at).is_some_and(|x| x.unix_ms() == *at)
                }
            }
    })
    .map(|(k, c)| (k.clone(), c.clone()))
}

fn check_adjustment(
    d: &Data,
    staged: &HashMap<ConversionKey, Conversion>,
    a: &Adjustment,
    customer: &str,
    counts: &Counts,
) -> Result<(ConversionKey, Conversion), RowError> {
    let kind = UPLOAD.kind;
    let action = action_id(d, UPLOAD, a.conversion_action.as_deref())?;
    let adjustment = match a.adjustment_type {
        Some(
            t @ (AdjustmentType::Retraction
            | AdjustmentType::Restatement
            | AdjustmentType::Enhancement),
        ) => t,
        // the fake's own code (UNCONFIRMED)
        _ => {
            return row_error(
                "fieldError",
                "REQUIRED",
                Some("adjustment_type"),
                "adjustmentType must be RETRACTION, RESTATEMENT or ENHANCEMENT",
            );
        }
    };
    // source: G-ERR-ADJ #28 ("RETRACTION or RESTATEMENT is only permitted for conversion actions of
    // type SALESFORCE, UPLOAD_CLICK or WEBPAGE ... ENHANCEMENT ... only ... WEBPAGE"); checked
    // once the test registered actions.
    if let Some(t) = d.conversion_actions.get(&action) {
        let allowed: &[&str] = match adjustment {
            AdjustmentType::Enhancement => &["WEBPAGE"],
            _ => &["SALESFORCE", "UPLOAD_CLICKS", "WEBPAGE"],
        };
        if !allowed.contains(&t.as_str()) {
            return row_error(
                kind,
                "INVALID_CONVERSION_ACTION_TYPE",
                Some("conversion_action"),
                "The type of the conversion action specified in the adjustment request isn't supported for uploading adjustments.",
            );
        }
    }
    if adjustment == AdjustmentType::Enhancement {
        // source: G-ERR-ADJ #16 ("Can't use enhanced conversions with the specified conversion
        // action")
        if d.not_enhanceable_actions.contains(&action) {
            return row_error(
                kind,
                "CONVERSION_ACTION_NOT_ELIGIBLE_FOR_ENHANCEMENT",
                Some("conversion_action"),
                "Can't use enhanced conversions with the specified conversion action.",
            );
        }
        // source: G-ERR-ADJ #23 ("Enhanced conversions can't be used for this account because
        // of Google customer data policies")
        if d.ec_prohibited.contains(customer) {
            return row_error(
                kind,
                "CUSTOMER_DATA_POLICY_PROHIBITS_ENHANCEMENT",
                Some("user_identifiers"),
                "Enhanced conversions can't be used for this account because of Google customer data policies.",
            );
        }
    }
    let Some(at_text) = a.adjustment_date_time.as_deref() else {
        // the fake's own code (UNCONFIRMED)
        return row_error(
            "fieldError",
            "REQUIRED",
            Some("adjustment_date_time"),
            "adjustmentDateTime is required",
        );
    };
    // source: G-SVC-ADJ (same format as conversion_date_time); the code is the fake's own (UNCONFIRMED)
    let Some(at) = ads_datetime(at_text) else {
        return row_error(
            "dateError",
            "INVALID_FIELD_FORMAT",
            Some("adjustment_date_time"),
            "adjustmentDateTime must be yyyy-mm-dd hh:mm:ss+hh:mm",
        );
    };
    // source: G-ERR-ADJ #20 ("Cannot set both gclid_date_time_pair and order_id"); enhancements may
    // carry both (google-ads-api.md "not both, except for ENHANCEMENT").
    if a.order_id.is_some()
        && a.gclid_date_time_pair.is_some()
        && adjustment != AdjustmentType::Enhancement
    {
        return row_error(
            kind,
            "GCLID_DATE_TIME_PAIR_AND_ORDER_ID_BOTH_SET",
            Some("order_id"),
            "Cannot set both gclid_date_time_pair and order_id.",
        );
    }
    let ids = a.user_identifiers.as_deref().unwrap_or(&[]);
    check_identifiers(UPLOAD, ids, false)?;
    let _ = &a.user_agent;
    // source: G-ERR-ADJ #15; web-troubleshooting ("The customer data terms and conditions have not
    // been accepted for the customer_id of the request")
    if adjustment == AdjustmentType::Enhancement && d.terms.get(customer) == Some(&false) {
        return row_error(
            kind,
            "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS",
            Some("user_identifiers"),
            "Make sure you agree to the customer data processing terms in conversion settings and try again.",
        );
    }
    let Some(t) = target(a) else {
        // Opteo #246 ("Too short., at conversion_adjustments[0].order_id"); the code is the fake's own.
        return row_error(
            "fieldError",
            "REQUIRED",
            Some("order_id"),
            "orderId or a complete gclidDateTimePair is required",
        );
    };
    match (&adjustment, &t) {
        (AdjustmentType::Enhancement, Target::Order(o)) => {
            // source: G-ERR-ADJ #22 ("Multiple enhancements have the same conversion action and Order ID")
            if counts
                .enhancements
                .get(&(action.clone(), o.clone()))
                .copied()
                .unwrap_or(0)
                > 1
            {
                return row_error(
                    kind,
                    "DUPLICATE_ENHANCEMENT_IN_REQUEST",
                    Some("order_id"),
                    "Multiple enhancements have the same conversion action and Order ID.",
                );
            }
        }
        (AdjustmentType::Enhancement, Target::Click(..)) => {
            // source: google-ads-api.md ("ENHANCEMENT, which needs orderId"); the code is the fake's own.
            return row_error(
                "fieldError",
                "REQUIRED",
                Some("order_id"),
                "an enhancement needs orderId",
            );
        }
        _ => {
            // source: G-ERR-ADJ #14 ("a duplicate conversion adjustment with same
            // adjustment_date_time"). Every such row fails (UNCONFIRMED; same wording as #16).
            if counts
                .adjustments
                .get(&(action.clone(), t.clone(), at.unix_ms()))
                .copied()
                .unwrap_or(0)
                > 1
            {
                return row_error(
                    kind,
                    "DUPLICATE_ADJUSTMENT_IN_REQUEST",
                    Some("adjustment_date_time"),
                    "Imported adjustment has a duplicate conversion adjustment with same adjustment_date_time.",
                );
            }
        }
    }
    // The test's hook: an adjustment Google refuses for good.
    if a.order_id.as_ref().is_some_and(|o| d.poison.contains(o)) {
        return row_error(
            kind,
            "TOO_MANY_ADJUSTMENTS",
            None,
            "The conversion has already been adjusted the maximum number of times (poisoned by the test).",
        );
    }
    // source: G-ERR-ADJ #5 ("The conversion for this conversion action and conversion identifier
    // can't be found"): the lookup is per conversion action.
    let Some((key, mut conv)) = find(d, staged, customer, &action, &t) else {
        return row_error(
            kind,
            "CONVERSION_NOT_FOUND",
            Some("order_id"),
            "The conversion for this conversion action and conversion identifier can't be found.",
        );
    };
    let conv_at = ads_datetime(&conv.at).unwrap_or(at);
    // source: G-ERR-ADJ #6
    if d.controls.clock.now_ms() - conv_at.unix_ms() > EXPIRY_MS {
        return row_error(
            kind,
            "CONVERSION_EXPIRED",
            None,
            "Adjustment can't be made to a conversion that occurred more than 54 days ago.",
        );
    }
    // source: G-ERR-ADJ #7 ("an adjustment_date_time that occurred before the associated conversion")
    if at.unix_ms() < conv_at.unix_ms() {
        return row_error(
            kind,
            "ADJUSTMENT_PRECEDES_CONVERSION",
            Some("adjustment_date_time"),
            "Adjustment has an adjustment_date_time that occurred before the associated conversion.",
        );
    }
    // source: G-ERR-ADJ #4 ("The conversion was already retracted. This adjustment was not processed.")
    if conv.retracted {
        return row_error(
            kind,
            "CONVERSION_ALREADY_RETRACTED",
            None,
            "The conversion was already retracted. This adjustment was not processed.",
        );
    }
    match adjustment {
        AdjustmentType::Retraction => {
            // source: G-SVC-ADJ restatement_value ("An error will be returned if provided for a
            // retraction"); the code is the fake's own (UNCONFIRMED).
            if a.restatement_value.is_some() {
                return row_error(
                    "fieldError",
                    "VALUE_MUST_BE_UNSET",
                    Some("restatement_value"),
                    "restatementValue must not be set on a RETRACTION",
                );
            }
            // source: G-ENUM-ADJ (RETRACTION: total value and count both zero), final.
            conv.retracted = true;
        }
        AdjustmentType::Restatement => restate(&mut conv, a, at_text, at)?,
        _ => {
            // source: G-ERR-ADJ #21 ("Conversion already has enhancements with the same Order ID
            // and conversion action")
            if conv.enhanced {
                return row_error(
                    kind,
                    "CONVERSION_ALREADY_ENHANCED",
                    Some("order_id"),
                    "Conversion already has enhancements with the same Order ID and conversion action.",
                );
            }
            conv.enhanced = true;
        }
    }
    Ok((key, conv))
}

/// A restatement: the latest adjustmentDateTime wins (source: G-SVC-ADJ NOTE "it must have a
/// new, more recent, adjustment occurrence time. Otherwise, it will be treated as a duplicate").
fn restate(
    conv: &mut Conversion,
    a: &Adjustment,
    at_text: &str,
    at: Timestamp,
) -> Result<(), RowError> {
    let kind = UPLOAD.kind;
    // source: G-SVC-ADJ restatement_value ("Required for restatements"); the code is the fake's own.
    let Some(v) = a.restatement_value.as_ref().and_then(|r| r.adjusted_value) else {
        return row_error(
            "fieldError",
            "REQUIRED",
            Some("restatement_value"),
            "RESTATEMENT needs restatementValue.adjustedValue",
        );
    };
    if let Some(prev) = conv.adjusted_at.as_deref().and_then(ads_datetime) {
        // source: G-ERR-ADJ #13
        if at.unix_ms() == prev.unix_ms() {
            return row_error(
                kind,
                "RESTATEMENT_ALREADY_EXISTS",
                Some("adjustment_date_time"),
                "The conversion has prior a restatement with the same adjustment_date_time.",
            );
        }
        // source: G-ERR-ADJ #8 (the newer value stays)
        if at.unix_ms() < prev.unix_ms() {
            return row_error(
                kind,
                "MORE_RECENT_RESTATEMENT_FOUND",
                Some("adjustment_date_time"),
                "More recent adjustment adjustment_date_time has already been reported for the associated conversion.",
            );
        }
    }
    // source: G-ENUM-ADJ (RESTATEMENT changes the value, never the count); adjustedValue is the
    // new total (G-SVC-ADJ).
    conv.value = v;
    // the fake's own rule (UNCONFIRMED: a restatement in another currency than the conversion's):
    // the restated value is counted in the restatement's currency.
    if let Some(c) = a
        .restatement_value
        .as_ref()
        .and_then(|r| r.currency_code.clone())
    {
        conv.currency = c;
    }
    conv.restatements += 1;
    conv.adjusted_at = Some(at_text.to_string());
    Ok(())
}

pub(super) fn upload(s: &FakeGoogle, customer: &str, body: &[u8]) -> Reply {
    let req: UploadAdjustments = match parse(body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let mut d = lock(&s.data);
    let rows = &req.conversion_adjustments;
    let job = match frame(
        &mut d,
        UPLOAD,
        rows.len(),
        req.partial_failure,
        req.job_id.as_ref(),
    ) {
        Ok(j) => j,
        Err(r) => return r,
    };
    let validate_only = req.validate_only == Some(true);
    let counts = counts(&d, rows);
    // Rows apply in order: a later row sees what an earlier one changed.
    let mut staged: HashMap<ConversionKey, Conversion> = HashMap::new();
    let (mut results, mut errors) = (Vec::new(), Vec::new());
    for (i, a) in rows.iter().enumerate() {
        match check_adjustment(&d, &staged, a, customer, &counts) {
            Ok((key, conv)) => {
                let mut r = json!({"conversionAction": conv.action, "adjustmentType": a.adjustment_type, "adjustmentDateTime": a.adjustment_date_time});
                match &a.order_id {
                    Some(o) => r["orderId"] = json!(o),
                    None => {
                        r["gclidDateTimePair"] =
                            json!({"gclid": conv.gclid, "conversionDateTime": conv.at})
                    }
                }
                results.push(r);
                staged.insert(key, conv);
            }
            Err(e) => {
                results.push(json!({}));
                errors.push((i, e));
            }
        }
    }
    d.requests.push((
        "uploadConversionAdjustments".into(),
        serde_json::from_slice(body).unwrap_or(Value::Null),
    ));
    // source: G-SVC-ADJ (validate_only: only errors are returned, nothing is executed)
    if validate_only {
        results = Vec::new();
    } else {
        d.conversions.extend(staged);
    }
    partial_reply(UPLOAD, results, errors, job)
}
