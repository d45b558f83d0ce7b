//! `customers/{id}:uploadClickConversions` in the fake Google Ads API: the rules of one click
//! conversion row, the in-request duplicate rules (every row of a repeated order fails), and
//! the import keyed by (customer, conversion action, order id), first conversion kept.

use super::ads::{Upload, UserIdentifier, action_id, check_identifiers, frame, partial_reply};
use super::shared::{RowError, ads_datetime, ads_request_error, lock, parse, row_error};
use super::{Conversion, ConversionKey, Data, FakeGoogle, OrderKey};
use crate::fakes::Reply;
use axum::http::StatusCode;
use bridge_core::timestamp::Timestamp;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;

const UPLOAD: Upload = Upload {
    kind: "conversionUploadError",
    list: "conversions",
    too_many: "TOO_MANY_CONVERSIONS_IN_REQUEST",
};

// source: G-ERR-UP #44 ("occurred less than 6 hours ago")
const TOO_RECENT_MS: i64 = 6 * 3600 * 1000;
const DAY_MS: i64 = 86_400 * 1000;

/// ConsentStatusEnum; an unknown string fails the whole request (proto3 JSON mapping, derived).
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum ConsentStatus {
    Unspecified,
    Unknown,
    Granted,
    Denied,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Consent {
    ad_user_data: Option<ConsentStatus>,
    ad_personalization: Option<ConsentStatus>,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum ConversionEnvironment {
    Unspecified,
    Unknown,
    App,
    Web,
}

/// ClickConversion (source: G-SVC-UP, google-ads-api.md).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ClickConversion {
    gclid: Option<String>,
    gbraid: Option<String>,
    wbraid: Option<String>,
    conversion_action: Option<String>,
    conversion_date_time: Option<String>,
    conversion_value: Option<f64>,
    currency_code: Option<String>,
    order_id: Option<String>,
    user_identifiers: Option<Vec<UserIdentifier>>,
    consent: Option<Consent>,
    conversion_environment: Option<ConversionEnvironment>,
    custom_variables: Option<Value>,
    cart_data: Option<Value>,
    external_attribution_data: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct UploadClicks {
    conversions: Vec<ClickConversion>,
    partial_failure: Option<bool>,
    validate_only: Option<bool>,
    job_id: Option<Value>,
}

impl ClickConversion {
    fn click(&self) -> Option<&str> {
        self.gclid
            .as_deref()
            .or(self.gbraid.as_deref())
            .or(self.wbraid.as_deref())
    }
}

/// How often each key occurs in the request, for the in-request duplicate rules.
#[derive(Default)]
struct Counts {
    /// (action id, order id)
    orders: HashMap<(String, String), usize>,
    /// (action id, click id, conversion instant) of rows without an order id
    clicks: HashMap<(String, String, i64), usize>,
}

fn counts(d: &Data, rows: &[ClickConversion]) -> Counts {
    let mut c = Counts::default();
    for r in rows {
        let Ok(action) = action_id(d, UPLOAD, r.conversion_action.as_deref()) else {
            continue;
        };
        match (
            &r.order_id,
            r.click(),
            r.conversion_date_time.as_deref().and_then(ads_datetime),
        ) {
            (Some(o), _, _) => *c.orders.entry((action, o.clone())).or_insert(0) += 1,
            (None, Some(click), Some(at)) => {
                *c.clicks
                    .entry((action, click.to_string(), at.unix_ms()))
                    .or_insert(0) += 1
            }
            _ => {}
        }
    }
    c
}

fn check_click(
    d: &Data,
    c: &ClickConversion,
    customer: &str,
    counts: &Counts,
) -> Result<Conversion, RowError> {
    let kind = UPLOAD.kind;
    let action_id = action_id(d, UPLOAD, c.conversion_action.as_deref())?;
    // source: G-ERR-UP #54 ("isn't set up for uploading conversions"): click uploads need an
    // UPLOAD_CLICKS action (only checked once the test registered actions).
    if d.conversion_actions
        .get(&action_id)
        .is_some_and(|t| t != "UPLOAD_CLICKS")
    {
        return row_error(
            kind,
            "INVALID_CONVERSION_ACTION_TYPE",
            Some("conversion_action"),
            "The conversion action specified in the upload request isn't set up for uploading conversions.",
        );
    }
    let Some(at_text) = c.conversion_date_time.as_deref() else {
        // the fake's own code (UNCONFIRMED)
        return row_error(
            "fieldError",
            "REQUIRED",
            Some("conversion_date_time"),
            "conversionDateTime is required",
        );
    };
    // source: G-SVC-UP (yyyy-mm-dd hh:mm:ss+|-hh:mm); the code is the fake's own (UNCONFIRMED)
    let Some(at) = ads_datetime(at_text) else {
        return row_error(
            "dateError",
            "INVALID_FIELD_FORMAT",
            Some("conversion_date_time"),
            "conversionDateTime must be yyyy-mm-dd hh:mm:ss+hh:mm",
        );
    };
    // source: G-HC-TXN (order id at most 64 characters); the code is the fake's own (UNCONFIRMED)
    if c.order_id.as_ref().is_some_and(|o| o.chars().count() > 64) {
        return row_error(
            "stringLengthError",
            "TOO_LONG",
            Some("order_id"),
            "orderId is longer than 64 characters",
        );
    }
    // source: G-ERR-UP #38
    if c.gbraid.is_some() && c.wbraid.is_some() {
        return row_error(
            kind,
            "GBRAID_WBRAID_BOTH_SET",
            Some("gbraid"),
            "Can't use both gbraid and wbraid parameters.",
        );
    }
    // the fake's own rule (UNCONFIRMED: one click id per conversion)
    if c.gclid.is_some() && (c.gbraid.is_some() || c.wbraid.is_some()) {
        return row_error(
            "fieldError",
            "VALUE_MUST_BE_UNSET",
            Some("gclid"),
            "gclid is set together with a braid",
        );
    }
    // source: G-ERR-UP #46 ("Conversion actions that use one-per-click counting can't be used
    // with gbraid or wbraid parameters")
    if (c.gbraid.is_some() || c.wbraid.is_some()) && d.one_per_click_actions.contains(&action_id) {
        return row_error(
            kind,
            "ONE_PER_CLICK_CONVERSION_ACTION_NOT_PERMITTED_WITH_BRAID",
            Some(if c.gbraid.is_some() {
                "gbraid"
            } else {
                "wbraid"
            }),
            "Conversion actions that use one-per-click counting can't be used with gbraid or wbraid parameters.",
        );
    }
    if let Some((owner, reachable)) = c.gclid.as_ref().and_then(|g| d.click_accounts.get(g))
        && owner != customer
    {
        // source: G-ERR-UP #8 UNAUTHORIZED_CUSTOMER ("The click ID or call is associated
        // with an Ads account you don't have access to") and #30 INVALID_CUSTOMER_FOR_CLICK
        // ("The click from the imported event is associated with a different Google Ads
        // account. Make sure you're importing to the correct account").
        return if *reachable {
            row_error(
                kind,
                "INVALID_CUSTOMER_FOR_CLICK",
                Some("gclid"),
                "The click from the imported event is associated with a different Google Ads account.",
            )
        } else {
            row_error(
                kind,
                "UNAUTHORIZED_CUSTOMER",
                Some("gclid"),
                "The click ID or call is associated with an Ads account you don't have access to.",
            )
        };
    }
    let ids = c.user_identifiers.as_deref().unwrap_or(&[]);
    check_identifiers(UPLOAD, ids, true)?;
    // source: G-ERR-UP #47 ("Enhanced conversions can't be used for this account because of
    // Google customer data policies"): a row that carries user identifiers is an enhanced one.
    if !ids.is_empty() && d.ec_prohibited.contains(customer) {
        return row_error(
            kind,
            "CUSTOMER_DATA_POLICY_PROHIBITS_ENHANCED_CONVERSIONS",
            Some("user_identifiers"),
            "Enhanced conversions can't be used for this account because of Google customer data policies.",
        );
    }
    // the fake's own rule (UNCONFIRMED: what Google answers for a row without any identifier)
    if c.click().is_none() && ids.is_empty() {
        return row_error(
            "fieldError",
            "REQUIRED",
            Some("gclid"),
            "a click id or user identifiers are required",
        );
    }
    let _ = (
        &c.custom_variables,
        &c.cart_data,
        &c.external_attribution_data,
        c.conversion_environment,
    );
    if let Some(consent) = &c.consent {
        let _ = consent.ad_user_data;
        // source: G-CONSENT (ad_personalization "can only be set for OfflineUserDataJobService and
        // UserDataService"). Google's reaction on a ClickConversion is UNCONFIRMED and the code is
        // the fake's own: strict mode only.
        if d.controls.strict && consent.ad_personalization.is_some() {
            return row_error(
                "fieldError",
                "VALUE_MUST_BE_UNSET",
                Some("consent"),
                "consent.ad_personalization can only be set for OfflineUserDataJobService and UserDataService",
            );
        }
    }
    // source: G-ERR-UP #48. Only rows carrying user identifiers: that click-only rows still import
    // is inferred (UNCONFIRMED, research google-ads.md Q5).
    if !ids.is_empty() && d.terms.get(customer) == Some(&false) {
        return row_error(
            kind,
            "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS",
            Some("user_identifiers"),
            "Make sure you agree to the customer data processing terms in conversion settings and try again.",
        );
    }
    // source: G-ERR-UP #50 CUSTOMER_NOT_ENABLED_ENHANCED_CONVERSIONS_FOR_LEADS ("Make sure
    // you've turned on enhanced conversions for leads in conversion settings ... querying
    // conversion_tracking_setting.enhanced_conversions_for_leads_enabled on Customer"). A row
    // matched on user identifiers without a click id is an enhanced conversion for leads.
    let has_click = c.gclid.is_some() || c.gbraid.is_some() || c.wbraid.is_some();
    if !has_click && !ids.is_empty() && d.ec_for_leads_disabled.contains(customer) {
        return row_error(
            kind,
            "CUSTOMER_NOT_ENABLED_ENHANCED_CONVERSIONS_FOR_LEADS",
            Some("user_identifiers"),
            "Make sure you've turned on enhanced conversions for leads in conversion settings and try again.",
        );
    }
    let order = c.order_id.clone();
    // The test's hook: a row Google refuses for good.
    if order.as_ref().is_some_and(|o| d.poison.contains(o)) {
        return row_error(
            kind,
            "CONVERSION_PRECEDES_EVENT",
            Some("conversion_date_time"),
            "The imported event has a conversion_date_time that precedes the click (poisoned by the test).",
        );
    }
    if let Some(g) = &c.gclid {
        // source: G-ERR-UP #45 EVENT_NOT_FOUND ("could not be attributed to a click"); #33
        // CLICK_NOT_FOUND is for email/phone that matched no click.
        if d.unknown_clicks.contains(g) {
            return row_error(
                kind,
                "EVENT_NOT_FOUND",
                Some("gclid"),
                "The imported event could not be attributed to a click.",
            );
        }
        if let Some(click) = d.clicks.get(g) {
            check_click_time(d, click, at)?;
        }
    }
    // The test's hook beside `clicks`: this order's click is under 6 hours old.
    if order.as_ref().is_some_and(|o| d.too_recent.contains(o)) {
        return row_error(
            kind,
            "TOO_RECENT_EVENT",
            Some("gclid"),
            "The click associated with the given identifier occurred less than 6 hours ago.",
        );
    }
    match &order {
        Some(o) => {
            // source: G-ERR-UP #16 ("multiple conversions with the same order ID and were not
            // processed"): every row of the repeated order fails. Per action follows G-SVC-UP
            // order_id; the in-request scope is UNCONFIRMED.
            if counts
                .orders
                .get(&(action_id.clone(), o.clone()))
                .copied()
                .unwrap_or(0)
                > 1
            {
                return row_error(
                    kind,
                    "DUPLICATE_ORDER_ID",
                    Some("order_id"),
                    "Imported events include multiple conversions with the same order ID and were not processed.",
                );
            }
            // source: G-ERR-UP #15, G-SVC-UP order_id ("one conversion per conversion action");
            // the original is kept.
            let key = ConversionKey {
                customer: customer.to_string(),
                action_id: action_id.clone(),
                order: OrderKey::Order(o.clone()),
            };
            if d.conversions.contains_key(&key) {
                return row_error(
                    kind,
                    "ORDER_ID_ALREADY_IN_USE",
                    Some("order_id"),
                    "The imported event includes an order ID that was previously recorded, so the event was not processed.",
                );
            }
        }
        None => {
            if let Some(click) = c.click() {
                let k = (action_id.clone(), click.to_string(), at.unix_ms());
                // source: G-ERR-UP #25; the action scope is UNCONFIRMED (per action here)
                if counts.clicks.get(&k).copied().unwrap_or(0) > 1 {
                    return row_error(
                        kind,
                        "DUPLICATE_CLICK_CONVERSION_IN_REQUEST",
                        Some("conversion_date_time"),
                        "Multiple events have the same click and conversion_date_time.",
                    );
                }
                // source: G-ERR-UP #23 ("the same click and conversion_date_time as an existing
                // conversion. Use a unique conversion_date_time or order ID"): rows with an order
                // id are told apart by it. The action scope is UNCONFIRMED (per action here).
                let exists = d.conversions.iter().any(|(key, x)| {
                    key.customer == customer
                        && key.action_id == action_id
                        && matches!(key.order, OrderKey::Unordered(_))
                        && [&x.gclid, &x.gbraid, &x.wbraid]
                            .into_iter()
                            .flatten()
                            .any(|g| g == click)
                        && ads_datetime(&x.at).is_some_and(|t| t.unix_ms() == at.unix_ms())
                });
                if exists {
                    return row_error(
                        kind,
                        "CLICK_CONVERSION_ALREADY_EXISTS",
                        Some("conversion_date_time"),
                        "The imported event has the same click and conversion_date_time as an existing conversion.",
                    );
                }
            }
        }
    }
    Ok(Conversion {
        customer: customer.to_string(),
        action: c.conversion_action.clone().unwrap_or_default(),
        action_id,
        order_id: order,
        gclid: c.gclid.clone(),
        gbraid: c.gbraid.clone(),
        wbraid: c.wbraid.clone(),
        value: c.conversion_value.unwrap_or(0.0),
        // source: G-SVC-UP (without a currency the action's, then the account's, applies;
        // RestatementValue comment); counted under `default_currency`.
        currency: c.currency_code.clone().unwrap_or_default(),
        at: at_text.to_string(),
        retracted: false,
        adjusted_at: None,
        restatements: 0,
        enhanced: false,
    })
}

/// The rules that need the click's time.
fn check_click_time(d: &Data, click: &Timestamp, at: Timestamp) -> Result<(), RowError> {
    let kind = UPLOAD.kind;
    // source: G-ERR-UP #42 ("has a conversion_date_time that precedes the click")
    if at.unix_ms() < click.unix_ms() {
        return row_error(
            kind,
            "CONVERSION_PRECEDES_EVENT",
            Some("conversion_date_time"),
            "The imported event has a conversion_date_time that precedes the click.",
        );
    }
    // source: G-ERR-UP #44 ("The click ... occurred less than 6 hours ago. Retry after 6 hours")
    if d.controls.clock.now_ms() - click.unix_ms() < TOO_RECENT_MS {
        return row_error(
            kind,
            "TOO_RECENT_EVENT",
            Some("gclid"),
            "The click associated with the given identifier occurred less than 6 hours ago.",
        );
    }
    // source: G-ERR-UP #43 ("its click occurred before this conversion's click-through window")
    if at.unix_ms() - click.unix_ms() > d.click_through_days * DAY_MS {
        return row_error(
            kind,
            "EXPIRED_EVENT",
            Some("gclid"),
            "The imported event can't be recorded because its click occurred before this conversion's click-through window.",
        );
    }
    Ok(())
}

pub(super) fn upload(s: &FakeGoogle, customer: &str, body: &[u8]) -> Reply {
    let req: UploadClicks = match parse(body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let mut d = lock(&s.data);
    let job = match frame(
        &mut d,
        UPLOAD,
        req.conversions.len(),
        req.partial_failure,
        req.job_id.as_ref(),
    ) {
        Ok(j) => j,
        Err(r) => return r,
    };
    // source: G-BLOG-OCI ("new adopters will receive the error CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE
    // when attempting to use the ConversionUploadService.UploadClickConversions method"); the
    // enum is NotAllowlistedError (research google-ads.md Q2). Whole request or per row is
    // UNCONFIRMED (treg #150 saw it on a one-row request): the whole request here.
    if d.not_allowlisted.contains(customer) {
        return ads_request_error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            &RowError {
                kind: "notAllowlistedError",
                code: "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE",
                message: "Customer is not allowlisted for accessing this feature.".into(),
                field: None,
            },
        );
    }
    let validate_only = req.validate_only == Some(true);
    let counts = counts(&d, &req.conversions);
    let (mut results, mut errors, mut imported) = (Vec::new(), Vec::new(), Vec::new());
    for (i, c) in req.conversions.iter().enumerate() {
        match check_click(&d, c, customer, &counts) {
            Ok(conv) => {
                let mut r = json!({"conversionAction": conv.action, "conversionDateTime": conv.at});
                for (k, v) in [
                    ("gclid", &c.gclid),
                    ("gbraid", &c.gbraid),
                    ("wbraid", &c.wbraid),
                ] {
                    if let Some(v) = v {
                        r[k] = json!(v);
                    }
                }
                results.push(r);
                imported.push(conv);
            }
            Err(e) => {
                results.push(json!({}));
                errors.push((i, e));
            }
        }
    }
    d.requests.push((
        "uploadClickConversions".into(),
        serde_json::from_slice(body).unwrap_or(Value::Null),
    ));
    // source: G-SVC-UP (validate_only: "the request is validated but not executed. Only errors are
    // returned, not results")
    if validate_only {
        results = Vec::new();
    } else {
        for conv in imported {
            let order = match &conv.order_id {
                Some(o) => OrderKey::Order(o.clone()),
                None => {
                    d.next_unordered += 1;
                    OrderKey::Unordered(d.next_unordered)
                }
            };
            let key = ConversionKey {
                customer: customer.to_string(),
                action_id: conv.action_id.clone(),
                order,
            };
            d.conversions.insert(key, conv);
        }
    }
    partial_reply(UPLOAD, results, errors, job)
}
