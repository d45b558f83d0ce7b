//! Salesforce as a [`CrmSide`]: the won opportunities of a period by SOQL (`StageName` in the
//! contract's won stages, `CloseDate` in the period), `OpportunityHistory` for when a missed
//! one entered its stage, its primary contact (`OpportunityContactRole`) for the identity its
//! Flow would have posted, and `queryAll` for the stored wons the query no longer lists
//! (a deleted opportunity stays visible there, `IsDeleted`, while it is in the recycle bin).
//! source: crm-apis.md SF-QUERY, SF-QALL, SF-OPP, SF-HIST

use super::{CheckError, CrmDeal, CrmSide, Missed, Replay};
use crate::consent::ConsentStatus;
use crate::mapping::Mapping;
use crate::store::EventStore;
use crate::timestamp::Timestamp;
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

/// Salesforce's REST query API as the check needs it. Implemented over HTTP (OAuth client
/// credentials) in `bridge-platforms`.
#[async_trait]
pub trait SalesforceApi: Send + Sync {
    /// Opportunities whose `StageName` is one of `stages` and whose `CloseDate` is within
    /// `[from_day, to_day]` (dates, `YYYY-MM-DD`, both included), all pages read.
    async fn won_opportunities(
        &self,
        stages: &[String],
        from_day: &str,
        to_day: &str,
    ) -> Result<Vec<CrmDeal>, CrmError>;
    /// The `OpportunityHistory` rows of `ids`: (opportunity id, stage, when the row was made).
    async fn stage_history(&self, ids: &[String]) -> Result<Vec<(String, HistoryEntry)>, CrmError>;
    /// The primary contact of each of `ids` that has one.
    async fn primary_contacts(&self, ids: &[String]) -> Result<Vec<(String, SfContact)>, CrmError>;
    /// `ids` through `queryAll`: deleted ones included; ones purged from the recycle bin absent.
    async fn opportunities_all(&self, ids: &[String]) -> Result<Vec<SfOpportunity>, CrmError>;
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
    from: Timestamp,
    to: Timestamp,
    now: Timestamp,
) -> Result<super::CrmCheck, CheckError> {
    super::check(&SalesforceSide { api }, store, mapping, from, to, now).await
}

/// The UTC date of an instant.
fn day(t: Timestamp) -> String {
    t.canonical().chars().take(10).collect()
}

#[async_trait]
impl CrmSide for SalesforceSide<'_> {
    fn source(&self) -> &'static str {
        "salesforce"
    }

    async fn won_deals(
        &self,
        stages: &[String],
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<CrmDeal>, CrmError> {
        // CloseDate is a date: the period's days, the last one being the day `to` excludes
        // nothing of. SOQL compares picklists case-insensitively, so the contract's lower-cased
        // stage names match Salesforce's spelling. source: SF-DATE; SOQL comparison operators
        let last = Timestamp::from_unix_ms(to.unix_ms().saturating_sub(1).max(from.unix_ms()));
        self.api
            .won_opportunities(stages, &day(from), &day(last))
            .await
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
        let consent_default = mapping
            .source("salesforce")
            .map(|s| s.consent_default)
            .unwrap_or(ConsentStatus::Unknown);
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
            if consent_default != ConsentStatus::Granted {
                m.notes.push(format!(
                    "Salesforce holds no ad consent: a repair stores it under the source's consent_default ({}), and only granted events are sent",
                    serde_json::to_value(consent_default)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                ));
            }
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
            // The Flow's payload leaves out what it does not know: no nulls.
            let item: serde_json::Map<String, serde_json::Value> = item
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            m.replay = Some(Replay::Salesforce(
                serde_json::Value::Object(item).to_string(),
            ));
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Region;
    use crate::ingest::{IngestConfig, ItemStatus, ingest};
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
                day(Timestamp::from_unix_ms(at_ms)),
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

    #[async_trait]
    impl SalesforceApi for Org {
        async fn won_opportunities(
            &self,
            stages: &[String],
            from_day: &str,
            to_day: &str,
        ) -> Result<Vec<CrmDeal>, CrmError> {
            Ok(self
                .opps
                .lock()
                .unwrap()
                .iter()
                .filter(|(d, close, deleted)| {
                    !deleted
                        && stages.iter().any(|s| s.eq_ignore_ascii_case(&d.stage))
                        && (from_day..=to_day).contains(&close.as_str())
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
            let r = ingest(items, "salesforce", &m, &cfg(), now(), &store, &queue).await;
            assert_eq!(r.results[0].status, ItemStatus::Accepted, "{r:?}");
        }
        // Then C was reopened.
        org.set("006C00000000001AAA", "Negotiation", 250.0, t);

        let (from, to) = (now().minus_secs(30 * 86_400), now());
        let check = check_salesforce(&org, &store, &m, from, to, now())
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

        let r = super::super::repair(&check, None, &m, &cfg(), now(), &store, &queue).await;
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
        let again = check_salesforce(&org, &store, &m, from, to, now())
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
        let gone = check_salesforce(&org, &store, &m, from, to, now())
            .await
            .unwrap();
        assert!(
            gone.changed
                .iter()
                .any(|c| c.deal_id == "006B00000000001AAA" && c.reason == "deleted_in_crm"),
            "{:?}",
            gone.changed
        );
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
        let check = check_salesforce(&org, &store, &m, now().minus_secs(86_400 * 2), now(), now())
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
}
