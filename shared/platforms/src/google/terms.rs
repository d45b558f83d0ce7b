//! The customer-data-terms pre-flight: enhanced conversions may carry user data only for a
//! customer (or the conversion customer it names) that accepted Google's customer data terms.

use super::codes::classify_ads_error;
use super::{Api, GooglePlatform};
use bridge_core::delivery::Outcome;
use serde_json::{Value, json};
use std::time::Instant;

impl GooglePlatform {
    /// Drops the cached terms answer for `customer`, so the next upload asks again.
    pub(super) fn forget_terms(&self, customer: &str) {
        if let Ok(mut t) = self.terms.lock() {
            t.remove(customer);
        }
    }

    /// Whether enhanced conversions may carry user data for `customer`: the customer data
    /// terms of the account that owns conversion tracking (it may name another customer).
    pub(super) async fn terms_accepted(
        &self,
        customer: &str,
        login: Option<&str>,
    ) -> Result<bool, Outcome> {
        if let Ok(t) = self.terms.lock()
            && let Some((ok, at)) = t.get(customer)
        {
            let ttl = if *ok {
                self.cfg.terms_ttl
            } else {
                self.cfg.terms_ttl / 12
            };
            if at.elapsed() < ttl {
                return Ok(*ok);
            }
        }
        let query = "SELECT customer.conversion_tracking_setting.accepted_customer_data_terms, customer.conversion_tracking_setting.google_ads_conversion_customer FROM customer";
        let mut target = customer.to_string();
        let mut accepted = false;
        for _ in 0..2 {
            let url = self.ads_url(&target, "/googleAds:search");
            let (status, text) = self
                .post(Api::Ads, &url, login, &json!({ "query": query }))
                .await?;
            if !(200..300).contains(&status) {
                return Err(classify_ads_error(status, &text, &self.waits));
            }
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            let setting = &v["results"][0]["customer"]["conversionTrackingSetting"];
            accepted = setting["acceptedCustomerDataTerms"].as_bool() == Some(true);
            let owner = setting["googleAdsConversionCustomer"]
                .as_str()
                .and_then(|c| c.strip_prefix("customers/"))
                .map(str::to_string);
            match owner {
                Some(o) if o != target => target = o,
                _ => break,
            }
        }
        if let Ok(mut t) = self.terms.lock() {
            t.insert(customer.to_string(), (accepted, Instant::now()));
        }
        Ok(accepted)
    }
}
