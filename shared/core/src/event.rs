//! The canonical event: parsing a CRM lifecycle change, validating it (every problem at once),
//! and its deterministic event_id.

use crate::consent::{Consent, ConsentOrigin, ConsentStatus, GoogleSignal};
use crate::delivery::{Destination, DestinationState};
use crate::hashing::sha256_hex_joined;
use crate::identity::{self, HashedIdentity, IdentityContext, IdentityInput, IdentityWarning};
use crate::money::{Money, currency_code};
use crate::timestamp::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum EventName {
    Lead,
    Mql,
    Sql,
    Won,
    Refund,
}

impl EventName {
    pub const ALL: [EventName; 5] = [Self::Lead, Self::Mql, Self::Sql, Self::Won, Self::Refund];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Lead => "lead",
            Self::Mql => "mql",
            Self::Sql => "sql",
            Self::Won => "won",
            Self::Refund => "refund",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }

    /// Revenue events carry money and an order id, and only the system of record may emit them.
    pub fn is_revenue(&self) -> bool {
        matches!(self, Self::Won | Self::Refund)
    }
}

impl fmt::Display for EventName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum EntityType {
    Lead,
    Contact,
    Opportunity,
    Order,
}

impl EntityType {
    pub const ALL: [EntityType; 4] = [Self::Lead, Self::Contact, Self::Opportunity, Self::Order];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Lead => "lead",
            Self::Contact => "contact",
            Self::Opportunity => "opportunity",
            Self::Order => "order",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

/// Whether the event_id was derived here or kept from the source (a browser Pixel's id).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum EventIdOrigin {
    #[default]
    Derived,
    Provided,
}

/// One lifecycle change as the bridge stores it: the audit record and the replay source.
/// Identity holds hashes and click ids only.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CanonicalEvent {
    /// The id the platforms see (and deduplicate on): derived here, or the caller's own (a
    /// browser Pixel's eventID, which must match for browser/server deduplication).
    pub event_id: String,
    /// The event's key in the store: see [`store_key`]. Events stored before keys were scoped
    /// by source keep their old key (the bare event_id), which the store reads back.
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub event_id_origin: EventIdOrigin,
    pub source: String,
    pub event_name: EventName,
    /// The CRM's own stage value when the event came through the mapping contract.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crm_stage: Option<String>,
    /// Business time of the change; never replaced by processing time, never changed on retry.
    pub occurred_at: Timestamp,
    pub received_at: Timestamp,
    pub entity_type: EntityType,
    pub entity_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// For `won` the conversion value; for `refund` the amount this refund returns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Money>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    #[serde(default)]
    pub identity: HashedIdentity,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<IdentityWarning>,
    #[serde(default)]
    pub consent: Consent,
    pub mapping_version: String,
    #[serde(default)]
    pub destinations: BTreeMap<Destination, DestinationState>,
}

/// One problem with an input: the field's path and the reason.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// A CRM change before validation, with raw identity. Built from the generic JSON shape by
/// [`parse_event`] or by a CRM adapter (HubSpot, Salesforce) from its own payload.
#[derive(Clone, Debug, Default)]
pub struct EventInput {
    pub event_id: Option<String>,
    pub source: Option<String>,
    pub event_name: Option<String>,
    pub crm_stage: Option<String>,
    pub occurred_at: Option<String>,
    pub entity_type: Option<String>,
    pub entity_id: Option<String>,
    pub order_id: Option<String>,
    pub value: Option<f64>,
    pub currency: Option<String>,
    pub identity: IdentityInput,
    pub consent: Option<ConsentInput>,
}

#[derive(Clone, Debug, Default)]
pub struct ConsentInput {
    pub status: Option<String>,
    pub basis: Option<String>,
    pub captured_at: Option<String>,
    pub ad_user_data: Option<String>,
    pub ad_personalization: Option<String>,
}

/// The generic JSON shape, borrowed from the request body: the fast path for well-formed
/// events. Anything it rejects (an unknown field, a wrong type) goes through [`parse_event`],
/// which names every problem.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FastEvent<'a> {
    #[serde(borrow, default)]
    event_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    source: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    event_name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    crm_stage: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    occurred_at: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    entity_type: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    entity_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    order_id: Option<Cow<'a, str>>,
    #[serde(default)]
    value: Option<f64>,
    #[serde(borrow, default)]
    currency: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    identity: Option<FastIdentity<'a>>,
    #[serde(borrow, default)]
    consent: Option<FastConsent<'a>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FastIdentity<'a> {
    #[serde(borrow, default)]
    email: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    phone: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    first_name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    last_name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    city: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    state: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    zip: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    country: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    external_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    client_ip_address: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    client_user_agent: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    gclid: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    gbraid: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    wbraid: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    fbp: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    fbc: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    fbclid: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    lead_id: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FastConsent<'a> {
    #[serde(borrow, default)]
    status: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    basis: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    captured_at: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    ad_user_data: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    ad_personalization: Option<Cow<'a, str>>,
}

fn own(v: Option<Cow<'_, str>>) -> Option<String> {
    v.map(Cow::into_owned)
}

/// Reads one event in the generic JSON shape from its text: a typed, borrowing parse for
/// well-formed input, and the field-by-field reader for anything else, so every problem is
/// still named.
pub fn parse_event_json(raw: &str) -> Result<EventInput, Vec<FieldError>> {
    match serde_json::from_str::<FastEvent<'_>>(raw) {
        Ok(f) => {
            let identity = match f.identity {
                Some(i) => IdentityInput {
                    email: own(i.email),
                    phone: own(i.phone),
                    first_name: own(i.first_name),
                    last_name: own(i.last_name),
                    city: own(i.city),
                    state: own(i.state),
                    zip: own(i.zip),
                    country: own(i.country),
                    external_id: own(i.external_id),
                    client_ip_address: own(i.client_ip_address),
                    client_user_agent: own(i.client_user_agent),
                    gclid: own(i.gclid),
                    gbraid: own(i.gbraid),
                    wbraid: own(i.wbraid),
                    fbp: own(i.fbp),
                    fbc: own(i.fbc),
                    fbclid: own(i.fbclid),
                    lead_id: own(i.lead_id),
                },
                None => IdentityInput::default(),
            };
            Ok(EventInput {
                event_id: own(f.event_id),
                source: own(f.source),
                event_name: own(f.event_name),
                crm_stage: own(f.crm_stage),
                occurred_at: own(f.occurred_at),
                entity_type: own(f.entity_type),
                entity_id: own(f.entity_id),
                order_id: own(f.order_id),
                value: f.value,
                currency: own(f.currency),
                identity,
                consent: f.consent.map(|c| ConsentInput {
                    status: own(c.status),
                    basis: own(c.basis),
                    captured_at: own(c.captured_at),
                    ad_user_data: own(c.ad_user_data),
                    ad_personalization: own(c.ad_personalization),
                }),
            })
        }
        Err(_) => match serde_json::from_str::<Value>(raw) {
            Ok(v) => parse_event(&v),
            Err(e) => Err(vec![FieldError::new("$", format!("not valid JSON: {e}"))]),
        },
    }
}

const TOP_FIELDS: &[&str] = &[
    "event_id",
    "source",
    "event_name",
    "crm_stage",
    "occurred_at",
    "entity_type",
    "entity_id",
    "order_id",
    "value",
    "currency",
    "identity",
    "consent",
];
const IDENTITY_FIELDS: &[&str] = &[
    "email",
    "phone",
    "first_name",
    "last_name",
    "city",
    "state",
    "zip",
    "country",
    "external_id",
    "client_ip_address",
    "client_user_agent",
    "gclid",
    "gbraid",
    "wbraid",
    "fbp",
    "fbc",
    "fbclid",
    "lead_id",
];
const CONSENT_FIELDS: &[&str] = &[
    "status",
    "basis",
    "captured_at",
    "ad_user_data",
    "ad_personalization",
];

/// Reads the generic JSON shape, collecting a [`FieldError`] for every wrongly typed or
/// unknown field instead of stopping at the first.
pub fn parse_event(v: &Value) -> Result<EventInput, Vec<FieldError>> {
    let mut errors = Vec::new();
    let Some(obj) = v.as_object() else {
        return Err(vec![FieldError::new("$", "an event must be a JSON object")]);
    };
    unknown_fields(obj, TOP_FIELDS, "", &mut errors);
    let mut input = EventInput {
        event_id: string_field(obj, "event_id", "", &mut errors),
        source: string_field(obj, "source", "", &mut errors),
        event_name: string_field(obj, "event_name", "", &mut errors),
        crm_stage: string_field(obj, "crm_stage", "", &mut errors),
        occurred_at: string_field(obj, "occurred_at", "", &mut errors),
        entity_type: string_field(obj, "entity_type", "", &mut errors),
        entity_id: string_field(obj, "entity_id", "", &mut errors),
        order_id: string_field(obj, "order_id", "", &mut errors),
        value: None,
        currency: string_field(obj, "currency", "", &mut errors),
        identity: IdentityInput::default(),
        consent: None,
    };
    match obj.get("value") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) => input.value = n.as_f64(),
        Some(_) => errors.push(FieldError::new("value", "must be a number")),
    }
    if let Some(id) = nested(obj, "identity", &mut errors) {
        unknown_fields(id, IDENTITY_FIELDS, "identity.", &mut errors);
        let p = "identity.";
        let i = &mut input.identity;
        i.email = string_field(id, "email", p, &mut errors);
        i.phone = string_field(id, "phone", p, &mut errors);
        i.first_name = string_field(id, "first_name", p, &mut errors);
        i.last_name = string_field(id, "last_name", p, &mut errors);
        i.city = string_field(id, "city", p, &mut errors);
        i.state = string_field(id, "state", p, &mut errors);
        i.zip = string_field(id, "zip", p, &mut errors);
        i.country = string_field(id, "country", p, &mut errors);
        i.external_id = string_field(id, "external_id", p, &mut errors);
        i.client_ip_address = string_field(id, "client_ip_address", p, &mut errors);
        i.client_user_agent = string_field(id, "client_user_agent", p, &mut errors);
        i.gclid = string_field(id, "gclid", p, &mut errors);
        i.gbraid = string_field(id, "gbraid", p, &mut errors);
        i.wbraid = string_field(id, "wbraid", p, &mut errors);
        i.fbp = string_field(id, "fbp", p, &mut errors);
        i.fbc = string_field(id, "fbc", p, &mut errors);
        i.fbclid = string_field(id, "fbclid", p, &mut errors);
        i.lead_id = string_field(id, "lead_id", p, &mut errors);
    }
    if let Some(c) = nested(obj, "consent", &mut errors) {
        unknown_fields(c, CONSENT_FIELDS, "consent.", &mut errors);
        let p = "consent.";
        input.consent = Some(ConsentInput {
            status: string_field(c, "status", p, &mut errors),
            basis: string_field(c, "basis", p, &mut errors),
            captured_at: string_field(c, "captured_at", p, &mut errors),
            ad_user_data: string_field(c, "ad_user_data", p, &mut errors),
            ad_personalization: string_field(c, "ad_personalization", p, &mut errors),
        });
    }
    if errors.is_empty() {
        Ok(input)
    } else {
        Err(errors)
    }
}

fn unknown_fields(
    obj: &Map<String, Value>,
    known: &[&str],
    prefix: &str,
    errors: &mut Vec<FieldError>,
) {
    for k in obj.keys() {
        if !known.contains(&k.as_str()) {
            errors.push(FieldError::new(format!("{prefix}{k}"), "unknown field"));
        }
    }
}

fn nested<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    errors: &mut Vec<FieldError>,
) -> Option<&'a Map<String, Value>> {
    match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => {
            errors.push(FieldError::new(key, "must be an object"));
            None
        }
    }
}

/// Strings, plus numbers and booleans converted to text: CRMs often send ids as numbers.
fn string_field(
    obj: &Map<String, Value>,
    key: &str,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::Bool(b)) => Some(b.to_string()),
        Some(_) => {
            errors.push(FieldError::new(
                format!("{prefix}{key}"),
                "must be a string",
            ));
            None
        }
    }
}

/// Knobs for validation that come from configuration.
#[derive(Clone, Debug)]
pub struct ValidationContext {
    pub now: Timestamp,
    /// How far in the future `occurred_at` may be (clock skew between systems).
    pub max_future_skew_secs: i64,
    pub default_region: phonenumber::country::Id,
    pub mapping_version: String,
    /// Consent applied when the input carries none.
    pub default_consent: ConsentStatus,
}

impl ValidationContext {
    /// The context unit tests share (here and in the platform crates): US phones, 5 minutes of
    /// skew, consent granted by default.
    #[doc(hidden)]
    pub fn for_tests(now: Timestamp) -> Self {
        ValidationContext {
            now,
            max_future_skew_secs: 300,
            default_region: crate::identity::Region::US,
            mapping_version: "t".into(),
            default_consent: ConsentStatus::Granted,
        }
    }
}

const MAX_ID_LEN: usize = 256;

fn check_id(
    field: &str,
    v: &Option<String>,
    required: bool,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match v.as_deref().map(str::trim) {
        None | Some("") if required => {
            errors.push(FieldError::new(field, "is required"));
            None
        }
        None | Some("") => None,
        Some(s) if s.len() > MAX_ID_LEN => {
            errors.push(FieldError::new(
                field,
                format!("longer than {MAX_ID_LEN} characters"),
            ));
            None
        }
        Some(s) if s.chars().any(|c| c.is_control()) => {
            errors.push(FieldError::new(field, "contains control characters"));
            None
        }
        Some(s) => Some(s.to_string()),
    }
}

/// Validates an input and builds the canonical event: every problem is reported, each naming
/// its field. Identity problems are warnings on the event, never errors.
pub fn validate(
    input: &EventInput,
    ctx: &ValidationContext,
) -> Result<CanonicalEvent, Vec<FieldError>> {
    let mut errors = Vec::new();

    let source = check_id("source", &input.source, true, &mut errors);
    if let Some(s) = &source
        && (s.len() > 64
            || !s
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'))
    {
        errors.push(FieldError::new(
            "source",
            "must be 1-64 characters of a-z, 0-9, _ or -",
        ));
    }
    let event_name = match input.event_name.as_deref().map(str::trim) {
        None | Some("") => {
            errors.push(FieldError::new("event_name", "is required"));
            None
        }
        Some(s) => EventName::parse(s).or_else(|| {
            errors.push(FieldError::new(
                "event_name",
                "must be one of lead, mql, sql, won, refund",
            ));
            None
        }),
    };
    let occurred_at = match input.occurred_at.as_deref() {
        None | Some("") => {
            errors.push(FieldError::new("occurred_at", "is required"));
            None
        }
        Some(s) => match Timestamp::parse_rfc3339(s) {
            Ok(t) if t.secs_since(&ctx.now) > ctx.max_future_skew_secs => {
                errors.push(FieldError::new(
                    "occurred_at",
                    format!(
                        "is in the future (more than {} s ahead of now)",
                        ctx.max_future_skew_secs
                    ),
                ));
                None
            }
            Ok(t) => Some(t),
            Err(e) => {
                errors.push(FieldError::new("occurred_at", e.to_string()));
                None
            }
        },
    };
    let entity_type = match input.entity_type.as_deref().map(str::trim) {
        None | Some("") => {
            errors.push(FieldError::new("entity_type", "is required"));
            None
        }
        Some(s) => EntityType::parse(s).or_else(|| {
            errors.push(FieldError::new(
                "entity_type",
                "must be one of lead, contact, opportunity, order",
            ));
            None
        }),
    };
    let entity_id = check_id("entity_id", &input.entity_id, true, &mut errors);
    let revenue = event_name.is_some_and(|e| e.is_revenue());
    let order_id = check_id("order_id", &input.order_id, false, &mut errors);
    if revenue
        && order_id.is_none()
        && input
            .order_id
            .as_deref()
            .is_none_or(|s| s.trim().is_empty())
    {
        errors.push(FieldError::new(
            "order_id",
            format!("is required for {}", event_name.map_or("", |e| e.as_str())),
        ));
    }

    let value = match input.value {
        None => {
            if revenue {
                errors.push(FieldError::new(
                    "value",
                    format!("is required for {}", event_name.map_or("", |e| e.as_str())),
                ));
            }
            None
        }
        Some(v) if !v.is_finite() => {
            errors.push(FieldError::new("value", "must be a finite number"));
            None
        }
        Some(v) if v < 0.0 => {
            errors.push(FieldError::new("value", "must not be negative"));
            None
        }
        Some(v) => match Money::from_f64(v) {
            None => {
                errors.push(FieldError::new("value", "is implausibly large (over 1e12)"));
                None
            }
            Some(m) if m == Money::ZERO && event_name == Some(EventName::Refund) => {
                errors.push(FieldError::new(
                    "value",
                    "must be positive for refund (the amount refunded)",
                ));
                None
            }
            Some(m) => Some(m),
        },
    };
    let currency = match input.currency.as_deref().map(str::trim) {
        None | Some("") => {
            if revenue || input.value.is_some() {
                errors.push(FieldError::new(
                    "currency",
                    "is required when value is given",
                ));
            }
            None
        }
        Some(c) => currency_code(c).or_else(|| {
            errors.push(FieldError::new(
                "currency",
                "is not an ISO 4217 currency code",
            ));
            None
        }),
    };

    let provided_id = match input.event_id.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(s) if s.len() > 128 => {
            errors.push(FieldError::new("event_id", "longer than 128 characters"));
            None
        }
        Some(s) if !s.bytes().all(|b| b.is_ascii_graphic()) => {
            errors.push(FieldError::new(
                "event_id",
                "must be printable ASCII without spaces",
            ));
            None
        }
        Some(s) => Some(s.to_string()),
    };

    let crm_stage = check_id("crm_stage", &input.crm_stage, false, &mut errors);
    let consent = validate_consent(input.consent.as_ref(), ctx.default_consent, &mut errors);

    if !errors.is_empty() {
        return Err(errors);
    }
    // Every required field passed validation above; the `else` arm is unreachable in practice
    // but keeps this path free of panics.
    let (Some(source), Some(event_name), Some(occurred_at), Some(entity_type), Some(entity_id)) =
        (source, event_name, occurred_at, entity_type, entity_id)
    else {
        return Err(vec![FieldError::new("$", "incomplete event")]);
    };

    let (event_id, event_id_origin): (String, EventIdOrigin) = match provided_id {
        Some(id) => (id, EventIdOrigin::Provided),
        None => (
            derive_event_id(
                &source,
                event_name,
                entity_type,
                &entity_id,
                occurred_at,
                order_id.as_deref(),
            ),
            EventIdOrigin::Derived,
        ),
    };
    let id_ctx = IdentityContext {
        default_region: ctx.default_region,
        occurred_at_ms: occurred_at.unix_ms(),
    };
    let (identity, warnings) = identity::normalize(&input.identity, &id_ctx);

    Ok(CanonicalEvent {
        key: store_key(&source, &event_id, event_id_origin),
        event_id,
        event_id_origin,
        source,
        event_name,
        crm_stage,
        occurred_at,
        received_at: ctx.now,
        entity_type,
        entity_id,
        order_id,
        value,
        currency,
        identity,
        warnings,
        consent,
        mapping_version: ctx.mapping_version.clone(),
        destinations: BTreeMap::new(),
    })
}

fn validate_consent(
    input: Option<&ConsentInput>,
    default: ConsentStatus,
    errors: &mut Vec<FieldError>,
) -> Consent {
    let Some(c) = input else {
        return Consent {
            status: default,
            origin: ConsentOrigin::SourceDefault,
            ..Default::default()
        };
    };
    let status = match c.status.as_deref() {
        None | Some("") => None,
        Some(s) => ConsentStatus::parse(s).or_else(|| {
            errors.push(FieldError::new(
                "consent.status",
                "must be one of granted, denied, unknown",
            ));
            None
        }),
    };
    let signal = |field: &str, v: &Option<String>, errors: &mut Vec<FieldError>| match v.as_deref()
    {
        None | Some("") => None,
        Some(s) => GoogleSignal::parse(s).or_else(|| {
            errors.push(FieldError::new(field, "must be granted or denied"));
            None
        }),
    };
    let ad_user_data = signal("consent.ad_user_data", &c.ad_user_data, errors);
    let ad_personalization = signal("consent.ad_personalization", &c.ad_personalization, errors);
    let captured_at = match c.captured_at.as_deref() {
        None | Some("") => None,
        Some(s) => Timestamp::parse_rfc3339(s)
            .map_err(|e| errors.push(FieldError::new("consent.captured_at", e.to_string())))
            .ok(),
    };
    let (status, origin) = match status {
        Some(s) => (s, ConsentOrigin::Payload),
        None => (default, ConsentOrigin::SourceDefault),
    };
    Consent {
        status,
        basis: c
            .basis
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.chars().take(64).collect()),
        captured_at,
        ad_user_data,
        ad_personalization,
        origin,
    }
}

/// The store key of an event: the event_id when derived here (the source is already part of
/// its hash), else `<source>:<event_id>`, so a caller-provided id is scoped by the source that
/// sent it and one source can never pre-claim another's event. (Sources are `[a-z0-9_-]`, so
/// the first `:` ends the source.)
pub fn store_key(source: &str, event_id: &str, origin: EventIdOrigin) -> String {
    match origin {
        EventIdOrigin::Derived => event_id.to_string(),
        EventIdOrigin::Provided => format!("{source}:{event_id}"),
    }
}

/// SHA-256 hex of `source|event_name|entity_type|entity_id|occurred_at`, plus `|order_id` for
/// revenue events, over the canonical UTC millisecond form of `occurred_at`.
///
/// Pinned by golden tests: changing this function re-keys every event ever stored and breaks
/// deduplication at the platforms, so it must never change.
pub fn derive_event_id(
    source: &str,
    event_name: EventName,
    entity_type: EntityType,
    entity_id: &str,
    occurred_at: Timestamp,
    order_id: Option<&str>,
) -> String {
    let at = occurred_at.canonical();
    let mut parts = vec![
        source,
        event_name.as_str(),
        entity_type.as_str(),
        entity_id,
        at.as_str(),
    ];
    if event_name.is_revenue() {
        parts.push(order_id.unwrap_or_default());
    }
    sha256_hex_joined(&parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hashing::sha256_hex;
    use serde_json::json;

    fn ctx() -> ValidationContext {
        ValidationContext {
            now: Timestamp::parse_rfc3339("2026-11-28T12:00:00Z").unwrap(),
            max_future_skew_secs: 300,
            default_region: phonenumber::country::Id::US,
            mapping_version: "test-1".into(),
            default_consent: ConsentStatus::Unknown,
        }
    }

    fn won() -> Value {
        json!({
            "source": "hubspot", "event_name": "won", "occurred_at": "2026-11-27T10:00:00-05:00",
            "entity_type": "opportunity", "entity_id": "D-1", "order_id": "ORD-1",
            "value": 1200.5, "currency": "usd",
            "identity": {"email": " Jane@Example.com ", "phone": "+1 650 555 1234", "gclid": "abc"},
            "consent": {"status": "granted", "basis": "consent"}
        })
    }

    /// Validates through both readers and checks they agree.
    fn check(v: Value) -> Result<CanonicalEvent, Vec<FieldError>> {
        let slow = parse_event(&v).and_then(|i| validate(&i, &ctx()));
        let fast = parse_event_json(&v.to_string()).and_then(|i| validate(&i, &ctx()));
        assert_eq!(
            fast, slow,
            "the typed fast path and the field reader disagree"
        );
        slow
    }

    #[test]
    fn malformed_json_is_named() {
        let errs = parse_event_json("{\"source\": ").unwrap_err();
        assert_eq!(errs[0].field, "$");
        assert!(errs[0].reason.starts_with("not valid JSON"));
    }

    fn fields(r: Result<CanonicalEvent, Vec<FieldError>>) -> Vec<String> {
        r.unwrap_err().into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn golden_event_ids() {
        // Pinned forever: these values are what platforms deduplicate on.
        let at = Timestamp::parse_rfc3339("2026-11-27T15:00:00Z").unwrap();
        let won = derive_event_id(
            "hubspot",
            EventName::Won,
            EntityType::Opportunity,
            "D-1",
            at,
            Some("ORD-1"),
        );
        assert_eq!(
            won,
            sha256_hex("hubspot|won|opportunity|D-1|2026-11-27T15:00:00.000Z|ORD-1")
        );
        let lead = derive_event_id(
            "generic",
            EventName::Lead,
            EntityType::Lead,
            "L-9",
            at,
            Some("ignored"),
        );
        assert_eq!(
            lead,
            sha256_hex("generic|lead|lead|L-9|2026-11-27T15:00:00.000Z")
        );
        assert_eq!(won, GOLDEN_WON);
        assert_eq!(lead, GOLDEN_LEAD);
    }

    const GOLDEN_WON: &str = "18ff468d4ac155defd58864b47fc0d1d845dd510ad5cbe4c8148a92845e28d80";
    const GOLDEN_LEAD: &str = "0da9d7a395838935e81e5d1db8ad094b916960b0c8c3dac344cffec4fd2050ad";

    #[test]
    fn valid_won_event() {
        let e = check(won()).unwrap();
        assert_eq!(e.event_name, EventName::Won);
        assert_eq!(e.currency.as_deref(), Some("USD"));
        assert_eq!(e.value, Money::from_f64(1200.5));
        assert_eq!(e.occurred_at.canonical(), "2026-11-27T15:00:00.000Z");
        assert_eq!(e.event_id_origin, EventIdOrigin::Derived);
        assert_eq!(e.event_id, GOLDEN_WON);
        assert_eq!(e.identity.meta.em, Some(sha256_hex("jane@example.com")));
        assert_eq!(e.consent.status, ConsentStatus::Granted);
        assert_eq!(e.consent.origin, ConsentOrigin::Payload);
        assert_eq!(e.mapping_version, "test-1");
    }

    #[test]
    fn same_instant_written_two_ways_gives_one_id() {
        let mut other = won();
        other["occurred_at"] = json!("2026-11-27T15:00:00.000Z");
        assert_eq!(
            check(won()).unwrap().event_id,
            check(other).unwrap().event_id
        );
    }

    #[test]
    fn provided_event_id_is_kept() {
        let mut v = won();
        v["event_id"] = json!("pixel-evt-42");
        let e = check(v).unwrap();
        assert_eq!(e.event_id, "pixel-evt-42");
        assert_eq!(e.event_id_origin, EventIdOrigin::Provided);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let v = json!({
            "source": "Hub Spot", "event_name": "closed", "occurred_at": "yesterday",
            "entity_type": "deal", "value": -5, "currency": "dollars", "bogus": 1,
            "consent": {"status": "maybe", "ad_user_data": "yes"}
        });
        let got = fields(check(v));
        assert_eq!(got, ["bogus"], "unknown fields are caught while parsing");
        let v = json!({
            "source": "Hub Spot", "event_name": "closed", "occurred_at": "yesterday",
            "entity_type": "deal", "value": -5, "currency": "dollars",
            "consent": {"status": "maybe", "ad_user_data": "yes"}
        });
        let got = fields(check(v));
        assert_eq!(
            got,
            [
                "source",
                "event_name",
                "occurred_at",
                "entity_type",
                "entity_id",
                "value",
                "currency",
                "consent.status",
                "consent.ad_user_data"
            ]
        );
    }

    #[test]
    fn won_needs_order_value_currency() {
        let v = json!({"source": "hubspot", "event_name": "won", "occurred_at": "2026-11-27T10:00:00Z",
            "entity_type": "opportunity", "entity_id": "D-1"});
        assert_eq!(fields(check(v)), ["order_id", "value", "currency"]);
    }

    #[test]
    fn refund_needs_positive_value() {
        let mut v = won();
        v["event_name"] = json!("refund");
        v["value"] = json!(0);
        let errs = check(v).unwrap_err();
        assert_eq!(errs[0].field, "value");
        assert!(errs[0].reason.contains("positive"));
    }

    #[test]
    fn future_beyond_skew_is_rejected_within_skew_accepted() {
        let mut v = won();
        v["occurred_at"] = json!("2026-11-28T12:04:00Z");
        assert!(check(v.clone()).is_ok());
        v["occurred_at"] = json!("2026-11-28T12:06:00Z");
        assert_eq!(fields(check(v)), ["occurred_at"]);
    }

    #[test]
    fn wrong_types_name_their_fields() {
        let v = json!({"source": "x", "event_name": "lead", "occurred_at": "2026-11-27T10:00:00Z",
            "entity_type": "lead", "entity_id": 42, "value": "12", "identity": {"email": ["a"]}, "consent": "yes"});
        assert_eq!(fields(check(v)), ["value", "identity.email", "consent"]);
        assert_eq!(fields(check(json!([1]))), ["$"]);
    }

    #[test]
    fn numeric_ids_are_accepted_as_text() {
        let v = json!({"source": "x", "event_name": "lead", "occurred_at": "2026-11-27T10:00:00Z",
            "entity_type": "lead", "entity_id": 42});
        assert_eq!(check(v).unwrap().entity_id, "42");
    }

    #[test]
    fn missing_consent_uses_the_default_and_says_so() {
        let mut v = won();
        v.as_object_mut().unwrap().remove("consent");
        let e = check(v).unwrap();
        assert_eq!(e.consent.status, ConsentStatus::Unknown);
        assert_eq!(e.consent.origin, ConsentOrigin::SourceDefault);
    }

    #[test]
    fn bad_identity_is_a_warning_not_an_error() {
        let mut v = won();
        v["identity"]["phone"] = json!("123");
        let e = check(v).unwrap();
        assert_eq!(e.warnings.len(), 1);
        assert_eq!(e.warnings[0].field, "identity.phone");
        assert!(e.identity.meta.ph.is_none());
    }

    #[test]
    fn stored_form_round_trips_and_holds_no_raw_pii() {
        let e = check(won()).unwrap();
        let text = serde_json::to_string(&e).unwrap();
        assert!(!text.to_lowercase().contains("jane@example.com"));
        assert!(!text.contains("650"));
        let back: CanonicalEvent = serde_json::from_str(&text).unwrap();
        assert_eq!(back, e);
    }
}
