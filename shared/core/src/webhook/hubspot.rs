//! HubSpot webhook subscriptions (contact `lifecyclestage`, deal `dealstage`): the webhook
//! carries ids only, so each change is completed from the CRM record before it is mapped.
//!
//! Consent is read from contact properties: `ads_consent_status` (granted | denied | unknown),
//! `ads_consent_captured_at`, `ad_user_data`, `ad_personalization` (granted | denied) and
//! HubSpot's `hs_legal_basis` as the basis. Click ids from `hs_google_click_id` (gclid),
//! `gbraid`, `wbraid`, `hs_facebook_click_id` (fbclid), `fbp`, `fbc`.

use super::Incoming;
use crate::event::{ConsentInput, EventInput, FieldError};
use crate::identity::IdentityInput;
use crate::mapping::Mapping;
use crate::timestamp::Timestamp;
use async_trait::async_trait;
use serde::Deserialize;
use std::collections::HashMap;

/// One subscription event of a HubSpot webhook delivery.
#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct HubSpotEvent {
    pub event_id: Option<i64>,
    pub subscription_type: String,
    pub object_id: i64,
    pub occurred_at: i64,
    pub property_name: Option<String>,
    pub property_value: Option<String>,
}

pub type Properties = HashMap<String, Option<String>>;

pub const CONTACT_PROPERTIES: &[&str] = &[
    "email",
    "phone",
    "mobilephone",
    "firstname",
    "lastname",
    "city",
    "state",
    "zip",
    "country",
    "hs_google_click_id",
    "gbraid",
    "wbraid",
    "hs_facebook_click_id",
    "fbp",
    "fbc",
    "ads_consent_status",
    "ads_consent_captured_at",
    "ad_user_data",
    "ad_personalization",
    "hs_legal_basis",
];
pub const DEAL_PROPERTIES: &[&str] = &["amount", "deal_currency_code", "dealstage"];

#[derive(Debug, thiserror::Error)]
pub enum CrmError {
    #[error("HubSpot API unavailable: {0}")]
    Unavailable(String),
    #[error("HubSpot API refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
}

/// The CRM records a change needs. Implemented over HTTP by [`HubSpotClient`].
#[async_trait]
pub trait HubSpotRecords: Send + Sync {
    async fn contact(&self, id: &str) -> Result<Option<Properties>, CrmError>;
    /// The deal's properties and the id of its first associated contact.
    async fn deal(&self, id: &str) -> Result<Option<(Properties, Option<String>)>, CrmError>;
}

/// Reads a delivery body: an array of subscription events.
pub fn parse_delivery(body: &str, max: usize) -> Result<Vec<HubSpotEvent>, FieldError> {
    let events: Vec<HubSpotEvent> = serde_json::from_str(body)
        .map_err(|e| FieldError::new("$", format!("not a HubSpot webhook delivery: {e}")))?;
    if events.len() > max {
        return Err(FieldError::new(
            "$",
            format!("{} events; at most {max} per request", events.len()),
        ));
    }
    Ok(events)
}

fn prop(p: &Properties, k: &str) -> Option<String> {
    p.get(k)
        .cloned()
        .flatten()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Completes every event of a delivery from the CRM and maps it. Fetches run concurrently.
pub async fn resolve(
    events: &[HubSpotEvent],
    api: &dyn HubSpotRecords,
    mapping: &Mapping,
) -> Vec<Incoming> {
    futures::future::join_all(events.iter().map(|e| resolve_one(e, api, mapping))).await
}

async fn resolve_one(e: &HubSpotEvent, api: &dyn HubSpotRecords, mapping: &Mapping) -> Incoming {
    let (entity_type, expected_property) = match e.subscription_type.as_str() {
        "contact.propertyChange" => ("contact", "lifecyclestage"),
        "deal.propertyChange" => ("opportunity", "dealstage"),
        other => {
            return Incoming::Invalid(vec![FieldError::new(
                "subscriptionType",
                format!("`{other}` is not a supported subscription"),
            )]);
        }
    };
    if e.property_name.as_deref() != Some(expected_property) {
        return Incoming::Invalid(vec![FieldError::new(
            "propertyName",
            format!("must be {expected_property}"),
        )]);
    }
    let Some(stage) = e
        .property_value
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    else {
        return Incoming::Invalid(vec![FieldError::new("propertyValue", "is required")]);
    };
    let Some(event_name) = mapping.lifecycle_for("hubspot", stage) else {
        return Incoming::Unmapped {
            stage: stage.to_string(),
        };
    };
    let id = e.object_id.to_string();
    let (deal, contact_id) = if entity_type == "opportunity" {
        match api.deal(&id).await {
            Ok(Some((props, contact))) => (Some(props), contact),
            Ok(None) => {
                return Incoming::Invalid(vec![FieldError::new(
                    "objectId",
                    "deal not found in HubSpot",
                )]);
            }
            Err(err) => return Incoming::Unavailable(err.to_string()),
        }
    } else {
        (None, Some(id.clone()))
    };
    let contact = match contact_id {
        Some(cid) => match api.contact(&cid).await {
            Ok(c) => c,
            Err(err) => return Incoming::Unavailable(err.to_string()),
        },
        None => None,
    };
    if entity_type == "contact" && contact.is_none() {
        return Incoming::Invalid(vec![FieldError::new(
            "objectId",
            "contact not found in HubSpot",
        )]);
    }
    let c = contact.unwrap_or_default();
    let revenue = event_name.is_revenue();
    let (value, currency) = match &deal {
        Some(d) => (
            prop(d, "amount").and_then(|a| a.parse::<f64>().ok()),
            prop(d, "deal_currency_code"),
        ),
        None => (None, None),
    };
    let consent = [
        "ads_consent_status",
        "ads_consent_captured_at",
        "ad_user_data",
        "ad_personalization",
        "hs_legal_basis",
    ]
    .iter()
    .any(|k| prop(&c, k).is_some())
    .then(|| ConsentInput {
        status: prop(&c, "ads_consent_status"),
        basis: prop(&c, "hs_legal_basis"),
        captured_at: prop(&c, "ads_consent_captured_at"),
        ad_user_data: prop(&c, "ad_user_data"),
        ad_personalization: prop(&c, "ad_personalization"),
    });
    Incoming::Event(Box::new(EventInput {
        event_id: None,
        source: Some("hubspot".into()),
        event_name: Some(event_name.as_str().into()),
        crm_stage: Some(stage.to_string()),
        occurred_at: Some(Timestamp::from_unix_ms(e.occurred_at).canonical()),
        entity_type: Some(entity_type.into()),
        entity_id: Some(id.clone()),
        order_id: revenue.then_some(id),
        value,
        currency,
        identity: IdentityInput {
            email: prop(&c, "email"),
            phone: prop(&c, "phone").or_else(|| prop(&c, "mobilephone")),
            first_name: prop(&c, "firstname"),
            last_name: prop(&c, "lastname"),
            city: prop(&c, "city"),
            state: prop(&c, "state"),
            zip: prop(&c, "zip"),
            country: prop(&c, "country"),
            gclid: prop(&c, "hs_google_click_id"),
            gbraid: prop(&c, "gbraid"),
            wbraid: prop(&c, "wbraid"),
            fbclid: prop(&c, "hs_facebook_click_id"),
            fbp: prop(&c, "fbp"),
            fbc: prop(&c, "fbc"),
            ..Default::default()
        },
        consent,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct FakeRecords {
        contacts: HashMap<String, Properties>,
        deals: HashMap<String, (Properties, Option<String>)>,
        down: bool,
        calls: Mutex<usize>,
    }

    #[async_trait]
    impl HubSpotRecords for FakeRecords {
        async fn contact(&self, id: &str) -> Result<Option<Properties>, CrmError> {
            *self.calls.lock().unwrap() += 1;
            if self.down {
                return Err(CrmError::Unavailable("HTTP 503".into()));
            }
            Ok(self.contacts.get(id).cloned())
        }
        async fn deal(&self, id: &str) -> Result<Option<(Properties, Option<String>)>, CrmError> {
            *self.calls.lock().unwrap() += 1;
            Ok(self.deals.get(id).cloned())
        }
    }

    fn props(pairs: &[(&str, &str)]) -> Properties {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Some(v.to_string())))
            .collect()
    }

    fn fake() -> FakeRecords {
        FakeRecords {
            contacts: HashMap::from([(
                "101".to_string(),
                props(&[
                    ("email", "ada@example.com"),
                    ("firstname", "Ada"),
                    ("hs_google_click_id", "gc-1"),
                    ("ads_consent_status", "granted"),
                    ("hs_legal_basis", "Freely given consent"),
                ]),
            )]),
            deals: HashMap::from([(
                "9001".to_string(),
                (
                    props(&[
                        ("amount", "1500.50"),
                        ("deal_currency_code", "EUR"),
                        ("dealstage", "closedwon"),
                    ]),
                    Some("101".to_string()),
                ),
            )]),
            ..Default::default()
        }
    }

    fn event(kind: &str, id: i64, prop: &str, value: &str) -> HubSpotEvent {
        HubSpotEvent {
            event_id: Some(1),
            subscription_type: kind.into(),
            object_id: id,
            occurred_at: 1_764_255_600_000,
            property_name: Some(prop.into()),
            property_value: Some(value.into()),
        }
    }

    #[tokio::test]
    async fn deal_closed_won_is_completed_from_the_deal_and_its_contact() {
        let m = Mapping::bundled().unwrap();
        let out = resolve(
            &[event("deal.propertyChange", 9001, "dealstage", "closedwon")],
            &fake(),
            &m,
        )
        .await;
        let Incoming::Event(e) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(e.event_name.as_deref(), Some("won"));
        assert_eq!(e.order_id.as_deref(), Some("9001"));
        assert_eq!(e.value, Some(1500.5));
        assert_eq!(e.currency.as_deref(), Some("EUR"));
        assert_eq!(e.identity.email.as_deref(), Some("ada@example.com"));
        assert_eq!(e.identity.gclid.as_deref(), Some("gc-1"));
        assert_eq!(e.occurred_at.as_deref(), Some("2025-11-27T15:00:00.000Z"));
        let c = e.consent.as_ref().unwrap();
        assert_eq!(
            (c.status.as_deref(), c.basis.as_deref()),
            (Some("granted"), Some("Freely given consent"))
        );
    }

    #[tokio::test]
    async fn contact_lifecycle_unmapped_missing_and_outage() {
        let m = Mapping::bundled().unwrap();
        let f = fake();
        let out = resolve(
            &[
                event(
                    "contact.propertyChange",
                    101,
                    "lifecyclestage",
                    "marketingqualifiedlead",
                ),
                event(
                    "contact.propertyChange",
                    101,
                    "lifecyclestage",
                    "evangelist",
                ),
                event("contact.propertyChange", 404, "lifecyclestage", "lead"),
                event("contact.creation", 101, "lifecyclestage", "lead"),
            ],
            &f,
            &m,
        )
        .await;
        assert!(
            matches!(&out[0], Incoming::Event(e) if e.event_name.as_deref() == Some("mql") && e.entity_type.as_deref() == Some("contact"))
        );
        assert!(matches!(&out[1], Incoming::Unmapped { stage } if stage == "evangelist"));
        assert!(matches!(&out[2], Incoming::Invalid(e) if e[0].reason.contains("not found")));
        assert!(matches!(&out[3], Incoming::Invalid(e) if e[0].field == "subscriptionType"));
        assert_eq!(
            *f.calls.lock().unwrap(),
            2,
            "unmapped and unsupported changes fetch nothing"
        );
        let down = FakeRecords {
            down: true,
            ..fake()
        };
        let out = resolve(
            &[event(
                "contact.propertyChange",
                101,
                "lifecyclestage",
                "lead",
            )],
            &down,
            &m,
        )
        .await;
        assert!(matches!(&out[0], Incoming::Unavailable(_)));
    }
}
