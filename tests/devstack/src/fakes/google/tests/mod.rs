//! Unit tests of the fake Google APIs, through HTTP as a client sees them; `Client` holds a
//! token and speaks both APIs.

mod ads;
mod dm;

use super::FakeGoogle;
use bridge_core::timestamp::Timestamp;
use serde_json::{Value, json};

pub(super) const CUSTOMER: &str = "1234567890";

pub(super) struct Client {
    pub fake: FakeGoogle,
    http: reqwest::Client,
    token: String,
}

impl Client {
    pub async fn new(fake: &FakeGoogle) -> Client {
        let mut c = Client {
            fake: fake.clone(),
            http: bridge_platforms::http::client().expect("HTTP client"),
            token: String::new(),
        };
        c.refresh().await;
        c
    }

    /// A new access token (after the clock moved past the old one's expiry).
    pub async fn refresh(&mut self) {
        let f = &self.fake;
        let r: Value = self
            .http
            .post(f.token_url())
            .form(&[
                ("grant_type", "refresh_token"),
                ("client_id", &f.client_id),
                ("client_secret", &f.client_secret),
                ("refresh_token", &f.refresh_token),
            ])
            .send()
            .await
            .expect("token")
            .json()
            .await
            .expect("token json");
        self.token = r["access_token"].as_str().unwrap_or_default().to_string();
    }

    async fn answer(r: reqwest::RequestBuilder) -> (u16, Value) {
        let r = r.send().await.expect("send");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// `uploadClickConversions` of `rows`, with partial failure as the bridge sends it.
    pub async fn upload(&self, rows: Vec<Value>) -> (u16, Value) {
        self.ads("uploadClickConversions", upload(rows)).await
    }

    /// `uploadConversionAdjustments` of `rows`, with partial failure.
    pub async fn adjust(&self, rows: Vec<Value>) -> (u16, Value) {
        self.ads("uploadConversionAdjustments", adjust(rows)).await
    }

    pub async fn ads(&self, method: &str, body: Value) -> (u16, Value) {
        let url = format!("{}/v26/customers/{CUSTOMER}:{method}", self.fake.base_url);
        Self::answer(
            self.http
                .post(url)
                .bearer_auth(&self.token)
                .header("developer-token", &self.fake.developer_token)
                .json(&body),
        )
        .await
    }

    pub async fn ingest(&self, body: Value) -> (u16, Value) {
        let url = format!("{}/v1/events:ingest", self.fake.base_url);
        Self::answer(self.http.post(url).bearer_auth(&self.token).json(&body)).await
    }

    /// requestStatus:retrieve, with the id URL-encoded (`encode`) or pasted raw.
    pub async fn status(&self, id: &str, encode: bool) -> (u16, Value) {
        let base = format!("{}/v1/requestStatus:retrieve", self.fake.base_url);
        let r = if encode {
            self.http.get(base).query(&[("requestId", id)])
        } else {
            self.http.get(format!("{base}?requestId={id}"))
        };
        Self::answer(r.bearer_auth(&self.token)).await
    }
}

/// An `uploadClickConversions` body of `rows`, with partial failure as the bridge sends it.
pub(super) fn upload(rows: Vec<Value>) -> Value {
    json!({"conversions": rows, "partialFailure": true})
}

/// An `uploadConversionAdjustments` body of `rows`, with partial failure.
pub(super) fn adjust(rows: Vec<Value>) -> Value {
    json!({"conversionAdjustments": rows, "partialFailure": true})
}

/// The row errors of a partial failure: (row, enum value).
pub(super) fn row_errors(v: &Value) -> Vec<(u64, String)> {
    v["partialFailureError"]["details"][0]["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let code = e["errorCode"]
                .as_object()
                .and_then(|o| o.values().next())
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            (
                e["location"]["fieldPathElements"][0]["index"]
                    .as_u64()
                    .unwrap_or(u64::MAX),
                code,
            )
        })
        .collect()
}

/// The one error code of a whole-request Ads API error.
pub(super) fn request_error(v: &Value) -> (String, String) {
    let code = &v["error"]["details"][0]["errors"][0]["errorCode"];
    code.as_object()
        .and_then(|o| o.iter().next())
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .unwrap_or_default()
}

pub(super) fn hash(s: &str) -> String {
    bridge_core::hashing::sha256_hex(s)
}

/// `t` in the Ads API's `yyyy-mm-dd hh:mm:ss+00:00`.
pub(super) fn ads_time(t: Timestamp) -> String {
    let c = t.canonical();
    format!("{} {}+00:00", &c[..10], &c[11..19])
}
