//! Reading an event in the generic JSON shape: a typed, borrowing fast path for well-formed
//! input, and a field-by-field reader that names every wrong or unknown field. The identity and
//! consent fields come from their one declaration (`string_fields!`).

use super::FieldError;
use super::fields::{nested, string_field, string_fields, unknown_fields};
use crate::identity::{FastIdentity, IdentityInput, read_identity};
use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;

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

string_fields! {
    /// Consent as a source states it (every field optional; validation names bad values).
    ConsentInput / FastConsent, CONSENT_FIELDS, read_consent {
        status,
        basis,
        captured_at,
        ad_user_data,
        ad_personalization,
    }
}

impl std::fmt::Debug for ConsentInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsentInput")
            .field("status", &self.status)
            .field("basis", &self.basis)
            .field("captured_at", &self.captured_at)
            .field("ad_user_data", &self.ad_user_data)
            .field("ad_personalization", &self.ad_personalization)
            .finish()
    }
}

/// The top level of the generic shape, borrowed from the request body. Anything it rejects (an
/// unknown field, a wrong type) goes through [`parse_event`], which names every problem.
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

fn own(v: Option<Cow<'_, str>>) -> Option<String> {
    v.map(Cow::into_owned)
}

/// Reads one event in the generic JSON shape from its text: a typed, borrowing parse for
/// well-formed input, and the field-by-field reader for anything else, so every problem is
/// still named.
pub fn parse_event_json(raw: &str) -> Result<EventInput, Vec<FieldError>> {
    match serde_json::from_str::<FastEvent<'_>>(raw) {
        Ok(f) => Ok(EventInput {
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
            identity: f.identity.map(FastIdentity::own).unwrap_or_default(),
            consent: f.consent.map(FastConsent::own),
        }),
        Err(_) => match serde_json::from_str::<Value>(raw) {
            Ok(v) => parse_event(&v),
            Err(e) => Err(vec![FieldError::new("$", format!("not valid JSON: {e}"))]),
        },
    }
}

/// Reads the generic JSON shape, collecting a [`FieldError`] for every wrongly typed or
/// unknown field instead of stopping at the first.
pub fn parse_event(v: &Value) -> Result<EventInput, Vec<FieldError>> {
    let mut errors = Vec::new();
    let Some(obj) = v.as_object() else {
        return Err(vec![FieldError::new("$", "an event must be a JSON object")]);
    };
    unknown_fields(obj, TOP_FIELDS, "", &mut errors);
    let top = |k: &str, errors: &mut Vec<FieldError>| string_field(obj, k, "", errors);
    let mut input = EventInput {
        event_id: top("event_id", &mut errors),
        source: top("source", &mut errors),
        event_name: top("event_name", &mut errors),
        crm_stage: top("crm_stage", &mut errors),
        occurred_at: top("occurred_at", &mut errors),
        entity_type: top("entity_type", &mut errors),
        entity_id: top("entity_id", &mut errors),
        order_id: top("order_id", &mut errors),
        value: None,
        currency: top("currency", &mut errors),
        identity: IdentityInput::default(),
        consent: None,
    };
    match obj.get("value") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) => input.value = n.as_f64(),
        Some(_) => errors.push(FieldError::new("value", "must be a number")),
    }
    if let Some(id) = nested(obj, "identity", &mut errors) {
        input.identity = read_identity(id, "identity.", &mut errors);
    }
    if let Some(c) = nested(obj, "consent", &mut errors) {
        input.consent = Some(read_consent(c, "consent.", &mut errors));
    }
    if errors.is_empty() {
        Ok(input)
    } else {
        Err(errors)
    }
}
