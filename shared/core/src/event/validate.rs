//! Validation: an input becomes a canonical event, with every problem reported at once, each
//! naming its field and the reason. Identity problems are warnings, never errors.

use super::{
    CanonicalEvent, ConsentInput, EntityType, EventIdOrigin, EventInput, EventName, FieldError,
    derive_event_id, store_key,
};
use crate::consent::{Consent, ConsentOrigin, ConsentStatus, GoogleSignal};
use crate::identity::{self, IdentityContext};
use crate::money::{Money, currency_code};
use crate::timestamp::Timestamp;
use std::collections::BTreeMap;

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
        correction: None,
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
