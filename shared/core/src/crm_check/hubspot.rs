//! HubSpot as a [`CrmSide`]: the deal search for won deals, the deal record's `dealstage`
//! history for when a missed deal was won, and the record read (archived deals answer "not
//! found") for the stored wons the search no longer lists; for the lead funnel, the contacts
//! modified since the period began and their `lifecyclestage` histories.

use super::{CheckError, CrmDeal, CrmSide, Missed, Period, Replay, StageEntry};
use crate::mapping::Mapping;
use crate::store::EventStore;
use crate::timestamp::{Timestamp, Window};
use crate::webhook::hubspot::{CrmError, HistoryEntry, HubSpotEvent, HubSpotRecords, event_key};
use async_trait::async_trait;
use std::collections::{HashMap, HashSet};

/// HubSpot's CRM search and batch reads, as the check uses them. Implemented over HTTP in
/// `bridge-platforms`.
#[async_trait]
pub trait HubSpotSearch: Send + Sync {
    /// Every deal in one of `stages` whose close date is in `window`, all pages read.
    async fn won_deals(&self, stages: &[String], window: Window) -> Result<Vec<CrmDeal>, CrmError>;
    /// Which of `ids` are deleted (archived): the search never lists them.
    async fn archived(&self, ids: &[String]) -> Result<HashSet<String>, CrmError>;
    /// Every contact modified at or after `since`, all pages read: a contact whose lifecycle
    /// stage changed in a period was modified then or later.
    async fn contacts_modified(&self, since: Timestamp) -> Result<Vec<String>, CrmError>;
    /// The `lifecyclestage` history of each of `ids` (contacts deleted since are left out).
    async fn lifecycle_histories(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, Vec<HistoryEntry>>, CrmError>;
}

/// HubSpot's search and record reads, for the account `portal_id`.
pub struct HubSpotSide<'a> {
    pub search: &'a dyn HubSpotSearch,
    pub records: &'a dyn HubSpotRecords,
    pub portal_id: Option<i64>,
}

/// Compares HubSpot's won deals of the period with the stored events (see [`super::check`]).
pub async fn check_hubspot(
    search: &dyn HubSpotSearch,
    records: &dyn HubSpotRecords,
    store: &dyn EventStore,
    mapping: &Mapping,
    period: Period,
    now: Timestamp,
) -> Result<super::CrmCheck, CheckError> {
    let side = HubSpotSide {
        search,
        records,
        portal_id: period.portal_id,
    };
    super::check(&side, store, mapping, period.window, now).await
}

#[async_trait]
impl CrmSide for HubSpotSide<'_> {
    fn source(&self) -> &'static str {
        "hubspot"
    }

    async fn won_deals(&self, stages: &[String], window: Window) -> Result<Vec<CrmDeal>, CrmError> {
        // The mapping keeps stage values lower-cased; HubSpot's stage ids are lower-case
        // (`closedwon`) or numeric, which its case-sensitive search on `dealstage` matches.
        self.search.won_deals(stages, window).await
    }

    async fn explain_missed(
        &self,
        deals: &[CrmDeal],
        mapping: &Mapping,
        now: Timestamp,
    ) -> Result<Vec<Missed>, CheckError> {
        let mut out = Vec::with_capacity(deals.len());
        for deal in deals {
            out.push(self.missed(deal, mapping, now).await?);
        }
        Ok(out)
    }

    async fn why_not_listed(
        &self,
        orders: &[String],
        stages: &[String],
    ) -> Result<Vec<Option<&'static str>>, CheckError> {
        // The search never lists archived deals: the batch read with `archived=true` names
        // them, and the others are read one by one for their stage.
        let archived = if orders.is_empty() {
            HashSet::new()
        } else {
            self.search.archived(orders).await?
        };
        let mut out = Vec::with_capacity(orders.len());
        for order in orders {
            if archived.contains(order) {
                out.push(Some("deleted_in_crm"));
                continue;
            }
            out.push(match self.records.deal(order).await? {
                // Not archived and not there: purged from the recycling bin.
                None => Some("deleted_in_crm"),
                Some(r) => {
                    let stage = r
                        .properties
                        .get("dealstage")
                        .cloned()
                        .flatten()
                        .unwrap_or_default();
                    (!stages.contains(&stage.trim().to_lowercase())).then_some("reopened_in_crm")
                }
            });
        }
        Ok(out)
    }

    async fn stage_entries(
        &self,
        stages: &[String],
        window: Window,
    ) -> Result<Option<Vec<StageEntry>>, CheckError> {
        let ids = self.search.contacts_modified(window.from).await?;
        if ids.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let histories = self.search.lifecycle_histories(&ids).await?;
        let mut out = Vec::new();
        for (id, history) in histories {
            // The mapping keeps stage values lower-cased; HubSpot's lifecycle stage ids are
            // lower-case (`marketingqualifiedlead`) or numeric for custom stages.
            out.extend(
                history
                    .into_iter()
                    .filter(|h| window.contains(h.at))
                    .filter(|h| stages.contains(&h.value.trim().to_lowercase()))
                    .map(|h| StageEntry {
                        record_id: id.clone(),
                        stage: h.value,
                        at: h.at,
                    }),
            );
        }
        out.sort_by(|a, b| (a.at, &a.record_id).cmp(&(b.at, &b.record_id)));
        Ok(Some(out))
    }

    /// The `contact.propertyChange` of `lifecyclestage` HubSpot sends for each change, at the
    /// history's time: replayed, it gets the event id the lost webhook would have had (and is
    /// completed from the contact as a live one is).
    async fn replay_stages(
        &self,
        entries: &[StageEntry],
        _mapping: &Mapping,
    ) -> Result<Vec<(Option<Replay>, Vec<String>)>, CheckError> {
        Ok(entries
            .iter()
            .map(|entry| match entry.record_id.parse::<i64>() {
                Ok(object_id) => (
                    Some(Replay::HubSpot(HubSpotEvent {
                        event_id: None,
                        portal_id: self.portal_id,
                        subscription_type: "contact.propertyChange".into(),
                        object_id,
                        occurred_at: entry.at.unix_ms(),
                        property_name: Some("lifecyclestage".into()),
                        property_value: Some(entry.stage.clone()),
                    })),
                    Vec::new(),
                ),
                Err(_) => (
                    None,
                    vec!["the contact id is not a HubSpot object id".into()],
                ),
            })
            .collect())
    }
}

impl HubSpotSide<'_> {
    /// The webhook HubSpot would have sent for a missed deal, from the record's stage history.
    async fn missed(
        &self,
        deal: &CrmDeal,
        mapping: &Mapping,
        now: Timestamp,
    ) -> Result<Missed, CheckError> {
        let mut m = Missed::new(deal);
        let Ok(object_id) = deal.id.parse::<i64>() else {
            m.notes
                .push("the deal id is not a HubSpot object id".into());
            return Ok(m);
        };
        let Some(record) = self.records.deal(&deal.id).await? else {
            m.notes
                .push("the deal is gone from HubSpot since the search".into());
            return Ok(m);
        };
        // The latest entry into the current stage: what the webhook for this won carried.
        let won_at = record
            .history
            .get("dealstage")
            .into_iter()
            .flatten()
            .filter(|h| h.value == deal.stage)
            .map(|h| h.at)
            .max();
        let Some(won_at) = won_at else {
            m.notes
                .push("the deal's stage history does not show the stage".into());
            return Ok(m);
        };
        m.won_at(won_at, now);
        let webhook = HubSpotEvent {
            event_id: None,
            portal_id: self.portal_id,
            subscription_type: "deal.propertyChange".into(),
            object_id,
            occurred_at: won_at.unix_ms(),
            property_name: Some("dealstage".into()),
            property_value: Some(deal.stage.clone()),
        };
        if event_key(&webhook, mapping).is_none() {
            m.notes
                .push("the mapping contract does not map the stage".into());
            return Ok(m);
        }
        m.replay = Some(Replay::HubSpot(webhook));
        Ok(m)
    }
}
