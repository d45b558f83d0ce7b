//! The canonical event: what one CRM lifecycle change becomes (`CanonicalEvent`), how its
//! input is read (`input`, with its fields declared once in `fields`), validated with every
//! problem named (`validate`), and identified (`id`: the deterministic event_id and the store
//! key).

pub mod fields;
mod id;
mod input;
mod validate;

pub use id::{derive_event_id, store_key};
pub use input::{ConsentInput, EventInput, parse_event, parse_event_json};
pub use validate::{ValidationContext, validate};

use crate::consent::Consent;
use crate::delivery::{Destination, DestinationState};
use crate::identity::{HashedIdentity, IdentityWarning};
use crate::money::Money;
use crate::timestamp::Timestamp;
use serde::{Deserialize, Serialize};
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
    /// An operator's correction of a won delivered under a conversion action the mapping no
    /// longer maps it to (see [`crate::correction`]). Never from a CRM: not in [`Self::ALL`],
    /// so no webhook and no mapping can name it.
    Correction,
}

impl EventName {
    /// The CRM lifecycle stages: what an input or a mapping may name.
    pub const ALL: [EventName; 5] = [Self::Lead, Self::Mql, Self::Sql, Self::Won, Self::Refund];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Lead => "lead",
            Self::Mql => "mql",
            Self::Sql => "sql",
            Self::Won => "won",
            Self::Refund => "refund",
            Self::Correction => "correction",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }

    /// Revenue events carry money and an order id, and only the system of record may emit them.
    /// A correction carries its won's: it is read with the order's other events.
    pub fn is_revenue(&self) -> bool {
        matches!(self, Self::Won | Self::Refund | Self::Correction)
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
    /// Set on a correction event only: which won it corrects, which step it is, and the
    /// actions and mapping versions on both sides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correction: Option<crate::correction::Correction>,
    #[serde(default)]
    pub destinations: BTreeMap<Destination, DestinationState>,
}

impl CanonicalEvent {
    /// The correction step this event is, if it is one.
    pub fn correction_step(&self) -> Option<crate::correction::CorrectionStep> {
        self.correction.as_ref().map(|c| c.step)
    }

    /// An event the bridge makes for `won`'s order (a correction step, a restatement): the
    /// won's source, record, order, times, value, identity hashes, consent and mapping version,
    /// under `event_id` (also its key), with a pending pair at each of `destinations` that
    /// keeps the won's consent decision there. Callers change what differs.
    pub fn derived_from_won(
        won: &CanonicalEvent,
        event_id: String,
        event_name: EventName,
        destinations: impl IntoIterator<Item = Destination>,
        now: Timestamp,
    ) -> CanonicalEvent {
        let destinations = destinations
            .into_iter()
            .map(|d| {
                let mut state =
                    DestinationState::new(crate::delivery::DeliveryStatus::Pending, now);
                state.consent_reason = won
                    .destinations
                    .get(&d)
                    .and_then(|s| s.consent_reason.clone());
                (d, state)
            })
            .collect();
        CanonicalEvent {
            key: event_id.clone(),
            event_id,
            event_id_origin: EventIdOrigin::Derived,
            source: won.source.clone(),
            event_name,
            crm_stage: None,
            occurred_at: won.occurred_at,
            received_at: won.received_at,
            entity_type: won.entity_type,
            entity_id: won.entity_id.clone(),
            order_id: won.order_id.clone(),
            value: won.value,
            currency: won.currency.clone(),
            identity: won.identity.clone(),
            warnings: Vec::new(),
            consent: won.consent.clone(),
            mapping_version: won.mapping_version.clone(),
            correction: None,
            destinations,
        }
    }
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

#[cfg(test)]
mod tests;
