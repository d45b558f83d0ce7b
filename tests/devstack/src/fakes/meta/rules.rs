//! The per-event rules of the fake Conversions API: what makes Meta refuse a whole request
//! because of one event. Each rule names its source; rules whose reaction Meta does not
//! document run only in strict mode and say so.

use serde_json::{Map, Value};
use std::collections::HashSet;

const DAY: i64 = 86_400;

/// Why Meta refuses a request: a Graph API error code, its subcode and message.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Refusal {
    pub code: i64,
    pub subcode: Option<i64>,
    pub message: String,
}

fn invalid<T>(m: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal {
        code: 100,
        subcode: None,
        message: m.into(),
    })
}

fn invalid_sub<T>(subcode: i64, m: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal {
        code: 100,
        subcode: Some(subcode),
        message: m.into(),
    })
}

/// The values of the SDK's `ActionSource` enum, matched as it spells them (the bridge's own list
/// is not consulted: the fake is a witness). source: M-EVENT (action_source values); SDK
/// facebook_business/adobjects/serverside/action_source.py
fn is_action_source(s: &str) -> bool {
    matches!(
        s,
        "email"
            | "website"
            | "app"
            | "phone_call"
            | "chat"
            | "physical_store"
            | "system_generated"
            | "business_messaging"
            | "other"
    )
}

// source: M-CIP ("You must provide at least one of the following user_data parameters")
const USER_DATA_KEYS: &[&str] = &[
    "em",
    "ph",
    "fn",
    "ln",
    "ge",
    "db",
    "ct",
    "st",
    "zp",
    "country",
    "external_id",
    "client_ip_address",
    "client_user_agent",
    "fbc",
    "fbp",
    "subscription_id",
    "fb_login_id",
    "lead_id",
    "anon_id",
    "madid",
    "page_id",
    "page_scoped_user_id",
    "ctwa_clid",
    "ig_account_id",
    "ig_sid",
];

/// The keys that match on their own (M-CIP): contact ids, the advertiser's own id, Meta's click
/// and browser ids, and the app and messaging ids.
const STRONG_USER_DATA_KEYS: &[&str] = &[
    "em",
    "ph",
    "external_id",
    "fbc",
    "fbp",
    "lead_id",
    "subscription_id",
    "fb_login_id",
    "anon_id",
    "madid",
    "page_scoped_user_id",
    "ctwa_clid",
    "ig_sid",
];

// source: M-CIP ("hashing required" for these; arrays allowed), SDK serverside/user_data.py
const HASH_REQUIRED: &[&str] = &[
    "em", "ph", "fn", "ln", "ge", "db", "ct", "st", "zp", "country",
];

/// What the rules need besides the event.
pub(super) struct Context<'a> {
    /// The fake's now, in Unix seconds.
    pub now: i64,
    pub strict: bool,
    /// Strict mode also requires lead_id on Conversion Leads events.
    pub require_lead_id: bool,
    /// Event ids the test made invalid.
    pub poison: &'a HashSet<String>,
}

fn is_hash(v: &Value) -> bool {
    let one = |s: &Value| s.as_str().is_some_and(crate::fakes::is_sha256_lower_hex);
    match v {
        Value::Array(a) => !a.is_empty() && a.iter().all(one),
        other => one(other),
    }
}

fn present(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => true,
    }
}

/// `fb.<subdomainIndex>.<creationTime in ms>.<id>`.
fn fb_cookie(v: &Value) -> bool {
    let Some(s) = v.as_str() else { return false };
    let parts: Vec<&str> = s.splitn(4, '.').collect();
    parts.len() == 4
        && parts[0] == "fb"
        && !parts[1].is_empty()
        && parts[1].bytes().all(|b| b.is_ascii_digit())
        && parts[2].len() == 13
        && parts[2].bytes().all(|b| b.is_ascii_digit())
        && !parts[3].is_empty()
}

/// An event's id as Meta keys deduplication on it: absent or empty means none.
pub(super) fn event_id(e: &Value) -> Option<String> {
    match &e["event_id"] {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Checks one event of `data`; the first failure refuses the whole request.
// source: M-USE §Batch Requests, M-EVENT ("we return an error for the entire request and process no events")
pub(super) fn check_event(e: &Value, cx: &Context) -> Result<(), Refusal> {
    let Some(obj) = e.as_object() else {
        return invalid("each element of data must be an event object");
    };
    // source: M-EVENT (event_name is required)
    let Some(name) = obj
        .get("event_name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    else {
        return invalid("event_name is required");
    };
    // source: M-EVENT ("A Unix timestamp in seconds")
    let Some(t) = obj.get("event_time").and_then(Value::as_i64) else {
        return invalid("event_time must be an integer (Unix seconds)");
    };
    // source: M-EVENT, M-PARAMS ("non-web events require only action_source")
    let Some(source) = obj.get("action_source").and_then(Value::as_str) else {
        return invalid("action_source is required");
    };
    if !is_action_source(source) {
        return invalid(format!("invalid action_source {source:?}"));
    }
    check_time(t, source, cx)?;
    let Some(ud) = obj.get("user_data").and_then(Value::as_object) else {
        // source: M-CIP (user_data is required, with at least one parameter)
        return invalid("user_data is required");
    };
    check_user_data(ud, cx)?;
    // source: M-PARAMS ("Website events ... require the client_user_agent, action_source, and event_source_url parameters")
    if source == "website"
        && (!ud.get("client_user_agent").is_some_and(present)
            || !obj.get("event_source_url").is_some_and(present))
    {
        return invalid("website events need client_user_agent and event_source_url");
    }
    let cd = obj.get("custom_data").and_then(Value::as_object);
    check_custom_data(name, cd, cx)?;
    check_conversion_leads(name, source, cd, ud, cx)?;
    // The test's hook: an event it made invalid.
    if event_id(e).is_some_and(|id| cx.poison.contains(&id)) {
        return invalid("invalid parameter (poisoned by the test)");
    }
    Ok(())
}

fn check_time(t: i64, source: &str, cx: &Context) -> Result<(), Refusal> {
    // source: M-EVENT ("If any event_time in data is greater than 7 days in the past, we return an
    // error for the entire request"), M-USE (physical_store: within 62 days). The subcode 2804003
    // is UNCONFIRMED (RS-FB only).
    let window = if source == "physical_store" { 62 } else { 7 } * DAY;
    if cx.now - t > window {
        return invalid_sub(2804003, "event_time is too far in the past");
    }
    // the fake's own rule (UNCONFIRMED: no documented bound on future times; Adsmurai GTM #3
    // reports failures; subcode 2804004 appears in no source). Strict mode only.
    if cx.strict && t > cx.now + 60 {
        return invalid_sub(2804004, "event_time is in the future");
    }
    Ok(())
}

fn check_user_data(ud: &Map<String, Value>, cx: &Context) -> Result<(), Refusal> {
    // source: M-CIP ("You must provide at least one of the following user_data parameters")
    if !ud
        .iter()
        .any(|(k, v)| USER_DATA_KEYS.contains(&k.as_str()) && present(v))
    {
        return invalid("user_data needs at least one customer information parameter");
    }
    for (k, v) in ud {
        // the fake's own rule (UNCONFIRMED: Meta's reaction to an unknown user_data key is not
        // documented). Strict mode only.
        if cx.strict && !USER_DATA_KEYS.contains(&k.as_str()) {
            return invalid(format!("unknown user_data parameter {k}"));
        }
        // source: M-CIP ("hashing required"; SHA-256 as lowercase hex)
        if HASH_REQUIRED.contains(&k.as_str()) && !is_hash(v) {
            return invalid(format!("user_data.{k} must be SHA-256 hashed"));
        }
        // project policy, stricter than M-CIP ("hashing recommended" for external_id). Strict only.
        if cx.strict && k == "external_id" && !is_hash(v) {
            return invalid("user_data.external_id must be SHA-256 hashed (project policy)");
        }
        // source: M-FBC ("must be of the form version.subdomainIndex.creationTime.<fbclid>",
        // creationTime in milliseconds). Meta's reaction to a malformed value is UNCONFIRMED:
        // strict mode only.
        if cx.strict && (k == "fbc" || k == "fbp") && !fb_cookie(v) {
            return invalid(format!(
                "user_data.{k} must be fb.<subdomainIndex>.<creationTime ms>.<id>"
            ));
        }
    }
    // source: M-CIP (v13 "new requirements around the combinations of customer information
    // parameters"; the best-practices combination as issue #12's review read it): at least one
    // key that identifies a person or a browser on its own, or both the IP address and the user
    // agent. Names and address fields alone, or IP or user agent alone, are not enough. The
    // subcode is third-party (UNCONFIRMED); strict mode only.
    let has = |k: &str| ud.get(k).is_some_and(present);
    let matchable = STRONG_USER_DATA_KEYS.iter().any(|k| has(k))
        || (has("client_ip_address") && has("client_user_agent"));
    if cx.strict && !matchable {
        return invalid_sub(
            2804050,
            "You haven't added sufficient customer information parameter data for this event",
        );
    }
    Ok(())
}

fn check_custom_data(
    name: &str,
    cd: Option<&Map<String, Value>>,
    cx: &Context,
) -> Result<(), Refusal> {
    let value = cd.and_then(|c| c.get("value"));
    // source: M-OMNI ("Value — Required for purchase events"); SDK serverside/custom_data.py
    // (value and currency)
    if name == "Purchase"
        && (value.and_then(Value::as_f64).is_none()
            || cd
                .and_then(|c| c.get("currency"))
                .and_then(Value::as_str)
                .is_none_or(|c| c.len() != 3))
    {
        return invalid("Purchase needs custom_data.value and a 3-letter custom_data.currency");
    }
    // source: M-OMNI ("Please make sure that value >= 0"). That CAPI refuses a negative value
    // is UNCONFIRMED: strict mode only.
    if cx.strict && value.and_then(Value::as_f64).is_some_and(|v| v < 0.0) {
        return invalid("custom_data.value must be >= 0");
    }
    Ok(())
}

fn check_conversion_leads(
    name: &str,
    source: &str,
    cd: Option<&Map<String, Value>>,
    ud: &Map<String, Value>,
    cx: &Context,
) -> Result<(), Refusal> {
    let field = |k: &str| cd.and_then(|c| c.get(k)).filter(|v| present(v));
    let (event_source, lead_source) = (field("event_source"), field("lead_event_source"));
    let lead_id = ud.get("lead_id").filter(|v| present(v));
    if let Some(id) = lead_id {
        // source: M-LEADS ("lead_id integer ... a 15 or 16-digit number ... Do not hash"). That a
        // JSON string is refused is UNCONFIRMED: strict mode takes only a JSON integer.
        let digits = match id {
            Value::Number(n) if n.is_u64() => Some(n.to_string()),
            Value::String(s) if !cx.strict => Some(s.clone()),
            _ => None,
        };
        if !digits
            .is_some_and(|d| (15..=16).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
        {
            return invalid("user_data.lead_id must be an integer of 15 or 16 digits");
        }
    }
    if event_source.is_none() && lead_source.is_none() {
        return Ok(());
    }
    // source: M-LEADS ("Do not use this specification for events not related to this
    // optimization"): a Purchase is a commerce event, never a lead stage. That Meta refuses it
    // is UNCONFIRMED: strict mode only.
    if cx.strict && name == "Purchase" {
        return invalid(
            "Conversion Leads fields (custom_data.event_source crm, lead_event_source) are for lead stages, not Purchase",
        );
    }
    // source: M-LEADS (custom_data.event_source: "Set this parameter to the value crm for all
    // Conversions Leads events"; lead_event_source: Required)
    if event_source.and_then(Value::as_str) != Some("crm") {
        return invalid("custom_data.event_source must be \"crm\" for Conversion Leads events");
    }
    if !lead_source.is_some_and(Value::is_string) {
        return invalid("custom_data.lead_event_source is required for Conversion Leads events");
    }
    // source: M-LEADS ("Set this parameter to the value system_generated for all Conversion Leads events")
    if source != "system_generated" {
        return invalid("Conversion Leads events need action_source system_generated");
    }
    // source: M-LEADS ("lead_id ... Required ... It is required to use lead IDs instead of customer
    // information for matching"; "Do not use this specification for events not related to this
    // optimization"). That Meta refuses such an event is UNCONFIRMED: strict mode only, and
    // switchable on its own (`require_lead_id`).
    if cx.strict && cx.require_lead_id && lead_id.is_none() {
        return invalid(
            "Conversion Leads events (custom_data.event_source crm) need user_data.lead_id",
        );
    }
    Ok(())
}
