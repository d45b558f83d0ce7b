//! Salesforce payloads, as posted by a Flow or Apex HTTP callout: lead status and opportunity
//! stage changes, mapped to lifecycle stages through the mapping contract.
//!
//! The expected shape (one object or an array; `events/salesforce-*.json` has examples):
//!
//! ```json
//! {
//!   "object": "Lead" | "Opportunity",
//!   "id": "006...",                         // the record id
//!   "stage": "Closed Won",                  // Lead.Status or Opportunity.StageName
//!   "changed_at": "2026-11-27T15:00:00Z",   // when the stage changed (business time)
//!   "amount": 1200.5, "currency": "USD",    // opportunities
//!   "order_id": "...",                      // optional; defaults to the opportunity id
//!   "event_id": "...",                      // optional: a browser Pixel's id for the same action
//!   "email": "...", "phone": "...", "first_name": "...", "last_name": "...",
//!   "city": "...", "state": "...", "postal_code": "...", "country": "US",
//!   "gclid": "...", "gbraid": "...", "wbraid": "...", "fbclid": "...", "fbp": "...", "fbc": "...",
//!   "consent": {"status": "granted", "basis": "...", "captured_at": "...",
//!               "ad_user_data": "granted", "ad_personalization": "granted"}
//! }
//! ```

use super::Incoming;
use crate::event::{ConsentInput, EventInput, FieldError};
use crate::identity::IdentityInput;
use crate::mapping::Mapping;
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SfChange {
    object: Option<String>,
    id: Option<String>,
    stage: Option<String>,
    changed_at: Option<String>,
    amount: Option<f64>,
    currency: Option<String>,
    order_id: Option<String>,
    event_id: Option<String>,
    email: Option<String>,
    phone: Option<String>,
    first_name: Option<String>,
    last_name: Option<String>,
    city: Option<String>,
    state: Option<String>,
    postal_code: Option<String>,
    country: Option<String>,
    gclid: Option<String>,
    gbraid: Option<String>,
    wbraid: Option<String>,
    fbclid: Option<String>,
    fbp: Option<String>,
    fbc: Option<String>,
    client_ip_address: Option<String>,
    client_user_agent: Option<String>,
    consent: Option<SfConsent>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SfConsent {
    status: Option<String>,
    basis: Option<String>,
    captured_at: Option<String>,
    ad_user_data: Option<String>,
    ad_personalization: Option<String>,
}

/// Reads one item; the source name is the path's (`salesforce`).
pub fn parse_item(raw: &str, source: &str, mapping: &Mapping) -> Incoming {
    let c: SfChange = match serde_json::from_str(raw) {
        Ok(c) => c,
        Err(e) => {
            return Incoming::Invalid(vec![FieldError::new(
                "$",
                format!("not a Salesforce change: {e}"),
            )]);
        }
    };
    let mut errors = Vec::new();
    let entity_type = match c.object.as_deref() {
        Some("Lead") => Some("lead"),
        Some("Opportunity") => Some("opportunity"),
        Some("Contact") => Some("contact"),
        Some(_) => {
            errors.push(FieldError::new(
                "object",
                "must be Lead, Contact or Opportunity",
            ));
            None
        }
        None => {
            errors.push(FieldError::new("object", "is required"));
            None
        }
    };
    let Some(stage) = c.stage.as_deref().map(str::trim).filter(|s| !s.is_empty()) else {
        errors.push(FieldError::new("stage", "is required"));
        return Incoming::Invalid(errors);
    };
    if !errors.is_empty() {
        return Incoming::Invalid(errors);
    }
    let Some(event_name) = mapping.lifecycle_for(source, stage) else {
        return Incoming::Unmapped {
            stage: stage.to_string(),
        };
    };
    let revenue = event_name.is_revenue();
    let order_id = c
        .order_id
        .or_else(|| revenue.then(|| c.id.clone()).flatten());
    Incoming::Event(Box::new(EventInput {
        event_id: c.event_id,
        source: Some(source.to_string()),
        event_name: Some(event_name.as_str().to_string()),
        crm_stage: Some(stage.to_string()),
        occurred_at: c.changed_at,
        entity_type: entity_type.map(str::to_string),
        entity_id: c.id,
        order_id,
        value: c.amount,
        currency: c.currency,
        identity: IdentityInput {
            email: c.email,
            phone: c.phone,
            first_name: c.first_name,
            last_name: c.last_name,
            city: c.city,
            state: c.state,
            zip: c.postal_code,
            country: c.country,
            gclid: c.gclid,
            gbraid: c.gbraid,
            wbraid: c.wbraid,
            fbclid: c.fbclid,
            fbp: c.fbp,
            fbc: c.fbc,
            client_ip_address: c.client_ip_address,
            client_user_agent: c.client_user_agent,
            ..Default::default()
        },
        consent: c.consent.map(|k| ConsentInput {
            status: k.status,
            basis: k.basis,
            captured_at: k.captured_at,
            ad_user_data: k.ad_user_data,
            ad_personalization: k.ad_personalization,
        }),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping() -> Mapping {
        Mapping::bundled().unwrap()
    }

    #[test]
    fn closed_won_becomes_won_with_the_opportunity_as_order() {
        let raw = r#"{"object":"Opportunity","id":"006A","stage":"Closed Won","changed_at":"2026-11-27T15:00:00Z",
                      "amount":900,"currency":"EUR","email":"a@b.co"}"#;
        let Incoming::Event(e) = parse_item(raw, "salesforce", &mapping()) else {
            panic!()
        };
        assert_eq!(e.event_name.as_deref(), Some("won"));
        assert_eq!(e.order_id.as_deref(), Some("006A"));
        assert_eq!(e.entity_type.as_deref(), Some("opportunity"));
        assert_eq!(e.crm_stage.as_deref(), Some("Closed Won"));
        assert_eq!(e.identity.email.as_deref(), Some("a@b.co"));
    }

    #[test]
    fn unmapped_and_invalid() {
        let raw = r#"{"object":"Lead","id":"00Q1","stage":"Nurturing","changed_at":"2026-11-27T15:00:00Z"}"#;
        assert!(
            matches!(parse_item(raw, "salesforce", &mapping()), Incoming::Unmapped { stage } if stage == "Nurturing")
        );
        let Incoming::Invalid(errs) =
            parse_item(r#"{"object":"Account","id":"1"}"#, "salesforce", &mapping())
        else {
            panic!()
        };
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["object", "stage"]);
        let Incoming::Invalid(errs) = parse_item(
            r#"{"object":"Lead","colour":"red"}"#,
            "salesforce",
            &mapping(),
        ) else {
            panic!()
        };
        assert!(errs[0].reason.contains("colour"));
    }
}
