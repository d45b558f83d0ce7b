//! The mapping contract: what each CRM stage becomes on each platform, loaded from a versioned,
//! human-edited TOML file and validated as a whole, every error with its location.

use crate::consent::ConsentStatus;
use crate::delivery::Destination;
use crate::event::EventName;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// The contract shipped with the code (`infra/mapping.toml`); `MAPPING_PATH` may point elsewhere.
pub const BUNDLED: &str = include_str!("../../../infra/mapping.toml");

// ---- the file as written (strings everywhere, so that every mistake is reported by
// `validate` with its path, not just the first one serde meets) ----

type Extra = BTreeMap<String, toml::Value>;

#[derive(Deserialize, Default)]
struct RawMapping {
    version: Option<String>,
    revenue: Option<RawRevenue>,
    #[serde(default)]
    sources: BTreeMap<String, RawSource>,
    meta: Option<RawMeta>,
    google: Option<RawGoogle>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize, Default)]
struct RawRevenue {
    system_of_record: Option<String>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize, Default)]
struct RawSource {
    consent_default: Option<String>,
    #[serde(default)]
    stages: BTreeMap<String, String>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize, Default)]
struct RawMeta {
    enabled: Option<bool>,
    action_source: Option<String>,
    refund_policy: Option<String>,
    lead_event_source: Option<String>,
    conversion_leads_stages: Option<Vec<String>>,
    limited_data_use: Option<RawLdu>,
    #[serde(default)]
    events: BTreeMap<String, String>,
    #[serde(default)]
    action_sources: BTreeMap<String, String>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize, Default)]
struct RawLdu {
    enabled: Option<bool>,
    country: Option<i64>,
    state: Option<i64>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize, Default)]
struct RawGoogle {
    enabled: Option<bool>,
    backend: Option<String>,
    login_customer_id: Option<String>,
    refund_policy: Option<String>,
    full_refund_policy: Option<String>,
    #[serde(default)]
    conversions: BTreeMap<String, RawConversion>,
    #[serde(default)]
    accounts: BTreeMap<String, RawAccount>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize, Default)]
struct RawAccount {
    backend: Option<String>,
    login_customer_id: Option<String>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize, Default)]
struct RawConversion {
    action: Option<String>,
    allow_without_click_id: Option<bool>,
    click_through_lookback_window_days: Option<i64>,
    #[serde(flatten)]
    extra: Extra,
}

// ---- the validated contract ----

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub version: String,
    /// The one source allowed to emit revenue (won, refund).
    pub system_of_record: String,
    pub sources: BTreeMap<String, SourceMapping>,
    pub meta: Option<MetaMapping>,
    pub google: Option<GoogleMapping>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceMapping {
    pub consent_default: ConsentStatus,
    /// CRM stage value (lower-cased) to lifecycle.
    pub stages: HashMap<String, EventName>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaRefundPolicy {
    /// A custom `Refund` event (name from `events.refund`) with the refunded value.
    CustomEvent,
    Skip,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaEvent {
    pub event_name: String,
    pub action_source: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaMapping {
    pub events: BTreeMap<EventName, MetaEvent>,
    pub refund_policy: MetaRefundPolicy,
    /// CRM Conversion Leads: when set, `custom_data.event_source = "crm"` and this name as
    /// `lead_event_source` on the events of `conversion_leads_stages`.
    pub lead_event_source: Option<String>,
    /// The lead-funnel stages that carry the Conversion Leads fields. Meta's Conversion Leads
    /// payload specification is for that optimization only ("Do not use this specification
    /// for events not related to this optimization"), so a Purchase never carries them.
    pub conversion_leads_stages: Vec<EventName>,
    /// Limited Data Use: (country, state) codes, `(0, 0)` meaning geolocate.
    pub limited_data_use: Option<(i64, i64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoogleBackend {
    AdsApi,
    DataManager,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoogleRefundPolicy {
    /// RETRACTION for a full refund, RESTATEMENT to the new total for a partial one.
    Adjust,
    Skip,
}

/// What to do with a full refund on the Data Manager back end, which cannot retract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FullRefundPolicy {
    /// Restate to 0 and record `retraction_unsupported` on the event.
    RestateToZero,
    /// Retract through the Google Ads API (the account must be allowed to use it).
    RetractViaAdsApi,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoogleConversion {
    /// `customers/{customer_id}/conversionActions/{action_id}`.
    pub action: String,
    pub customer_id: String,
    pub action_id: String,
    /// Enhanced conversions for leads: the action matches on user data without a click id.
    pub allow_without_click_id: bool,
    /// The action's click-through conversion window as set in Google Ads
    /// (`ConversionAction.click_through_lookback_window_days`, at most 90), when the mapping
    /// says it; [`DEFAULT_CLICK_WINDOW_DAYS`] otherwise. A correction moves a conversion to
    /// another action only when the click is sure to be inside that action's window.
    pub click_through_lookback_window_days: Option<u32>,
}

/// Google Ads' click-through conversion window for an action created with default settings.
pub const DEFAULT_CLICK_WINDOW_DAYS: u32 = 30;

impl GoogleConversion {
    /// The conversion action a resource name (`customers/{cid}/conversionActions/{id}`, as a
    /// delivery log records it) names; `None` for anything else.
    pub fn from_resource(action: &str) -> Option<GoogleConversion> {
        let (customer_id, action_id) = parse_action(action)?;
        Some(GoogleConversion {
            action: action.to_string(),
            customer_id,
            action_id,
            allow_without_click_id: false,
            click_through_lookback_window_days: None,
        })
    }

    /// The click-through window in days (the mapping's, else Google's default).
    pub fn click_window_days(&self) -> u32 {
        self.click_through_lookback_window_days
            .unwrap_or(DEFAULT_CLICK_WINDOW_DAYS)
    }
}

/// Per-customer overrides: the back end is chosen per account, because whether a developer
/// token may still import conversions through the Ads API is decided per account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoogleAccount {
    pub backend: GoogleBackend,
    pub login_customer_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoogleMapping {
    /// The default back end; `accounts` may override it per customer.
    pub backend: GoogleBackend,
    pub login_customer_id: Option<String>,
    pub accounts: BTreeMap<String, GoogleAccount>,
    pub conversions: BTreeMap<EventName, GoogleConversion>,
    pub refund_policy: GoogleRefundPolicy,
    pub full_refund_policy: FullRefundPolicy,
}

impl GoogleMapping {
    pub fn backend_for(&self, customer_id: &str) -> GoogleBackend {
        self.accounts
            .get(customer_id)
            .map_or(self.backend, |a| a.backend)
    }

    /// The manager account to send as `login-customer-id` / `loginAccount`, if any.
    pub fn login_for(&self, customer_id: &str) -> Option<&str> {
        self.accounts
            .get(customer_id)
            .and_then(|a| a.login_customer_id.as_deref())
            .or(self.login_customer_id.as_deref())
    }
}

/// One problem in the mapping file, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappingError {
    pub location: String,
    pub reason: String,
}

impl fmt::Display for MappingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid mapping contract ({} problem(s)):\n{}", .0.len(), .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
pub struct MappingErrors(pub Vec<MappingError>);

const ACTION_SOURCES: &[&str] = &[
    "email",
    "website",
    "app",
    "phone_call",
    "chat",
    "physical_store",
    "system_generated",
    "business_messaging",
    "other",
];

struct Errors(Vec<MappingError>);

impl Errors {
    fn push(&mut self, location: impl Into<String>, reason: impl Into<String>) {
        self.0.push(MappingError {
            location: location.into(),
            reason: reason.into(),
        });
    }
    fn unknown(&mut self, at: &str, extra: &Extra) {
        for k in extra.keys() {
            let loc = if at.is_empty() {
                k.clone()
            } else {
                format!("{at}.{k}")
            };
            self.push(loc, "unknown key");
        }
    }
    fn lifecycle(&mut self, at: String, s: &str) -> Option<EventName> {
        let e = EventName::parse(s);
        if e.is_none() {
            self.push(
                at,
                format!("`{s}` is not a lifecycle stage (lead, mql, sql, won, refund)"),
            );
        }
        e
    }
}

fn digits(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| b.is_ascii_digit())
}

/// Splits `customers/{10 digits}/conversionActions/{digits}`.
fn parse_action(s: &str) -> Option<(String, String)> {
    let rest = s.strip_prefix("customers/")?;
    let (cid, rest) = rest.split_once('/')?;
    let id = rest.strip_prefix("conversionActions/")?;
    (digits(cid, 10) && !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
        .then(|| (cid.to_string(), id.to_string()))
}

impl Mapping {
    pub fn bundled() -> Result<Mapping, MappingErrors> {
        Self::load(BUNDLED)
    }

    /// Parses and validates the whole file, reporting every problem at once.
    pub fn load(text: &str) -> Result<Mapping, MappingErrors> {
        let raw: RawMapping = toml::from_str(text).map_err(|e| {
            let location = match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}")
                }
                None => "file".into(),
            };
            MappingErrors(vec![MappingError {
                location,
                reason: e.message().to_string(),
            }])
        })?;
        let mut err = Errors(Vec::new());
        err.unknown("", &raw.extra);

        let version = match raw.version.as_deref().map(str::trim) {
            Some(v) if !v.is_empty() && v.len() <= 64 => v.to_string(),
            _ => {
                err.push(
                    "version",
                    "is required (1-64 characters); it is stored on every event",
                );
                String::new()
            }
        };

        let mut sources = BTreeMap::new();
        if raw.sources.is_empty() {
            err.push("sources", "at least one source is required");
        }
        for (name, src) in &raw.sources {
            let at = format!("sources.{name}");
            err.unknown(&at, &src.extra);
            if !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
            {
                err.push(&at, "source names are a-z, 0-9, _ or -");
            }
            let consent_default = match src.consent_default.as_deref() {
                None => ConsentStatus::Unknown,
                Some(s) => ConsentStatus::parse(s).unwrap_or_else(|| {
                    err.push(
                        format!("{at}.consent_default"),
                        "must be granted, denied or unknown",
                    );
                    ConsentStatus::Unknown
                }),
            };
            let mut stages = HashMap::new();
            for (stage, lifecycle) in &src.stages {
                let loc = format!("{at}.stages.\"{stage}\"");
                if let Some(e) = err.lifecycle(loc.clone(), lifecycle)
                    && stages.insert(stage.trim().to_lowercase(), e).is_some()
                {
                    err.push(loc, "duplicates another stage once case is ignored");
                }
            }
            sources.insert(
                name.clone(),
                SourceMapping {
                    consent_default,
                    stages,
                },
            );
        }

        let system_of_record = match &raw.revenue {
            None => {
                err.push(
                    "revenue.system_of_record",
                    "is required: name the one source allowed to emit won and refund",
                );
                String::new()
            }
            Some(r) => {
                err.unknown("revenue", &r.extra);
                match r.system_of_record.as_deref() {
                    Some(s) if raw.sources.contains_key(s) => s.to_string(),
                    Some(s) => {
                        err.push(
                            "revenue.system_of_record",
                            format!("`{s}` is not a source defined under [sources]"),
                        );
                        String::new()
                    }
                    None => {
                        err.push("revenue.system_of_record", "is required");
                        String::new()
                    }
                }
            }
        };

        let meta = raw.meta.as_ref().and_then(|m| validate_meta(m, &mut err));
        let google = raw
            .google
            .as_ref()
            .and_then(|g| validate_google(g, &mut err));
        if meta.is_none() && google.is_none() && err.0.is_empty() {
            err.push("meta / google", "no destination is enabled");
        }

        if err.0.is_empty() {
            Ok(Mapping {
                version,
                system_of_record,
                sources,
                meta,
                google,
            })
        } else {
            Err(MappingErrors(err.0))
        }
    }

    pub fn source(&self, name: &str) -> Option<&SourceMapping> {
        self.sources.get(name)
    }

    /// The lifecycle a CRM stage value maps to; `None` is an unmapped stage.
    pub fn lifecycle_for(&self, source: &str, stage: &str) -> Option<EventName> {
        self.sources
            .get(source)?
            .stages
            .get(&stage.trim().to_lowercase())
            .copied()
    }

    pub fn is_system_of_record(&self, source: &str) -> bool {
        self.system_of_record == source
    }

    /// Destinations this lifecycle stage is sent to under the contract.
    pub fn destinations_for(&self, event: EventName) -> Vec<Destination> {
        let mut out = Vec::with_capacity(2);
        if let Some(m) = &self.meta {
            let sends = match event {
                EventName::Refund => m.refund_policy != MetaRefundPolicy::Skip,
                e => m.events.contains_key(&e),
            };
            if sends {
                out.push(Destination::Meta);
            }
        }
        if let Some(g) = &self.google {
            let sends = match event {
                EventName::Refund => g.refund_policy == GoogleRefundPolicy::Adjust,
                e => g.conversions.contains_key(&e),
            };
            if sends {
                out.push(Destination::Google);
            }
        }
        out
    }
}

fn validate_meta(m: &RawMeta, err: &mut Errors) -> Option<MetaMapping> {
    err.unknown("meta", &m.extra);
    let default_source = m
        .action_source
        .clone()
        .unwrap_or_else(|| "system_generated".into());
    if !ACTION_SOURCES.contains(&default_source.as_str()) {
        err.push(
            "meta.action_source",
            format!("must be one of {}", ACTION_SOURCES.join(", ")),
        );
    }
    let refund_policy = match m.refund_policy.as_deref().unwrap_or("custom_event") {
        "custom_event" => MetaRefundPolicy::CustomEvent,
        "skip" => MetaRefundPolicy::Skip,
        "negative_purchase" => {
            // Meta documents no negative values (its omnichannel guide asks for value >= 0)
            // and no way to net a refund against a Purchase.
            err.push(
                "meta.refund_policy",
                "negative_purchase is not supported: Meta documents no negative values (value >= 0); use custom_event or skip",
            );
            MetaRefundPolicy::Skip
        }
        _ => {
            err.push("meta.refund_policy", "must be custom_event or skip");
            MetaRefundPolicy::Skip
        }
    };
    let mut events = BTreeMap::new();
    for (stage, name) in &m.events {
        let at = format!("meta.events.{stage}");
        let Some(e) = err.lifecycle(at.clone(), stage) else {
            continue;
        };
        let ok = !name.is_empty()
            && name.len() <= 50
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b' ');
        if !ok {
            err.push(
                at,
                "a Meta event name is 1-50 characters of letters, digits, _ or space",
            );
        }
        let action_source = m
            .action_sources
            .get(stage)
            .cloned()
            .unwrap_or_else(|| default_source.clone());
        events.insert(
            e,
            MetaEvent {
                event_name: name.clone(),
                action_source,
            },
        );
    }
    for (stage, src) in &m.action_sources {
        let at = format!("meta.action_sources.{stage}");
        if err.lifecycle(at.clone(), stage).is_some() && !ACTION_SOURCES.contains(&src.as_str()) {
            err.push(at, format!("must be one of {}", ACTION_SOURCES.join(", ")));
        }
    }
    if refund_policy == MetaRefundPolicy::CustomEvent && !events.contains_key(&EventName::Refund) {
        err.push(
            "meta.events.refund",
            "is required when refund_policy = \"custom_event\" (e.g. \"Refund\")",
        );
    }
    let limited_data_use = m.limited_data_use.as_ref().and_then(|l| {
        err.unknown("meta.limited_data_use", &l.extra);
        l.enabled
            .unwrap_or(true)
            .then(|| (l.country.unwrap_or(0), l.state.unwrap_or(0)))
    });
    let lead_event_source = m
        .lead_event_source
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    let funnel = [EventName::Lead, EventName::Mql, EventName::Sql];
    let mut conversion_leads_stages = Vec::new();
    match &m.conversion_leads_stages {
        None if lead_event_source.is_some() => conversion_leads_stages = funnel.to_vec(),
        None => {}
        Some(stages) => {
            if lead_event_source.is_none() {
                err.push(
                    "meta.conversion_leads_stages",
                    "needs meta.lead_event_source (the CRM's name) to be set",
                );
            }
            for (i, stage) in stages.iter().enumerate() {
                let at = format!("meta.conversion_leads_stages[{i}]");
                let Some(e) = err.lifecycle(at.clone(), stage) else {
                    continue;
                };
                if !funnel.contains(&e) {
                    err.push(
                        at,
                        "Conversion Leads fields go on lead-funnel stages only (lead, mql, sql): Meta's payload specification is not for other events",
                    );
                } else {
                    conversion_leads_stages.push(e);
                }
            }
        }
    }
    for e in &conversion_leads_stages {
        if let Some(ev) = events.get(e)
            && ev.action_source != "system_generated"
        {
            err.push(
                format!("meta.action_sources.{e}"),
                "Conversion Leads events must use action_source system_generated",
            );
        }
    }
    m.enabled.unwrap_or(true).then_some(MetaMapping {
        events,
        refund_policy,
        lead_event_source,
        conversion_leads_stages,
        limited_data_use,
    })
}

fn parse_backend(v: Option<&str>, at: &str, err: &mut Errors) -> GoogleBackend {
    match v.unwrap_or("ads_api") {
        "ads_api" => GoogleBackend::AdsApi,
        "data_manager" => GoogleBackend::DataManager,
        _ => {
            err.push(at, "must be ads_api or data_manager");
            GoogleBackend::AdsApi
        }
    }
}

fn parse_login(v: Option<&str>, at: &str, err: &mut Errors) -> Option<String> {
    let login = v.map(|s| s.replace('-', ""));
    if let Some(l) = &login
        && !digits(l, 10)
    {
        err.push(at, "must be a 10-digit customer id");
    }
    login
}

fn validate_google(g: &RawGoogle, err: &mut Errors) -> Option<GoogleMapping> {
    err.unknown("google", &g.extra);
    let backend = parse_backend(g.backend.as_deref(), "google.backend", err);
    let login_customer_id = parse_login(
        g.login_customer_id.as_deref(),
        "google.login_customer_id",
        err,
    );
    let mut accounts = BTreeMap::new();
    for (cid, a) in &g.accounts {
        let at = format!("google.accounts.{cid}");
        err.unknown(&at, &a.extra);
        let id = cid.replace('-', "");
        if !digits(&id, 10) {
            err.push(&at, "the key must be a 10-digit customer id");
        }
        let account = GoogleAccount {
            backend: parse_backend(
                a.backend.as_deref().or(g.backend.as_deref()),
                &format!("{at}.backend"),
                err,
            ),
            login_customer_id: parse_login(
                a.login_customer_id.as_deref(),
                &format!("{at}.login_customer_id"),
                err,
            ),
        };
        accounts.insert(id, account);
    }
    let refund_policy = match g.refund_policy.as_deref().unwrap_or("adjust") {
        "adjust" => GoogleRefundPolicy::Adjust,
        "skip" => GoogleRefundPolicy::Skip,
        _ => {
            err.push("google.refund_policy", "must be adjust or skip");
            GoogleRefundPolicy::Skip
        }
    };
    let full_refund_policy = match g.full_refund_policy.as_deref().unwrap_or("restate_to_zero") {
        "restate_to_zero" => FullRefundPolicy::RestateToZero,
        "retract_via_ads_api" => FullRefundPolicy::RetractViaAdsApi,
        _ => {
            err.push(
                "google.full_refund_policy",
                "must be restate_to_zero or retract_via_ads_api",
            );
            FullRefundPolicy::RestateToZero
        }
    };
    let mut conversions = BTreeMap::new();
    for (stage, c) in &g.conversions {
        let at = format!("google.conversions.{stage}");
        err.unknown(&at, &c.extra);
        let Some(e) = err.lifecycle(at.clone(), stage) else {
            continue;
        };
        if e == EventName::Refund {
            err.push(
                at,
                "refunds adjust the won conversion; set google.refund_policy instead",
            );
            continue;
        }
        match c.action.as_deref().and_then(parse_action) {
            Some((customer_id, action_id)) => {
                let action = format!("customers/{customer_id}/conversionActions/{action_id}");
                let allow_without_click_id = c.allow_without_click_id.unwrap_or(false);
                let window = c.click_through_lookback_window_days;
                let click_through_lookback_window_days = match window {
                    None => None,
                    Some(d @ 1..=90) => u32::try_from(d).ok(),
                    Some(_) => {
                        err.push(
                            format!("{at}.click_through_lookback_window_days"),
                            "must be a whole number of days from 1 to 90 (Google's range)",
                        );
                        None
                    }
                };
                conversions.insert(
                    e,
                    GoogleConversion {
                        action,
                        customer_id,
                        action_id,
                        allow_without_click_id,
                        click_through_lookback_window_days,
                    },
                );
            }
            None => err.push(
                format!("{at}.action"),
                "must be customers/<10 digits>/conversionActions/<id>",
            ),
        }
    }
    if refund_policy == GoogleRefundPolicy::Adjust && !conversions.contains_key(&EventName::Won) {
        err.push(
            "google.refund_policy",
            "\"adjust\" needs google.conversions.won: refunds adjust that conversion",
        );
    }
    g.enabled.unwrap_or(true).then_some(GoogleMapping {
        backend,
        login_customer_id,
        accounts,
        conversions,
        refund_policy,
        full_refund_policy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_contract_is_valid() {
        let m = Mapping::bundled().unwrap_or_else(|e| panic!("{e}"));
        assert!(!m.version.is_empty());
        assert!(m.is_system_of_record(&m.system_of_record));
        assert_eq!(
            m.lifecycle_for("hubspot", "closedwon"),
            Some(EventName::Won)
        );
        assert_eq!(
            m.lifecycle_for("hubspot", "ClosedWon"),
            Some(EventName::Won),
            "case-insensitive"
        );
        assert_eq!(
            m.lifecycle_for("hubspot", "appointmentscheduled"),
            None,
            "unmapped"
        );
        assert_eq!(
            m.destinations_for(EventName::Won),
            [Destination::Meta, Destination::Google]
        );
    }

    #[test]
    fn a_click_through_window_is_google_s_range_of_days() {
        let with = |days: &str| {
            BUNDLED.replace(
                "action = \"customers/1234567890/conversionActions/987654321\"",
                &format!("action = \"customers/1234567890/conversionActions/987654321\"\nclick_through_lookback_window_days = {days}"),
            )
        };
        let m = Mapping::load(&with("60")).unwrap();
        let won = &m.google.as_ref().unwrap().conversions[&EventName::Won];
        assert_eq!(won.click_window_days(), 60);
        let sql = &m.google.as_ref().unwrap().conversions[&EventName::Sql];
        assert_eq!(
            sql.click_window_days(),
            DEFAULT_CLICK_WINDOW_DAYS,
            "not stated"
        );
        for bad in ["0", "91", "-3"] {
            let errs = Mapping::load(&with(bad)).unwrap_err().0;
            assert_eq!(
                errs[0].location, "google.conversions.won.click_through_lookback_window_days",
                "{bad}"
            );
        }
    }

    #[test]
    fn every_error_is_reported_with_its_location() {
        let text = r#"
            version = ""
            colour = "blue"
            [revenue]
            system_of_record = "netsuite"
            [sources.hubspot]
            consent_default = "perhaps"
            [sources.hubspot.stages]
            closedwon = "purchase"
            [meta]
            action_source = "fax"
            refund_policy = "custom_event"
            [meta.events]
            lead = "Lead!"
            [google]
            backend = "carrier_pigeon"
            [google.conversions.won]
            action = "conversionActions/1"
        "#;
        let errs = Mapping::load(text).unwrap_err().0;
        let locs: Vec<&str> = errs.iter().map(|e| e.location.as_str()).collect();
        assert_eq!(
            locs,
            [
                "colour",
                "version",
                "sources.hubspot.consent_default",
                "sources.hubspot.stages.\"closedwon\"",
                "revenue.system_of_record",
                "meta.action_source",
                "meta.events.lead",
                "meta.events.refund",
                "google.backend",
                "google.conversions.won.action",
                "google.refund_policy",
            ],
            "{errs:#?}"
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let errs = Mapping::load("version = \"1\"\n[sources\n").unwrap_err().0;
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].location, "line 2");
    }

    #[test]
    fn refund_destinations_follow_policies() {
        let text = r#"
            version = "t"
            [revenue]
            system_of_record = "crm"
            [sources.crm]
            [meta]
            refund_policy = "skip"
            [meta.events]
            won = "Purchase"
            [google]
            [google.conversions.won]
            action = "customers/1234567890/conversionActions/55"
        "#;
        let m = Mapping::load(text).unwrap();
        assert_eq!(m.destinations_for(EventName::Refund), [Destination::Google]);
        assert_eq!(
            m.destinations_for(EventName::Lead),
            Vec::<Destination>::new()
        );
        let g = m.google.unwrap();
        assert_eq!(g.conversions[&EventName::Won].customer_id, "1234567890");
        assert_eq!(g.conversions[&EventName::Won].action_id, "55");
    }

    #[test]
    fn meta_rules_meta_documents() {
        let text = |extra: &str| {
            format!(
                r#"
            version = "t"
            [revenue]
            system_of_record = "crm"
            [sources.crm]
            [meta]
            {extra}
            [meta.events]
            lead = "Lead"
            won = "Purchase"
            refund = "Refund"
        "#
            )
        };
        let errs = Mapping::load(&text(r#"refund_policy = "negative_purchase""#))
            .unwrap_err()
            .0;
        assert_eq!(errs[0].location, "meta.refund_policy");
        assert!(errs[0].reason.contains("value >= 0"), "{}", errs[0].reason);
        let errs = Mapping::load(&text(
            r#"lead_event_source = "HubSpot"
            conversion_leads_stages = ["lead", "won"]"#,
        ))
        .unwrap_err()
        .0;
        assert_eq!(errs[0].location, "meta.conversion_leads_stages[1]");
        let m = Mapping::load(&text(r#"lead_event_source = "HubSpot""#)).unwrap();
        assert_eq!(
            m.meta.unwrap().conversion_leads_stages,
            [EventName::Lead, EventName::Mql, EventName::Sql],
            "lead-funnel stages by default"
        );
    }
}
