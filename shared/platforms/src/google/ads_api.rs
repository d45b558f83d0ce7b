//! The Google Ads API uploads: `uploadClickConversions` and `uploadConversionAdjustments` with
//! partial failure, after the customer-data-terms pre-flight for rows with user data.

use super::codes::{TERMS_NOT_ACCEPTED, classify_ads_error, classify_partial};
use super::rows::{GoogleItem, Kind};
use super::{Api, GooglePlatform, err, retry};
use async_trait::async_trait;
use bridge_core::delivery::{Answer, Attempt, ErrorCode, Limits, Outcome, deliver_isolating};
use serde_json::{Value, json};

impl GooglePlatform {
    pub(super) fn ads_url(&self, customer: &str, method: &str) -> String {
        format!(
            "{}/{}/customers/{customer}{method}",
            self.cfg.ads_base_url, self.cfg.ads_api_version
        )
    }

    /// Uploads one group. Rows carrying user data need the customer data terms: without them,
    /// a row that also carries a click id still goes, without its user identifiers (a plain
    /// click conversion); a row with nothing but user data is held for a person.
    pub(super) async fn send_ads(&self, items: &[GoogleItem], limits: Limits) -> Vec<Outcome> {
        let first = &items[0];
        let login = first.login_customer_id.as_deref();
        let mut out: Vec<Option<Outcome>> = vec![None; items.len()];
        let mut rows: Vec<GoogleItem> = items.to_vec();
        if items.iter().any(|i| i.has_user_data) {
            match self.terms_accepted(&first.customer_id, login).await {
                Ok(true) => {}
                Ok(false) => {
                    let held = Outcome::Rejected {
                        error: err(
                            ErrorCode::platform(TERMS_NOT_ACCEPTED),
                            format!(
                                "customer {} has not accepted the customer data terms; events with user data and no click id are held",
                                first.customer_id
                            ),
                        ),
                        dead_letter: true,
                        alert: true,
                    };
                    for (i, row) in rows.iter_mut().enumerate() {
                        if !row.has_user_data {
                            continue;
                        }
                        if row.has_click_id() {
                            row.strip_user_data();
                        } else {
                            out[i] = Some(held.clone());
                        }
                    }
                }
                Err(o) => return vec![o; items.len()],
            }
        }
        let pending: Vec<usize> = (0..items.len()).filter(|&i| out[i].is_none()).collect();
        let batch: Vec<GoogleItem> = pending.iter().map(|&i| rows[i].clone()).collect();
        let request = AdsRequest { platform: self };
        let outcomes = deliver_isolating(&request, &batch, limits).await;
        for (k, o) in outcomes.into_iter().enumerate() {
            let i = pending[k];
            // Terms withdrawn since the pre-flight looked: forget its answer, and try again
            // soon; the next pre-flight strips or holds the row.
            let terms_refused = o.error().is_some_and(|e| e.code == TERMS_NOT_ACCEPTED);
            out[i] = Some(if terms_refused && rows[i].has_user_data {
                self.forget_terms(&first.customer_id);
                retry(
                    ErrorCode::platform(TERMS_NOT_ACCEPTED),
                    "the customer data terms are no longer accepted; resent without user data if it has a click id",
                    Some(std::time::Duration::from_secs(60)),
                )
            } else {
                o
            });
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| retry(ErrorCode::NoOutcome, "not sent", None)))
            .collect()
    }
}

struct AdsRequest<'a> {
    platform: &'a GooglePlatform,
}

#[async_trait]
impl Attempt<GoogleItem> for AdsRequest<'_> {
    async fn attempt(&self, items: &[GoogleItem]) -> Answer {
        let p = self.platform;
        let first = &items[0];
        let rows: Vec<&Value> = items.iter().map(|i| &i.row).collect();
        let (method, key) = match first.kind {
            Kind::Adjustment => (":uploadConversionAdjustments", "conversionAdjustments"),
            _ => (":uploadClickConversions", "conversions"),
        };
        let body =
            json!({ key: rows, "partialFailure": true, "validateOnly": p.cfg.validate_only });
        let url = p.ads_url(&first.customer_id, method);
        match p
            .post(Api::Ads, &url, first.login_customer_id.as_deref(), &body)
            .await
        {
            Ok((status, text)) if (200..300).contains(&status) => {
                let attempts: Vec<u32> = items.iter().map(|i| i.attempt).collect();
                Answer::PerItem(classify_partial(
                    &text,
                    &attempts,
                    p.cfg.validate_only,
                    &p.waits,
                ))
            }
            Ok((status, text)) => Answer::Whole(classify_ads_error(status, &text, &p.waits)),
            Err(o) => Answer::Whole(o),
        }
    }
}
