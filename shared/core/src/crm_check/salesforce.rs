//! Salesforce as a [`CrmSide`]: the won opportunities of a period by SOQL (`StageName` in the
//! contract's won stages, `CloseDate` in the period), `OpportunityHistory` for when a missed
//! one entered its stage, its primary contact (`OpportunityContactRole`) for the identity its
//! Flow would have posted, and `queryAll` for the stored wons the query no longer lists
//! (a deleted opportunity stays visible there, `IsDeleted`, while it is in the recycle bin).
//! The lead funnel: leads created in the period (in the status they were created with) and the
//! `LeadHistory` rows of their `Status` field, which Salesforce writes only where field
//! history tracking is switched on for it.
//! source: crm-apis.md SF-QUERY, SF-QALL, SF-OPP, SF-HIST; Object Reference: LeadHistory

use super::{CheckError, CrmDeal, CrmSide, Missed, Replay, StageEntry};
use crate::consent::ConsentStatus;
use crate::mapping::Mapping;
use crate::store::EventStore;
use crate::timestamp::{Days, Timestamp, Window};
use crate::webhook::hubspot::{CrmError, HistoryEntry};
use async_trait::async_trait;
use serde_json::json;
use std::collections::HashMap;

/// Record ids per SOQL `IN (...)`: the query stays far below SOQL's length limit.
pub const IDS_PER_QUERY: usize = 200;

/// An opportunity as `queryAll` returns it.
#[derive(Clone, Debug, PartialEq)]
pub struct SfOpportunity {
    pub id: String,
    pub stage: String,
    pub is_deleted: bool,
}

/// The identity fields of an opportunity's primary contact.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SfContact {
    pub email: Option<String>,
    pub phone: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
}

/// A lead as the funnel needs it: its status now, when it was created, and its identity.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SfLead {
    pub id: String,
    pub status: String,
    pub created: Option<Timestamp>,
    pub contact: SfContact,
}

/// One `LeadHistory` row of the `Status` field.
#[derive(Clone, Debug, PartialEq)]
pub struct SfStatusChange {
    pub lead_id: String,
    pub old: Option<String>,
    pub new: Option<String>,
    pub at: Timestamp,
}

/// Salesforce's REST query API as the check needs it. Implemented over HTTP (OAuth client
/// credentials) in `bridge-platforms`.
#[async_trait]
pub trait SalesforceApi: Send + Sync {
    /// Opportunities whose `StageName` is one of `stages` and whose `CloseDate` is one of
    /// `close_dates` (both ends included), all pages read.
    async fn won_opportunities(
        &self,
        stages: &[String],
        close_dates: &Days,
    ) -> Result<Vec<CrmDeal>, CrmError>;
    /// The `OpportunityHistory` rows of `ids`: (opportunity id, stage, when the row was made).
    async fn stage_history(&self, ids: &[String]) -> Result<Vec<(String, HistoryEntry)>, CrmError>;
    /// The primary contact of each of `ids` that has one.
    async fn primary_contacts(&self, ids: &[String]) -> Result<Vec<(String, SfContact)>, CrmError>;
    /// `ids` through `queryAll`: deleted ones included; ones purged from the recycle bin absent.
    async fn opportunities_all(&self, ids: &[String]) -> Result<Vec<SfOpportunity>, CrmError>;
    /// The `LeadHistory` rows of `Field = 'Status'` made in `window`.
    async fn lead_status_changes(&self, window: Window) -> Result<Vec<SfStatusChange>, CrmError>;
    /// Every `Status` row of the leads `ids`, whenever made (for the status each was created in).
    async fn lead_status_history(&self, ids: &[String]) -> Result<Vec<SfStatusChange>, CrmError>;
    /// The leads created in `window`.
    async fn leads_created(&self, window: Window) -> Result<Vec<SfLead>, CrmError>;
    /// The leads `ids` (deleted ones absent).
    async fn leads(&self, ids: &[String]) -> Result<Vec<SfLead>, CrmError>;
}

/// Salesforce's query API.
pub struct SalesforceSide<'a> {
    pub api: &'a dyn SalesforceApi,
}

/// Compares Salesforce's won opportunities of the period with the stored events (see
/// [`super::check`]).
pub async fn check_salesforce(
    api: &dyn SalesforceApi,
    store: &dyn EventStore,
    mapping: &Mapping,
    window: Window,
    now: Timestamp,
) -> Result<super::CrmCheck, CheckError> {
    super::check(&SalesforceSide { api }, store, mapping, window, now).await
}

/// The note a repair needs when Salesforce's events get a consent other than granted.
fn consent_note(mapping: &Mapping) -> Option<String> {
    let consent_default = mapping
        .source("salesforce")
        .map(|s| s.consent_default)
        .unwrap_or(ConsentStatus::Unknown);
    (consent_default != ConsentStatus::Granted).then(|| {
        format!(
            "Salesforce holds no ad consent: a repair stores it under the source's consent_default ({}), and only granted events are sent",
            serde_json::to_value(consent_default)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        )
    })
}

/// The change as the Flow posts it (`webhook::salesforce`): what it does not know left out.
fn flow_item(item: serde_json::Value) -> Replay {
    let item: serde_json::Map<String, serde_json::Value> = item
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Replay::Salesforce(serde_json::Value::Object(item).to_string())
}

#[async_trait]
impl CrmSide for SalesforceSide<'_> {
    fn source(&self) -> &'static str {
        "salesforce"
    }

    async fn won_deals(&self, stages: &[String], window: Window) -> Result<Vec<CrmDeal>, CrmError> {
        // CloseDate is a date: the period's days, the last one being the day `to` excludes
        // nothing of. SOQL compares picklists case-insensitively, so the contract's lower-cased
        // stage names match Salesforce's spelling. source: SF-DATE; SOQL comparison operators
        self.api.won_opportunities(stages, &window.days()).await
    }

    async fn explain_missed(
        &self,
        deals: &[CrmDeal],
        mapping: &Mapping,
        now: Timestamp,
    ) -> Result<Vec<Missed>, CheckError> {
        let mut history: HashMap<String, Vec<HistoryEntry>> = HashMap::new();
        let mut contacts: HashMap<String, SfContact> = HashMap::new();
        let ids: Vec<String> = deals.iter().map(|d| d.id.clone()).collect();
        for chunk in ids.chunks(IDS_PER_QUERY) {
            for (id, h) in self.api.stage_history(chunk).await? {
                history.entry(id).or_default().push(h);
            }
            contacts.extend(self.api.primary_contacts(chunk).await?);
        }
        let consent_note = consent_note(mapping);
        let mut out = Vec::with_capacity(deals.len());
        for deal in deals {
            let mut m = Missed::new(deal);
            // The latest entry into the current stage: the change its Flow would have posted.
            let won_at = history
                .get(&deal.id)
                .into_iter()
                .flatten()
                .filter(|h| h.value.eq_ignore_ascii_case(&deal.stage))
                .map(|h| h.at)
                .max();
            let Some(won_at) = won_at else {
                m.notes.push(
                    "the opportunity's stage history (OpportunityHistory) does not show the stage"
                        .into(),
                );
                out.push(m);
                continue;
            };
            m.won_at(won_at, now);
            if mapping.lifecycle_for("salesforce", &deal.stage).is_none() {
                m.notes
                    .push("the mapping contract does not map the stage".into());
                out.push(m);
                continue;
            }
            let contact = contacts.get(&deal.id).cloned().unwrap_or_default();
            if !contacts.contains_key(&deal.id) {
                m.notes.push(
                    "no primary contact: the repaired event carries no identity for the platforms to match"
                        .into(),
                );
            }
            m.notes.extend(consent_note.clone());
            let item = json!({
                "object": "Opportunity",
                "id": deal.id,
                "stage": deal.stage,
                "changed_at": won_at.canonical(),
                "amount": deal.amount,
                "currency": deal.currency,
                "email": contact.email,
                "phone": contact.phone,
                "first_name": contact.first_name,
                "last_name": contact.last_name,
            });
            m.replay = Some(flow_item(item));
            out.push(m);
        }
        Ok(out)
    }

    async fn why_not_listed(
        &self,
        orders: &[String],
        stages: &[String],
    ) -> Result<Vec<Option<&'static str>>, CheckError> {
        // Salesforce refuses an `Id IN (...)` holding anything but a record id (15 or 18
        // letters and digits), which would fail the whole query: such a record is not asked.
        let is_id = |id: &str| {
            (id.len() == 15 || id.len() == 18) && id.chars().all(|c| c.is_ascii_alphanumeric())
        };
        let valid: Vec<String> = orders.iter().filter(|o| is_id(o)).cloned().collect();
        let mut found: HashMap<String, SfOpportunity> = HashMap::new();
        for chunk in valid.chunks(IDS_PER_QUERY) {
            for o in self.api.opportunities_all(chunk).await? {
                found.insert(o.id.clone(), o);
            }
        }
        Ok(orders
            .iter()
            .map(|id| match found.get(id) {
                _ if !is_id(id) => None,
                // Purged from the recycle bin (15 days), or never there.
                None => Some("deleted_in_crm"),
                Some(o) if o.is_deleted => Some("deleted_in_crm"),
                Some(o) => (!stages
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(o.stage.trim())))
                .then_some("reopened_in_crm"),
            })
            .collect())
    }

    /// The leads created in the period, in the status they were created with (the oldest
    /// `Status` row's old value, else the status they still have), and every `Status` row of
    /// the period. SOQL compares picklists case-insensitively, and so does this.
    async fn stage_entries(
        &self,
        stages: &[String],
        window: Window,
    ) -> Result<Option<Vec<StageEntry>>, CheckError> {
        let wanted = |s: &str| stages.iter().any(|x| x.eq_ignore_ascii_case(s.trim()));
        let mut out = Vec::new();
        let created = self.api.leads_created(window).await?;
        let ids: Vec<String> = created.iter().map(|l| l.id.clone()).collect();
        let mut first: HashMap<String, SfStatusChange> = HashMap::new();
        for chunk in ids.chunks(IDS_PER_QUERY) {
            for c in self.api.lead_status_history(chunk).await? {
                match first.get(&c.lead_id) {
                    Some(f) if f.at <= c.at => {}
                    _ => {
                        first.insert(c.lead_id.clone(), c);
                    }
                }
            }
        }
        for lead in created {
            let Some(at) = lead.created else {
                continue;
            };
            let stage = match first.get(&lead.id) {
                Some(f) => f.old.clone().unwrap_or_default(),
                None => lead.status.clone(),
            };
            if wanted(&stage) {
                out.push(StageEntry {
                    record_id: lead.id,
                    stage,
                    at,
                });
            }
        }
        for c in self.api.lead_status_changes(window).await? {
            // The query's bounds are whole seconds: the period is exact here.
            if !window.contains(c.at) {
                continue;
            }
            if let Some(new) = c.new.filter(|n| wanted(n)) {
                out.push(StageEntry {
                    record_id: c.lead_id,
                    stage: new,
                    at: c.at,
                });
            }
        }
        out.sort_by(|a, b| (a.at, &a.record_id).cmp(&(b.at, &b.record_id)));
        Ok(Some(out))
    }

    /// Each change as the lead's Flow would have posted it, with the lead's identity.
    async fn replay_stages(
        &self,
        entries: &[StageEntry],
        mapping: &Mapping,
    ) -> Result<Vec<(Option<Replay>, Vec<String>)>, CheckError> {
        let mut ids: Vec<String> = entries.iter().map(|e| e.record_id.clone()).collect();
        ids.sort();
        ids.dedup();
        let mut leads: HashMap<String, SfLead> = HashMap::new();
        for chunk in ids.chunks(IDS_PER_QUERY) {
            leads.extend(
                self.api
                    .leads(chunk)
                    .await?
                    .into_iter()
                    .map(|l| (l.id.clone(), l)),
            );
        }
        let consent_note = consent_note(mapping);
        Ok(entries
            .iter()
            .map(|e| {
                let Some(lead) = leads.get(&e.record_id) else {
                    return (None, vec!["the lead is gone from Salesforce".into()]);
                };
                let c = &lead.contact;
                let item = json!({
                    "object": "Lead",
                    "id": e.record_id,
                    "stage": e.stage,
                    "changed_at": e.at.canonical(),
                    "email": c.email,
                    "phone": c.phone,
                    "first_name": c.first_name,
                    "last_name": c.last_name,
                });
                (
                    Some(flow_item(item)),
                    consent_note.iter().cloned().collect(),
                )
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crm_check::{funnel_figures, test_ingest};
    use crate::identity::Region;
    use crate::ingest::{IngestConfig, Intake, ItemStatus};
    use crate::queue::memory::MemoryQueue;
    use crate::store::memory::MemoryStore;
    use crate::webhook::salesforce::parse_item;
    use std::sync::Mutex;

    const DAY_MS: i64 = 86_400_000;

    fn now() -> Timestamp {
        Timestamp::parse_rfc3339("2026-11-28T12:00:00Z").unwrap()
    }

    /// Salesforce as far as the check needs it: opportunities (stage, amount, close date,
    /// deleted), their history rows, and primary contacts.
    #[derive(Default)]
    struct Org {
        opps: Mutex<Vec<(CrmDeal, String, bool)>>,
        history: Mutex<Vec<(String, HistoryEntry)>>,
        contacts: HashMap<String, SfContact>,
        leads: Mutex<Vec<SfLead>>,
        lead_history: Mutex<Vec<SfStatusChange>>,
    }

    impl Org {
        fn set(&self, id: &str, stage: &str, amount: f64, at_ms: i64) {
            let mut opps = self.opps.lock().unwrap();
            opps.retain(|(d, _, _)| d.id != id);
            opps.push((
                CrmDeal {
                    id: id.into(),
                    stage: stage.into(),
                    amount: Some(amount),
                    currency: Some("USD".into()),
                },
                Timestamp::from_unix_ms(at_ms).date(),
                false,
            ));
            self.history.lock().unwrap().push((
                id.into(),
                HistoryEntry {
                    value: stage.into(),
                    at: Timestamp::from_unix_ms(at_ms),
                },
            ));
        }
    }

    impl Org {
        /// A lead created at `at_ms` in `status`, with an email.
        fn lead(&self, id: &str, status: &str, at_ms: i64) {
            self.leads.lock().unwrap().push(SfLead {
                id: id.into(),
                status: status.into(),
                created: Some(Timestamp::from_unix_ms(at_ms)),
                contact: SfContact {
                    email: Some(format!("{id}@example.com")),
                    ..Default::default()
                },
            });
        }

        /// The lead's status changes at `at_ms` (a `LeadHistory` row, tracking on).
        fn status(&self, id: &str, status: &str, at_ms: i64) {
            let mut leads = self.leads.lock().unwrap();
            let lead = leads.iter_mut().find(|l| l.id == id).unwrap();
            self.lead_history.lock().unwrap().push(SfStatusChange {
                lead_id: id.into(),
                old: Some(lead.status.clone()),
                new: Some(status.into()),
                at: Timestamp::from_unix_ms(at_ms),
            });
            lead.status = status.into();
        }
    }

    #[async_trait]
    impl SalesforceApi for Org {
        async fn lead_status_changes(&self, w: Window) -> Result<Vec<SfStatusChange>, CrmError> {
            let h = self.lead_history.lock().unwrap();
            Ok(h.iter().filter(|c| w.contains(c.at)).cloned().collect())
        }
        async fn lead_status_history(
            &self,
            ids: &[String],
        ) -> Result<Vec<SfStatusChange>, CrmError> {
            let h = self.lead_history.lock().unwrap();
            Ok(h.iter()
                .filter(|c| ids.contains(&c.lead_id))
                .cloned()
                .collect())
        }
        async fn leads_created(&self, w: Window) -> Result<Vec<SfLead>, CrmError> {
            let leads = self.leads.lock().unwrap();
            Ok(leads
                .iter()
                .filter(|l| l.created.is_some_and(|c| w.contains(c)))
                .cloned()
                .collect())
        }
        async fn leads(&self, ids: &[String]) -> Result<Vec<SfLead>, CrmError> {
            let leads = self.leads.lock().unwrap();
            Ok(leads
                .iter()
                .filter(|l| ids.contains(&l.id))
                .cloned()
                .collect())
        }
        async fn won_opportunities(
            &self,
            stages: &[String],
            days: &Days,
        ) -> Result<Vec<CrmDeal>, CrmError> {
            Ok(self
                .opps
                .lock()
                .unwrap()
                .iter()
                .filter(|(d, close, deleted)| {
                    !deleted
                        && stages.iter().any(|s| s.eq_ignore_ascii_case(&d.stage))
                        && (days.first.as_str()..=days.last.as_str()).contains(&close.as_str())
                })
                .map(|(d, _, _)| d.clone())
                .collect())
        }
        async fn stage_history(
            &self,
            ids: &[String],
        ) -> Result<Vec<(String, HistoryEntry)>, CrmError> {
            let h = self.history.lock().unwrap();
            Ok(h.iter()
                .filter(|(id, _)| ids.contains(id))
                .cloned()
                .collect())
        }
        async fn primary_contacts(
            &self,
            ids: &[String],
        ) -> Result<Vec<(String, SfContact)>, CrmError> {
            Ok(ids
                .iter()
                .filter_map(|id| self.contacts.get(id).map(|c| (id.clone(), c.clone())))
                .collect())
        }
        async fn opportunities_all(&self, ids: &[String]) -> Result<Vec<SfOpportunity>, CrmError> {
            Ok(self
                .opps
                .lock()
                .unwrap()
                .iter()
                .filter(|(d, _, _)| ids.contains(&d.id))
                .map(|(d, _, deleted)| SfOpportunity {
                    id: d.id.clone(),
                    stage: d.stage.clone(),
                    is_deleted: *deleted,
                })
                .collect())
        }
    }

    fn cfg() -> IngestConfig {
        IngestConfig {
            default_region: Region::US,
            max_future_skew_secs: 300,
        }
    }

    /// The bundled contract with Salesforce as the system of record and its consent granted.
    fn mapping() -> Mapping {
        let text = crate::mapping::BUNDLED
            .replace(
                "system_of_record = \"hubspot\"",
                "system_of_record = \"salesforce\"",
            )
            .replace(
                "[sources.salesforce]\nconsent_default = \"unknown\"",
                "[sources.salesforce]\nconsent_default = \"granted\"",
            );
        Mapping::load(&text).unwrap()
    }

    #[tokio::test]
    async fn a_callout_that_never_arrived_is_found_and_replayed_as_the_flow_would_post_it() {
        let m = mapping();
        let t = now().unix_ms();
        let mut org = Org::default();
        org.contacts.insert(
            "006A00000000001AAA".into(),
            SfContact {
                email: Some("ada@example.com".into()),
                ..Default::default()
            },
        );
        org.set("006A00000000001AAA", "Closed Won", 900.0, t - 2 * DAY_MS);
        org.set("006B00000000001AAA", "Closed Won", 400.0, t - 3 * DAY_MS);
        org.set("006C00000000001AAA", "Closed Won", 250.0, t - DAY_MS);
        let store = MemoryStore::new();
        let queue = MemoryQueue::new(5, std::time::Duration::from_secs(30));
        // The Flow's callouts for B and C arrived; A's never did (Apex callouts are not retried).
        // C's Flow sends an order id of its own: the check still finds C by its record.
        for (id, amount, at) in [
            ("006B00000000001AAA", 400, t - 3 * DAY_MS),
            ("006C00000000001AAA", 250, t - DAY_MS),
        ] {
            let mut raw = json!({"object": "Opportunity", "id": id, "stage": "Closed Won",
                "changed_at": Timestamp::from_unix_ms(at).canonical(), "amount": amount,
                "currency": "USD", "email": "bob@example.com"});
            if id == "006C00000000001AAA" {
                raw["order_id"] = json!("SO-1001");
            }
            let raw = raw.to_string();
            let items = vec![parse_item(&raw, "salesforce", &m)];
            let r = test_ingest(items, "salesforce", &m, &store, &queue, now()).await;
            assert_eq!(r.results[0].status, ItemStatus::Accepted, "{r:?}");
        }
        // Then C was reopened.
        org.set("006C00000000001AAA", "Negotiation", 250.0, t);

        let (from, to) = (now().minus_secs(30 * 86_400), now());
        let check = check_salesforce(&org, &store, &m, Window::new(from, to), now())
            .await
            .unwrap();
        assert_eq!(check.source, "salesforce");
        let missed: Vec<&str> = check.missed.iter().map(|x| x.deal_id.as_str()).collect();
        assert_eq!(missed, ["006A00000000001AAA"]);
        assert_eq!(
            check.missed[0].won_at,
            Some(Timestamp::from_unix_ms(t - 2 * DAY_MS))
        );
        assert!(
            check.missed[0].notes.is_empty(),
            "{:?}",
            check.missed[0].notes
        );
        let changed: Vec<(&str, &str)> = check
            .changed
            .iter()
            .map(|c| (c.deal_id.as_str(), c.reason))
            .collect();
        assert_eq!(changed, [("006C00000000001AAA", "reopened_in_crm")]);
        let usd = &check.per_currency["USD"];
        assert_eq!((usd.crm_deals, usd.stored_wons, usd.missed), (2, 1, 1));
        assert_eq!(usd.missed_revenue, 900.0);

        let r = super::super::repair(&check, None, Intake::new(&m, &cfg(), &store, &queue), now())
            .await;
        assert_eq!(r.results.len(), 1);
        assert_eq!(r.results[0].status, ItemStatus::Accepted, "{r:?}");
        let won = store.find_by_order("006A00000000001AAA").await.unwrap();
        assert_eq!(won.len(), 1);
        assert_eq!(won[0].occurred_at, Timestamp::from_unix_ms(t - 2 * DAY_MS));
        assert_eq!(won[0].value.map(|v| v.as_f64()), Some(900.0));
        assert!(
            won[0].identity.meta.em.is_some(),
            "the primary contact's email"
        );
        let again = check_salesforce(&org, &store, &m, Window::new(from, to), now())
            .await
            .unwrap();
        assert!(again.missed.is_empty());

        // Deleted: out of the query, still in queryAll with IsDeleted.
        org.opps
            .lock()
            .unwrap()
            .iter_mut()
            .for_each(|(d, _, deleted)| {
                if d.id == "006B00000000001AAA" {
                    *deleted = true;
                }
            });
        let gone = check_salesforce(&org, &store, &m, Window::new(from, to), now())
            .await
            .unwrap();
        assert_eq!(gone.change_of("006B00000000001AAA"), Some("deleted_in_crm"));
    }

    #[tokio::test]
    async fn without_consent_or_contact_the_notes_say_what_a_repair_will_not_reach() {
        let m = Mapping::bundled().unwrap();
        let org = Org::default();
        org.set(
            "006Z00000000001AAA",
            "Closed Won",
            10.0,
            now().unix_ms() - DAY_MS,
        );
        let store = MemoryStore::new();
        let check = check_salesforce(
            &org,
            &store,
            &m,
            Window::new(now().minus_secs(86_400 * 2), now()),
            now(),
        )
        .await
        .unwrap();
        let notes = check.missed[0].notes.join(" | ");
        assert!(notes.contains("no primary contact"), "{notes}");
        assert!(notes.contains("consent_default (unknown)"), "{notes}");
        assert!(
            check.missed[0].replay.is_some(),
            "still replayable: stored for the audit"
        );
    }

    #[tokio::test]
    async fn lead_status_changes_whose_callouts_never_arrived_are_found_and_replayed() {
        let m = mapping();
        let t = now().unix_ms();
        let org = Org::default();
        let (lead, mql, sql) = ("Open - Not Contacted", "Working - Contacted", "Qualified");
        // L1: created a lead, then MQL, then SQL (that callout lost). L2: created straight
        // into MQL, no history row (its callout lost). L3: created before the period, SQL in
        // it (arrived), then converted (a status the contract does not map).
        org.lead("00QA00000000001AAA", lead, t - 3 * DAY_MS);
        org.status("00QA00000000001AAA", mql, t - 2 * DAY_MS);
        org.status("00QA00000000001AAA", sql, t - DAY_MS);
        org.lead("00QB00000000001AAA", mql, t - 2 * DAY_MS);
        org.lead("00QC00000000001AAA", lead, t - 40 * DAY_MS);
        org.status("00QC00000000001AAA", sql, t - DAY_MS);
        org.status("00QC00000000001AAA", "Closed - Converted", t - DAY_MS / 2);
        let store = MemoryStore::new();
        let queue = MemoryQueue::new(5, std::time::Duration::from_secs(30));
        let post = |id: &str, stage: &str, at: i64| {
            json!({"object": "Lead", "id": id, "stage": stage,
                   "changed_at": Timestamp::from_unix_ms(at).canonical(),
                   "email": format!("{id}@example.com")})
            .to_string()
        };
        let arrived = [
            post("00QA00000000001AAA", lead, t - 3 * DAY_MS),
            post("00QA00000000001AAA", mql, t - 2 * DAY_MS),
            post("00QC00000000001AAA", sql, t - DAY_MS),
        ];
        let items = arrived
            .iter()
            .map(|raw| parse_item(raw, "salesforce", &m))
            .collect();
        let r = test_ingest(items, "salesforce", &m, &store, &queue, now()).await;
        assert!(
            r.results.iter().all(|x| x.status == ItemStatus::Accepted),
            "{r:?}"
        );

        let (from, to) = (now().minus_secs(7 * 86_400), now());
        let check = check_salesforce(&org, &store, &m, Window::new(from, to), now())
            .await
            .unwrap();
        assert_eq!(funnel_figures(&check), [(1, 1, 0), (2, 1, 1), (2, 1, 1)]);
        let funnel = check.funnel.clone().unwrap();
        let missed: Vec<(&str, &str)> = funnel
            .missed
            .iter()
            .map(|x| (x.record_id.as_str(), x.stage.as_str()))
            .collect();
        assert_eq!(
            missed,
            [("00QB00000000001AAA", mql), ("00QA00000000001AAA", sql)]
        );
        assert!(funnel.missed.iter().all(|x| x.notes.is_empty()));

        let r = super::super::repair(&check, None, Intake::new(&m, &cfg(), &store, &queue), now())
            .await;
        let statuses: Vec<ItemStatus> = r.results.iter().map(|x| x.status).collect();
        assert_eq!(statuses, [ItemStatus::Accepted, ItemStatus::Accepted]);
        let stored = store.events_between(from, to).await.unwrap();
        let b = stored
            .iter()
            .find(|e| e.entity_id == "00QB00000000001AAA")
            .expect("L2's MQL stored");
        assert_eq!(b.occurred_at, Timestamp::from_unix_ms(t - 2 * DAY_MS));
        assert!(b.identity.meta.em.is_some(), "the lead's own email");
        let again = check_salesforce(&org, &store, &m, Window::new(from, to), now())
            .await
            .unwrap();
        assert!(again.funnel.unwrap().missed.is_empty());
        // The late callout is a duplicate of the repair.
        let late = parse_item(
            &post("00QA00000000001AAA", sql, t - DAY_MS),
            "salesforce",
            &m,
        );
        let r = test_ingest(vec![late], "salesforce", &m, &store, &queue, now()).await;
        assert_eq!(r.results[0].status, ItemStatus::Duplicate);
    }
}
