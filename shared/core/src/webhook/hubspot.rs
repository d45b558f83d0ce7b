//! HubSpot webhook subscriptions (contact `lifecyclestage`, deal `dealstage`): the webhook
//! carries ids only, so each change is checked and completed from the CRM record before it is
//! mapped.
//!
//! Trust: an event must name the configured HubSpot account (`portalId`), and the record's own
//! stage history must show the webhook's `propertyValue` at its `occurredAt` (webhooks arrive
//! late and out of order, so the history is the witness, not the current stage). A foreign or
//! unconfirmed change is dropped with a reason. An event whose id is already stored is answered
//! as a duplicate without a fetch.
//!
//! Consent is read from contact properties: `ads_consent_status` (granted | denied | unknown),
//! `ads_consent_captured_at`, `ad_user_data`, `ad_personalization` (granted | denied) and
//! HubSpot's `hs_legal_basis` as the basis. Click ids from `hs_google_click_id` (gclid),
//! `gbraid`, `wbraid`, `hs_facebook_click_id` (fbclid, first seen per its history), `fbp`,
//! `fbc`.

use super::Incoming;
use crate::event::{
    ConsentInput, EntityType, EventIdOrigin, EventInput, EventName, FieldError, derive_event_id,
    store_key,
};
use crate::identity::IdentityInput;
use crate::mapping::Mapping;
use crate::timestamp::Timestamp;
use async_trait::async_trait;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};

/// One subscription event of a HubSpot webhook delivery.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HubSpotEvent {
    pub event_id: Option<i64>,
    /// The HubSpot account the change happened in.
    #[serde(default)]
    pub portal_id: Option<i64>,
    pub subscription_type: String,
    pub object_id: i64,
    pub occurred_at: i64,
    pub property_name: Option<String>,
    pub property_value: Option<String>,
}

pub type Properties = HashMap<String, Option<String>>;

/// One past value of a property: `propertiesWithHistory` entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    pub value: String,
    pub at: Timestamp,
}

/// A CRM record as the webhook needs it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HubSpotRecord {
    pub properties: Properties,
    /// Property name -> its values over time (any order).
    pub history: HashMap<String, Vec<HistoryEntry>>,
    /// For a deal: its first associated contact.
    pub contact_id: Option<String>,
}

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
/// The histories asked for with each record.
pub const CONTACT_HISTORY: &[&str] = &["lifecyclestage", "hs_facebook_click_id"];
pub const DEAL_HISTORY: &[&str] = &["dealstage"];

#[derive(Debug, thiserror::Error)]
pub enum CrmError {
    #[error("HubSpot API unavailable: {0}")]
    Unavailable(String),
    /// HubSpot's 429: its rate limits are per account and window.
    #[error("HubSpot API rate limit reached")]
    Throttled { retry_after_secs: Option<u64> },
    #[error("HubSpot API refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
}

/// The CRM records a change needs. Implemented over HTTP in `bridge-platforms`.
#[async_trait]
pub trait HubSpotRecords: Send + Sync {
    async fn contact(&self, id: &str) -> Result<Option<HubSpotRecord>, CrmError>;
    async fn deal(&self, id: &str) -> Result<Option<HubSpotRecord>, CrmError>;
}

/// How a delivery is checked and completed.
#[derive(Clone, Debug)]
pub struct ResolveOptions {
    /// The HubSpot account (`portalId`) the bridge serves; events from any other are dropped.
    /// `None` only where no account is configured (tests).
    pub portal_id: Option<i64>,
    /// How far the history entry of the change may be from the webhook's `occurredAt`.
    pub confirm_window_ms: i64,
    /// CRM reads in flight at once for one delivery.
    pub max_concurrent: usize,
}

impl Default for ResolveOptions {
    fn default() -> Self {
        ResolveOptions {
            portal_id: None,
            confirm_window_ms: 300_000,
            max_concurrent: 8,
        }
    }
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

/// What a supported change is, before any CRM read: its entity type, lifecycle stage and the
/// stage value. `Err` is the item's answer (invalid, unmapped).
fn classify(
    e: &HubSpotEvent,
    mapping: &Mapping,
) -> Result<(EntityType, EventName, String), Incoming> {
    let (entity_type, expected_property) = match e.subscription_type.as_str() {
        "contact.propertyChange" => (EntityType::Contact, "lifecyclestage"),
        "deal.propertyChange" => (EntityType::Opportunity, "dealstage"),
        other => {
            return Err(Incoming::Invalid(vec![FieldError::new(
                "subscriptionType",
                format!("`{other}` is not a supported subscription"),
            )]));
        }
    };
    if e.property_name.as_deref() != Some(expected_property) {
        return Err(Incoming::Invalid(vec![FieldError::new(
            "propertyName",
            format!("must be {expected_property}"),
        )]));
    }
    let Some(stage) = e
        .property_value
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    else {
        return Err(Incoming::Invalid(vec![FieldError::new(
            "propertyValue",
            "is required",
        )]));
    };
    let Some(event_name) = mapping.lifecycle_for("hubspot", stage) else {
        return Err(Incoming::Unmapped {
            stage: stage.to_string(),
        });
    };
    Ok((entity_type, event_name, stage.to_string()))
}

/// The store key the change will have, derived before any CRM read, so a redelivered webhook
/// of a stored change costs no fetch. `None` for changes that will not become events.
pub fn event_key(e: &HubSpotEvent, mapping: &Mapping) -> Option<String> {
    let (entity_type, event_name, _) = classify(e, mapping).ok()?;
    let id = e.object_id.to_string();
    let event_id = derive_event_id(
        "hubspot",
        event_name,
        entity_type,
        &id,
        Timestamp::from_unix_ms(e.occurred_at),
        event_name.is_revenue().then_some(id.as_str()),
    );
    Some(store_key("hubspot", &event_id, EventIdOrigin::Derived))
}

/// Checks and completes every event of a delivery from the CRM, at most
/// `opts.max_concurrent` reads at a time. `stored` holds the keys already in the store.
pub async fn resolve(
    events: &[HubSpotEvent],
    api: &dyn HubSpotRecords,
    mapping: &Mapping,
    opts: &ResolveOptions,
    stored: &HashSet<String>,
) -> Vec<Incoming> {
    let mut out = Vec::with_capacity(events.len());
    for chunk in events.chunks(opts.max_concurrent.max(1)) {
        out.extend(
            futures::future::join_all(
                chunk
                    .iter()
                    .map(|e| resolve_one(e, api, mapping, opts, stored)),
            )
            .await,
        );
    }
    out
}

fn dropped(field: &str, reason: impl Into<String>) -> Incoming {
    Incoming::Ignored(FieldError::new(field, reason))
}

fn unavailable(err: CrmError) -> Incoming {
    match err {
        CrmError::Throttled { retry_after_secs } => Incoming::Throttled { retry_after_secs },
        other => Incoming::Unavailable(other.to_string()),
    }
}

/// Whether the record's history of `property` shows `value` within `window_ms` of `at_ms`.
fn confirmed(
    record: &HubSpotRecord,
    property: &str,
    value: &str,
    at_ms: i64,
    window_ms: i64,
) -> bool {
    record.history.get(property).is_some_and(|h| {
        h.iter().any(|entry| {
            entry.value == value
                && entry
                    .at
                    .unix_ms()
                    .checked_sub(at_ms)
                    .and_then(i64::checked_abs)
                    .is_some_and(|d| d <= window_ms)
        })
    })
}

async fn resolve_one(
    e: &HubSpotEvent,
    api: &dyn HubSpotRecords,
    mapping: &Mapping,
    opts: &ResolveOptions,
    stored: &HashSet<String>,
) -> Incoming {
    if let Some(portal) = opts.portal_id
        && e.portal_id != Some(portal)
    {
        return dropped(
            "portalId",
            "not the HubSpot account this bridge is configured for",
        );
    }
    if e.subscription_type == "contact.privacyDeletion" {
        // GDPR deletion in HubSpot: the payload names the contact only (no email); its events
        // and every event sharing its email or phone are erased. source: HS-WH
        return Incoming::Erase {
            source: "hubspot".into(),
            entity_id: e.object_id.to_string(),
        };
    }
    let (entity_type, event_name, stage) = match classify(e, mapping) {
        Ok(c) => c,
        Err(answer) => return answer,
    };
    if let Some(key) = event_key(e, mapping)
        && stored.contains(&key)
    {
        return Incoming::Stored { event_id: key };
    }
    let id = e.object_id.to_string();
    let (deal, contact_id, history_of) = if entity_type == EntityType::Opportunity {
        match api.deal(&id).await {
            Ok(Some(d)) => {
                let contact = d.contact_id.clone();
                (Some(d), contact, "dealstage")
            }
            Ok(None) => {
                return Incoming::Invalid(vec![FieldError::new(
                    "objectId",
                    "deal not found in HubSpot",
                )]);
            }
            Err(err) => return unavailable(err),
        }
    } else {
        (None, Some(id.clone()), "lifecyclestage")
    };
    let contact = match contact_id {
        Some(cid) => match api.contact(&cid).await {
            Ok(c) => c,
            Err(err) => return unavailable(err),
        },
        None => None,
    };
    if entity_type == EntityType::Contact && contact.is_none() {
        return Incoming::Invalid(vec![FieldError::new(
            "objectId",
            "contact not found in HubSpot",
        )]);
    }
    let witness = if entity_type == EntityType::Opportunity {
        deal.as_ref()
    } else {
        contact.as_ref()
    };
    if !witness
        .is_some_and(|r| confirmed(r, history_of, &stage, e.occurred_at, opts.confirm_window_ms))
    {
        return dropped(
            "propertyValue",
            format!("the record's {history_of} history does not show this value at occurredAt"),
        );
    }
    let contact_id = contact.as_ref().map(|_| {
        deal.as_ref()
            .and_then(|d| d.contact_id.clone())
            .unwrap_or_else(|| id.clone())
    });
    let c = contact.unwrap_or_default();
    let props = &c.properties;
    let revenue = event_name.is_revenue();
    let (value, currency) = match &deal {
        Some(d) => (
            prop(&d.properties, "amount").and_then(|a| a.parse::<f64>().ok()),
            prop(&d.properties, "deal_currency_code"),
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
    .any(|k| prop(props, k).is_some())
    .then(|| ConsentInput {
        status: prop(props, "ads_consent_status"),
        basis: prop(props, "hs_legal_basis"),
        captured_at: prop(props, "ads_consent_captured_at"),
        ad_user_data: prop(props, "ad_user_data"),
        ad_personalization: prop(props, "ad_personalization"),
    });
    let fbclid = prop(props, "hs_facebook_click_id");
    // The CRM's own record of when the click id was set: fbc's creation time.
    let fbclid_at = fbclid.as_ref().and_then(|v| {
        c.history
            .get("hs_facebook_click_id")?
            .iter()
            .filter(|h| h.value == *v)
            .map(|h| h.at)
            .min()
            .map(|t| t.canonical())
    });
    Incoming::Event(Box::new(EventInput {
        event_id: None,
        source: Some("hubspot".into()),
        event_name: Some(event_name.as_str().into()),
        crm_stage: Some(stage),
        occurred_at: Some(Timestamp::from_unix_ms(e.occurred_at).canonical()),
        entity_type: Some(entity_type.as_str().into()),
        entity_id: Some(id.clone()),
        order_id: revenue.then_some(id),
        value,
        currency,
        identity: IdentityInput {
            email: prop(props, "email"),
            phone: prop(props, "phone").or_else(|| prop(props, "mobilephone")),
            first_name: prop(props, "firstname"),
            last_name: prop(props, "lastname"),
            city: prop(props, "city"),
            state: prop(props, "state"),
            zip: prop(props, "zip"),
            country: prop(props, "country"),
            gclid: prop(props, "hs_google_click_id"),
            gbraid: prop(props, "gbraid"),
            wbraid: prop(props, "wbraid"),
            fbclid,
            fbclid_at,
            fbp: prop(props, "fbp"),
            fbc: prop(props, "fbc"),
            crm_contact_id: contact_id,
            ..Default::default()
        },
        consent,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    const AT: i64 = 1_764_255_600_000;
    const PORTAL: i64 = 62515;

    #[derive(Default)]
    struct FakeRecords {
        contacts: HashMap<String, HubSpotRecord>,
        deals: HashMap<String, HubSpotRecord>,
        down: Option<u8>,
        calls: Mutex<usize>,
    }

    #[async_trait]
    impl HubSpotRecords for FakeRecords {
        async fn contact(&self, id: &str) -> Result<Option<HubSpotRecord>, CrmError> {
            *self.calls.lock().unwrap() += 1;
            match self.down {
                Some(1) => return Err(CrmError::Unavailable("HTTP 503".into())),
                Some(_) => {
                    return Err(CrmError::Throttled {
                        retry_after_secs: Some(10),
                    });
                }
                None => {}
            }
            Ok(self.contacts.get(id).cloned())
        }
        async fn deal(&self, id: &str) -> Result<Option<HubSpotRecord>, CrmError> {
            *self.calls.lock().unwrap() += 1;
            Ok(self.deals.get(id).cloned())
        }
    }

    fn record(pairs: &[(&str, &str)], history: &[(&str, &str, i64)]) -> HubSpotRecord {
        let mut r = HubSpotRecord {
            properties: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), Some(v.to_string())))
                .collect(),
            ..Default::default()
        };
        for (p, v, at) in history {
            r.history
                .entry(p.to_string())
                .or_default()
                .push(HistoryEntry {
                    value: v.to_string(),
                    at: Timestamp::from_unix_ms(*at),
                });
        }
        r
    }

    fn fake() -> FakeRecords {
        let mut deal = record(
            &[
                ("amount", "1500.50"),
                ("deal_currency_code", "EUR"),
                ("dealstage", "closedwon"),
            ],
            &[
                ("dealstage", "appointmentscheduled", AT - 86_400_000),
                ("dealstage", "closedwon", AT),
            ],
        );
        deal.contact_id = Some("101".into());
        FakeRecords {
            contacts: HashMap::from([(
                "101".to_string(),
                record(
                    &[
                        ("email", "ada@example.com"),
                        ("firstname", "Ada"),
                        ("hs_google_click_id", "gc-1"),
                        ("hs_facebook_click_id", "IwAR-1"),
                        ("ads_consent_status", "granted"),
                        ("hs_legal_basis", "Freely given consent"),
                        ("lifecyclestage", "customer"),
                    ],
                    &[
                        ("lifecyclestage", "marketingqualifiedlead", AT),
                        ("lifecyclestage", "lead", AT),
                        ("hs_facebook_click_id", "IwAR-1", AT - 3_600_000),
                    ],
                ),
            )]),
            deals: HashMap::from([("9001".to_string(), deal)]),
            ..Default::default()
        }
    }

    fn event(kind: &str, id: i64, prop: &str, value: &str) -> HubSpotEvent {
        HubSpotEvent {
            event_id: Some(1),
            portal_id: Some(PORTAL),
            subscription_type: kind.into(),
            object_id: id,
            occurred_at: AT,
            property_name: Some(prop.into()),
            property_value: Some(value.into()),
        }
    }

    fn opts() -> ResolveOptions {
        ResolveOptions {
            portal_id: Some(PORTAL),
            ..Default::default()
        }
    }

    async fn run(events: &[HubSpotEvent], f: &FakeRecords) -> Vec<Incoming> {
        resolve(
            events,
            f,
            &Mapping::bundled().unwrap(),
            &opts(),
            &HashSet::new(),
        )
        .await
    }

    #[tokio::test]
    async fn deal_closed_won_is_completed_from_the_deal_and_its_contact() {
        let out = run(
            &[event("deal.propertyChange", 9001, "dealstage", "closedwon")],
            &fake(),
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
        assert_eq!(
            e.identity.fbclid_at.as_deref(),
            Some("2025-11-27T14:00:00.000Z"),
            "when HubSpot first recorded the click id"
        );
        let c = e.consent.as_ref().unwrap();
        assert_eq!(
            (c.status.as_deref(), c.basis.as_deref()),
            (Some("granted"), Some("Freely given consent"))
        );
    }

    #[tokio::test]
    async fn foreign_accounts_and_unconfirmed_changes_are_dropped_with_a_reason() {
        let f = fake();
        let mut foreign = event("deal.propertyChange", 9001, "dealstage", "closedwon");
        foreign.portal_id = Some(1);
        let mut unnamed = foreign.clone();
        unnamed.portal_id = None;
        // A late webhook for a stage the history never shows at that time.
        let mut forged = event("deal.propertyChange", 9001, "dealstage", "closedwon");
        forged.occurred_at = AT - 10 * 86_400_000;
        let out = run(&[foreign, unnamed, forged], &f).await;
        assert!(matches!(&out[0], Incoming::Ignored(e) if e.field == "portalId"));
        assert!(matches!(&out[1], Incoming::Ignored(e) if e.field == "portalId"));
        assert!(matches!(&out[2], Incoming::Ignored(e) if e.field == "propertyValue"));
        assert_eq!(*f.calls.lock().unwrap(), 2, "foreign events fetch nothing");
    }

    #[tokio::test]
    async fn a_privacy_deletion_asks_for_an_erasure_of_the_contact() {
        let f = fake();
        let mut e = event("contact.privacyDeletion", 101, "", "");
        e.property_name = None;
        e.property_value = None;
        let out = run(&[e], &f).await;
        assert!(matches!(&out[0], Incoming::Erase { entity_id, .. } if entity_id == "101"));
        assert_eq!(*f.calls.lock().unwrap(), 0);
    }

    #[tokio::test]
    async fn a_stored_change_is_answered_without_a_fetch() {
        let f = fake();
        let m = Mapping::bundled().unwrap();
        let e = event("deal.propertyChange", 9001, "dealstage", "closedwon");
        let stored = HashSet::from([event_key(&e, &m).unwrap()]);
        let out = resolve(&[e], &f, &m, &opts(), &stored).await;
        assert!(matches!(&out[0], Incoming::Stored { .. }));
        assert_eq!(*f.calls.lock().unwrap(), 0);
    }

    #[tokio::test]
    async fn contact_lifecycle_unmapped_missing_outage_and_throttling() {
        let f = fake();
        let out = run(
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
        let lead = [event(
            "contact.propertyChange",
            101,
            "lifecyclestage",
            "lead",
        )];
        let down = FakeRecords {
            down: Some(1),
            ..fake()
        };
        assert!(matches!(
            &run(&lead, &down).await[0],
            Incoming::Unavailable(_)
        ));
        let busy = FakeRecords {
            down: Some(2),
            ..fake()
        };
        assert!(matches!(
            &run(&lead, &busy).await[0],
            Incoming::Throttled {
                retry_after_secs: Some(10)
            }
        ));
    }

    /// Counts the reads in flight at once; each read takes a little while.
    #[derive(Default)]
    struct Gauge {
        now: std::sync::atomic::AtomicUsize,
        max: std::sync::atomic::AtomicUsize,
        reads: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl HubSpotRecords for Gauge {
        async fn contact(&self, _: &str) -> Result<Option<HubSpotRecord>, CrmError> {
            Ok(None)
        }
        async fn deal(&self, _: &str) -> Result<Option<HubSpotRecord>, CrmError> {
            use std::sync::atomic::Ordering::SeqCst;
            self.reads.fetch_add(1, SeqCst);
            let n = self.now.fetch_add(1, SeqCst) + 1;
            self.max.fetch_max(n, SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            self.now.fetch_sub(1, SeqCst);
            Ok(None)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn crm_reads_for_one_delivery_are_bounded() {
        use std::sync::atomic::Ordering::SeqCst;
        // HubSpot sends up to 100 events in one delivery: they must not become 100
        // simultaneous reads against the account's rate limit.
        let events: Vec<HubSpotEvent> = (0..30)
            .map(|i| event("deal.propertyChange", 7000 + i, "dealstage", "closedwon"))
            .collect();
        let g = Gauge::default();
        let o = ResolveOptions {
            max_concurrent: 4,
            ..opts()
        };
        let out = resolve(
            &events,
            &g,
            &Mapping::bundled().unwrap(),
            &o,
            &HashSet::new(),
        )
        .await;
        assert_eq!(out.len(), 30);
        assert_eq!(g.reads.load(SeqCst), 30);
        assert_eq!(
            g.max.load(SeqCst),
            4,
            "reads run side by side, four at most"
        );
    }
}
