//! A strict fake of Google's OAuth token endpoint (`oauth`), the Google Ads API's click
//! conversion and adjustment uploads and GAQL terms pre-flight (`ads`, `ads_clicks`,
//! `ads_adjustments`) and the Data Manager API's events:ingest and requestStatus:retrieve
//! (`data_manager`, `dm_processing`). Every rule names its source; the fake counts what Google
//! counts: Ads conversions per (customer, conversion action, order id), retracted ones at zero,
//! and Data Manager conversions only once their asynchronous processing succeeded.

mod ads;
mod ads_adjustments;
mod ads_clicks;
mod data_manager;
mod dm_processing;
mod oauth;
mod shared;
#[cfg(test)]
mod tests;

use super::{Chaos, Clock, Controls};
use axum::Router;
use axum::routing::{get, post};
use bridge_core::timestamp::Timestamp;
use serde_json::{Value, json};
use shared::lock;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use super::Fault;
pub use data_manager::dm_aborted;
pub use dm_processing::{
    DmAccount, DmConversion, DmJob, DmJobDestination, DmKey, DmOutcome, EcTermsCheck,
};
pub use oauth::{ADWORDS_SCOPE, DATAMANAGER_SCOPE, Token};

/// Which conversion an Ads API row created: per customer and conversion action id, by order
/// id (source: G-SVC-UP `order_id`: "An order id can only be used for one conversion per
/// conversion action"); rows without an order id each get their own number.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConversionKey {
    pub customer: String,
    pub action_id: String,
    pub order: OrderKey,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OrderKey {
    Order(String),
    /// A conversion uploaded without an order id, numbered in upload order.
    Unordered(u64),
}

/// One conversion the Ads API imported.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversion {
    pub customer: String,
    /// The conversion action's resource name as uploaded.
    pub action: String,
    pub action_id: String,
    pub order_id: Option<String>,
    pub gclid: Option<String>,
    pub gbraid: Option<String>,
    pub wbraid: Option<String>,
    pub value: f64,
    /// As uploaded; empty when the row named none (the action's or account's currency applies).
    pub currency: String,
    /// conversionDateTime as uploaded.
    pub at: String,
    pub retracted: bool,
    /// The latest restatement's adjustmentDateTime.
    pub adjusted_at: Option<String>,
    pub restatements: u32,
    pub enhanced: bool,
}

pub struct Data {
    pub controls: Controls,

    // OAuth
    /// Access tokens issued.
    pub tokens: HashMap<String, Token>,
    pub token_grants: usize,
    /// Lifetime of new tokens; 0 means Google's usual 3599 s.
    pub token_lifetime_secs: u64,
    /// The scopes the refresh token was granted (both APIs' by default, so current clients work).
    pub refresh_token_scopes: Vec<String>,
    /// Requests answered 401 because the token was missing, unknown or expired.
    pub unauthenticated: usize,
    /// Requests answered 403 because the token lacked the API's scope.
    pub scope_denied: usize,

    // Google Ads API
    /// customer id -> accepted customer data terms (absent: accepted).
    pub terms: HashMap<String, bool>,
    /// Customers whose developer token is not allowlisted for offline click conversion import.
    pub not_allowlisted: HashSet<String>,
    /// Customers whose `conversion_tracking_setting.enhanced_conversions_for_leads_enabled` is
    /// false (absent: enabled).
    pub ec_for_leads_disabled: HashSet<String>,
    /// Customers where Google's customer data policies prohibit enhanced conversions (G-ERR-UP
    /// #47, G-ERR-ADJ #23).
    pub ec_prohibited: HashSet<String>,
    /// Conversion action ids counted one per click (ONE_PER_CLICK), which refuse braids
    /// (G-ERR-UP #46).
    pub one_per_click_actions: HashSet<String>,
    /// Conversion action ids that cannot take enhancements (G-ERR-ADJ #16).
    pub not_enhanceable_actions: HashSet<String>,
    /// gclid -> (the Google Ads account the click belongs to, whether the uploader's login can
    /// reach that account). Absent: the click belongs to the uploading customer.
    pub click_accounts: HashMap<String, (String, bool)>,
    /// Conversion action id -> type (UPLOAD_CLICKS, WEBPAGE, SALESFORCE, ...). Empty: every id
    /// exists, as an UPLOAD_CLICKS action.
    pub conversion_actions: HashMap<String, String>,
    /// When each gclid was clicked, as far as the test told the fake; drives TOO_RECENT_EVENT,
    /// CONVERSION_PRECEDES_EVENT and EXPIRED_EVENT (and their Data Manager counterparts).
    pub clicks: HashMap<String, Timestamp>,
    /// gclids Google cannot attribute (Ads: EVENT_NOT_FOUND; Data Manager: CLICK_NOT_FOUND).
    pub unknown_clicks: HashSet<String>,
    /// Order ids / transaction ids whose clicks are under 6 hours old, until cleared (a hook
    /// beside `clicks`).
    pub too_recent: HashSet<String>,
    /// The conversion actions' click-through window (EXPIRED_EVENT); 90 days is Google's maximum.
    pub click_through_days: i64,
    /// The currency counted for a conversion uploaded without one (the action's or account's).
    pub default_currency: String,
    pub searches: usize,
    pub conversions: BTreeMap<ConversionKey, Conversion>,
    pub(crate) next_unordered: u64,

    // Data Manager API
    /// Per operating account id: its configuration (absent: all in order).
    pub dm_accounts: HashMap<String, DmAccount>,
    /// requestStatus answers PROCESSING this many times before the job completes.
    pub dm_processing_polls: u32,
    /// A job completes no earlier than this long (on the fake's clock) after its ingest.
    pub dm_processing_delay: Duration,
    /// transactionId -> the PROCESSING_ERROR_REASON_... its record fails processing with.
    pub dm_fail: HashMap<String, String>,
    /// Every successful, non-validateOnly ingest, in order.
    pub dm_jobs: Vec<DmJob>,
    /// Conversions after processing, merged by transactionId.
    pub dm_conversions: BTreeMap<DmKey, DmConversion>,

    // Both APIs
    /// Every request the fake processed (even with row errors): (method, body).
    pub requests: Vec<(String, Value)>,
    pub batch_sizes: Vec<usize>,
    /// Order ids / transaction ids the fake treats as invalid rows (a permanent row error).
    pub poison: HashSet<String>,
}

impl Default for Data {
    fn default() -> Self {
        Data {
            controls: Controls::default(),
            tokens: HashMap::new(),
            token_grants: 0,
            token_lifetime_secs: 0,
            refresh_token_scopes: vec![ADWORDS_SCOPE.into(), DATAMANAGER_SCOPE.into()],
            unauthenticated: 0,
            scope_denied: 0,
            terms: HashMap::new(),
            not_allowlisted: HashSet::new(),
            ec_for_leads_disabled: HashSet::new(),
            ec_prohibited: HashSet::new(),
            one_per_click_actions: HashSet::new(),
            not_enhanceable_actions: HashSet::new(),
            click_accounts: HashMap::new(),
            conversion_actions: HashMap::new(),
            clicks: HashMap::new(),
            unknown_clicks: HashSet::new(),
            too_recent: HashSet::new(),
            click_through_days: 90,
            default_currency: "USD".into(),
            searches: 0,
            conversions: BTreeMap::new(),
            next_unordered: 0,
            dm_accounts: HashMap::new(),
            dm_processing_polls: 1,
            dm_processing_delay: Duration::ZERO,
            dm_fail: HashMap::new(),
            dm_jobs: Vec::new(),
            dm_conversions: BTreeMap::new(),
            requests: Vec::new(),
            batch_sizes: Vec::new(),
            poison: HashSet::new(),
        }
    }
}

#[derive(Clone)]
pub struct FakeGoogle {
    pub base_url: String,
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
    pub developer_token: String,
    pub data: Arc<Mutex<Data>>,
}

/// Per-currency sums, with `default` for amounts that name no currency.
fn per_currency<'a>(
    items: impl Iterator<Item = (f64, Option<&'a str>)>,
    default: &str,
) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for (v, c) in items {
        let c = c.filter(|c| !c.is_empty()).unwrap_or(default);
        *m.entry(c.to_string()).or_insert(0.0) += v;
    }
    m
}

impl FakeGoogle {
    /// Starts on an ephemeral loopback port.
    pub async fn start() -> FakeGoogle {
        Self::start_on("127.0.0.1:0").await
    }

    /// Starts on `addr` (the local stack uses a fixed port). The OAuth endpoint is
    /// `{base_url}/token`; both APIs live under `base_url`.
    pub async fn start_on(addr: &str) -> FakeGoogle {
        let fake = FakeGoogle {
            base_url: String::new(),
            client_id: "fake-client.apps.googleusercontent.com".into(),
            client_secret: "fake-client-secret".into(),
            refresh_token: "1//fake-refresh-token".into(),
            developer_token: "fake-developer-token".into(),
            data: Arc::new(Mutex::new(Data::default())),
        };
        let app = Router::new()
            .route("/token", post(oauth::token))
            .route("/{version}/customers/{*rest}", post(ads::handle))
            .route("/v1/events:ingest", post(data_manager::ingest))
            .route("/v1/requestStatus:retrieve", get(dm_processing::retrieve))
            .with_state(fake.clone());
        let base_url = super::serve_on(addr, app).await;
        FakeGoogle { base_url, ..fake }
    }

    pub fn token_url(&self) -> String {
        format!("{}/token", self.base_url)
    }

    /// The credentials JSON the sender reads from SSM.
    pub fn credentials_json(&self) -> String {
        json!({"client_id": self.client_id, "client_secret": self.client_secret,
               "refresh_token": self.refresh_token, "developer_token": self.developer_token})
        .to_string()
    }

    super::state_controls!();

    /// Invalidates every token issued so far (they "expire" mid-run).
    pub fn expire_tokens(&self) {
        self.with(|d| d.tokens.values_mut().for_each(|t| t.revoked = true));
    }

    /// Tells the fake when `gclid` was clicked.
    pub fn add_click(&self, gclid: &str, at: Timestamp) {
        self.with(|d| d.clicks.insert(gclid.to_string(), at));
    }

    /// Registers a conversion action; once any is registered, unknown ids are NO_CONVERSION_ACTION_FOUND.
    pub fn add_conversion_action(&self, id: &str, kind: &str) {
        self.with(|d| {
            d.conversion_actions
                .insert(id.to_string(), kind.to_string())
        });
    }

    /// Whether `customer` may import offline click conversions (G-BLOG-OCI).
    pub fn set_allowlisted(&self, customer: &str, allowed: bool) {
        self.with(|d| {
            if allowed {
                d.not_allowlisted.remove(customer);
            } else {
                d.not_allowlisted.insert(customer.to_string());
            }
        });
    }

    /// Every Ads API conversion by its full key, retracted ones included.
    pub fn conversions_by_key(&self) -> BTreeMap<ConversionKey, Conversion> {
        self.with(|d| d.conversions.clone())
    }

    /// Ads API conversions by order id (`no-order-{n}` for rows without one), retracted ones
    /// included. An order id used under several actions appears once: use `conversions_by_key`.
    pub fn conversions(&self) -> BTreeMap<String, Conversion> {
        self.conversions_by_key()
            .into_iter()
            .map(|(k, c)| match k.order {
                OrderKey::Order(o) => (o, c),
                OrderKey::Unordered(n) => (format!("no-order-{n}"), c),
            })
            .collect()
    }

    /// Conversions Google counts: a retracted one counts zero (source: G-ENUM-ADJ, RETRACTION
    /// "Negates a conversion so that its total value and count are both zero").
    pub fn count(&self) -> usize {
        self.with(|d| d.conversions.values().filter(|c| !c.retracted).count())
    }

    /// Revenue Google holds per currency: each non-retracted conversion at its current (latest
    /// restated) value (source: G-ENUM-ADJ, G-HC-ADJ).
    pub fn revenue(&self) -> BTreeMap<String, f64> {
        self.with(|d| {
            per_currency(
                d.conversions
                    .values()
                    .filter(|c| !c.retracted)
                    .map(|c| (c.value, Some(c.currency.as_str()))),
                &d.default_currency,
            )
        })
    }

    pub fn requests(&self, kind: &str) -> Vec<Value> {
        self.with(|d| {
            d.requests
                .iter()
                .filter(|(k, _)| k == kind)
                .map(|(_, v)| v.clone())
                .collect()
        })
    }

    /// Changes one Data Manager operating account's configuration.
    pub fn dm_account(&self, account_id: &str, f: impl FnOnce(&mut DmAccount)) {
        self.with(|d| f(d.dm_accounts.entry(account_id.to_string()).or_default()));
    }

    /// Makes the record with this transactionId fail processing with `reason`
    /// (a PROCESSING_ERROR_REASON_... value).
    pub fn dm_fail(&self, transaction_id: &str, reason: &str) {
        self.with(|d| {
            d.dm_fail
                .insert(transaction_id.to_string(), reason.to_string())
        });
    }

    /// Google finishes processing every pending Data Manager request now, in ingest order.
    pub fn dm_complete_all(&self) {
        self.with(|d| {
            for job in &mut d.dm_jobs {
                job.forced = true;
            }
            dm_processing::process_due(d);
        });
    }

    /// The requestIds issued, in order.
    pub fn dm_request_ids(&self) -> Vec<String> {
        self.with(|d| d.dm_jobs.iter().map(|j| j.request_id.clone()).collect())
    }

    /// Requests still processing.
    pub fn dm_pending(&self) -> usize {
        self.with(|d| {
            dm_processing::process_due(d);
            d.dm_jobs.iter().filter(|j| j.outcome.is_none()).count()
        })
    }

    /// Data Manager conversions after processing, per (operating account, conversion action,
    /// transactionId).
    pub fn dm_conversions(&self) -> BTreeMap<DmKey, DmConversion> {
        self.with(|d| {
            dm_processing::process_due(d);
            d.dm_conversions.clone()
        })
    }

    /// Data Manager conversions Google counts (an adjustment adds none, DM-ADJ).
    pub fn dm_count(&self) -> usize {
        self.dm_conversions().len()
    }

    /// Data Manager revenue per currency: each conversion at its latest value (DM-ADJ).
    pub fn dm_revenue(&self) -> BTreeMap<String, f64> {
        self.with(|d| {
            dm_processing::process_due(d);
            per_currency(
                d.dm_conversions
                    .values()
                    .map(|c| (c.value.unwrap_or(0.0), c.currency.as_deref())),
                &d.default_currency,
            )
        })
    }
}
