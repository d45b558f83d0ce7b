//! Unit tests of the fake Conversions API: transports, token/proof/dataset checks, the event
//! rules, and the raw and deduplicated counts.

use super::*;
use crate::fakes::Clock;
use bridge_core::hashing::sha256_hex;
use std::time::Duration;

const TOKEN: &str = "meta-token";

fn event(id: Option<&str>, name: &str, value: f64, now: Timestamp) -> Value {
    let mut e = json!({"event_name": name, "event_time": now.unix_secs() - 60, "action_source": "system_generated",
        "user_data": {"em": [sha256_hex("ada@example.com")]},
        "custom_data": {"value": value, "currency": "USD"}});
    if let Some(id) = id {
        e["event_id"] = json!(id);
    }
    e
}

async fn post_json(
    fake: &FakeMeta,
    pixel: &str,
    query: &[(&str, &str)],
    body: Value,
) -> (u16, Value) {
    let r = bridge_platforms::http::client()
        .expect("HTTP client")
        .post(format!("{}/v26.0/{pixel}/events", fake.base_url))
        .query(query)
        .json(&body)
        .send()
        .await
        .expect("send");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn send(fake: &FakeMeta, events: Vec<Value>) -> (u16, Value) {
    post_json(
        fake,
        DEFAULT_PIXEL,
        &[("access_token", TOKEN)],
        json!({"data": events}),
    )
    .await
}

fn code(v: &Value) -> (i64, Option<i64>) {
    (
        v["error"]["code"].as_i64().unwrap_or(0),
        v["error"]["error_subcode"].as_i64(),
    )
}

#[tokio::test]
async fn form_multipart_and_query_json_all_carry_the_parameters_and_the_proof_is_checked() {
    let fake = FakeMeta::start(TOKEN).await;
    fake.set_app_secret(Some("s3cret"));
    let proof = appsecret_proof("s3cret", TOKEN);
    let now = Timestamp::now();
    let data = json!([event(Some("E1"), "Lead", 0.0, now)]);

    let (s, b) = post_json(
        &fake,
        DEFAULT_PIXEL,
        &[("access_token", TOKEN), ("appsecret_proof", &proof)],
        json!({"data": data}),
    )
    .await;
    assert_eq!((s, &b["events_received"]), (200, &json!(1)), "{b}");

    let form = [
        ("access_token", TOKEN.to_string()),
        ("appsecret_proof", proof.clone()),
        ("data", data.to_string()),
        ("test_event_code", "TEST1".to_string()),
    ];
    let events = format!("{}/v26.0/{DEFAULT_PIXEL}/events", fake.base_url);
    let http = bridge_platforms::http::client().expect("HTTP client");
    accepted(http.post(&events).form(&form)).await;

    let boundary = "XyZ";
    let mut body = String::new();
    for (k, v) in &form[..3] {
        body.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
        ));
    }
    body.push_str(&format!("--{boundary}--\r\n"));
    accepted(
        http.post(&events)
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body),
    )
    .await;
    assert_eq!(
        fake.transports(),
        [Transport::QueryJson, Transport::Form, Transport::Multipart]
    );
    // Only the first request put the token in its URL.
    assert_eq!(fake.secrets_in_url(), 1);
    assert_eq!(fake.test_event_codes(), ["TEST1"]);

    let (s, b) = post_json(
        &fake,
        DEFAULT_PIXEL,
        &[("access_token", TOKEN), ("appsecret_proof", "00")],
        json!({"data": data}),
    )
    .await;
    assert_eq!((s, code(&b)), (400, (100, None)), "a wrong proof");
    let (s, b) = send(&fake, vec![event(Some("E2"), "Lead", 0.0, now)]).await;
    assert_eq!((s, code(&b)), (400, (100, None)), "a missing proof");
    // A token inside a JSON body is not documented: refused in strict mode.
    let (_, b) = post_json(
        &fake,
        DEFAULT_PIXEL,
        &[],
        json!({"data": data, "access_token": TOKEN, "appsecret_proof": proof}),
    )
    .await;
    assert_eq!(code(&b), (190, None));
    assert_eq!(fake.accepted().len(), 3);
}

#[tokio::test]
async fn unknown_datasets_and_token_states_get_graphs_codes() {
    let fake = FakeMeta::start(TOKEN).await;
    let now = Timestamp::now();
    let data = json!({"data": [event(Some("E1"), "Lead", 0.0, now)]});
    let (_, b) = post_json(&fake, "999", &[("access_token", TOKEN)], data.clone()).await;
    assert_eq!(code(&b), (100, Some(33)));
    assert_eq!(b["error"]["type"], "GraphMethodException");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("Unsupported post request. Object with ID '999'")
    );
    for (state, want) in [
        (TokenState::Expired, (190, Some(463))),
        (TokenState::Revoked, (102, None)),
        (TokenState::Invalid, (190, None)),
    ] {
        fake.set_token_state(TOKEN, state);
        let (s, b) = post_json(
            &fake,
            DEFAULT_PIXEL,
            &[("access_token", TOKEN)],
            data.clone(),
        )
        .await;
        assert_eq!((s, code(&b)), (400, want), "{state:?}");
    }
    let (_, b) = post_json(&fake, DEFAULT_PIXEL, &[("access_token", "other")], data).await;
    assert_eq!(code(&b), (190, None));
    assert!(fake.accepted().is_empty());
}

#[tokio::test]
async fn dedup_keeps_the_first_per_pixel_name_and_id_within_48_hours() {
    let fake = FakeMeta::start(TOKEN).await;
    fake.add_pixel("2222");
    let clock = Clock::virtual_at(Timestamp::now());
    fake.set_clock(clock.clone());
    let now = clock.now();
    let a = event(Some("A"), "Purchase", 10.0, now);
    assert_eq!(send(&fake, vec![a.clone(), a.clone()]).await.0, 200);
    // No event_id: never deduplicated by id.
    let anon = event(None, "Purchase", 5.0, now);
    assert_eq!(send(&fake, vec![anon.clone(), anon]).await.0, 200);
    // Same pair on another dataset: counted there.
    let (s, _) = post_json(
        &fake,
        "2222",
        &[("access_token", TOKEN)],
        json!({"data": [a]}),
    )
    .await;
    assert_eq!(s, 200);
    // Same pair, different name: not a duplicate.
    assert_eq!(
        send(&fake, vec![event(Some("A"), "Lead", 0.0, now)])
            .await
            .0,
        200
    );
    clock.advance(Duration::from_secs(49 * 3600));
    assert_eq!(
        send(&fake, vec![event(Some("A"), "Purchase", 10.0, clock.now())])
            .await
            .0,
        200
    );

    assert_eq!(fake.purchases_raw().len(), 6);
    assert_eq!(
        fake.purchases_deduped().len(),
        5,
        "one copy of A within 48 h dropped"
    );
    assert_eq!(fake.revenue_raw()["USD"], 50.0);
    assert_eq!(fake.revenue_deduped()["USD"], 40.0);
    assert_eq!(fake.deduped().len(), 6);
    assert_eq!(
        fake.distinct()[&("Purchase".to_string(), "A".to_string())],
        4
    );
}

#[tokio::test]
async fn event_rules_time_customer_information_and_value() {
    let fake = FakeMeta::start(TOKEN).await;
    let clock = Clock::virtual_at(Timestamp::now());
    fake.set_clock(clock.clone());
    let now = clock.now();
    let mut old = event(Some("O"), "Lead", 0.0, now);
    old["event_time"] = json!(now.unix_secs() - 8 * 86_400);
    assert_eq!(code(&send(&fake, vec![old]).await.1), (100, Some(2804003)));
    // Names, or the IP address alone, do not identify anyone; both the IP address and the
    // user agent do (M-CIP's v13 combinations).
    let mut names = event(Some("T1"), "Lead", 0.0, now);
    names["user_data"] = json!({"fn": [sha256_hex("ada")], "ln": [sha256_hex("lovelace")]});
    assert_eq!(
        code(&send(&fake, vec![names]).await.1),
        (100, Some(2804050))
    );
    let mut ip = event(Some("T2"), "Lead", 0.0, now);
    ip["user_data"] = json!({"client_ip_address": "192.0.2.1"});
    assert_eq!(code(&send(&fake, vec![ip]).await.1), (100, Some(2804050)));
    let mut browser = event(Some("T3"), "Lead", 0.0, now);
    browser["user_data"] = json!({"client_ip_address": "192.0.2.1", "client_user_agent": "ua"});
    assert_eq!(send(&fake, vec![browser]).await.0, 200);
    let mut unknown = event(Some("U"), "Lead", 0.0, now);
    unknown["user_data"] = json!({"email": "x"});
    assert_eq!(code(&send(&fake, vec![unknown]).await.1), (100, None));
    let mut plain = event(Some("P"), "Lead", 0.0, now);
    plain["user_data"]["em"] = json!(["ada@example.com"]);
    assert_eq!(code(&send(&fake, vec![plain]).await.1), (100, None));
    let negative = event(Some("N"), "Purchase", -5.0, now);
    assert_eq!(
        code(&send(&fake, vec![negative.clone()]).await.1),
        (100, None)
    );
    let mut no_currency = event(Some("C"), "Purchase", 5.0, now);
    no_currency["custom_data"] = json!({"value": 5.0});
    assert_eq!(code(&send(&fake, vec![no_currency]).await.1), (100, None));
    let mut web = event(Some("W"), "Lead", 0.0, now);
    web["action_source"] = json!("website");
    assert_eq!(code(&send(&fake, vec![web]).await.1), (100, None));
    assert_eq!(
        fake.accepted().len(),
        1,
        "all refused but the IP and user agent pair"
    );
    // A negative value is an undocumented rejection: accepted outside strict mode.
    fake.set_strict(false);
    assert_eq!(send(&fake, vec![negative]).await.0, 200);
}

#[tokio::test]
async fn conversion_leads_fields_need_crm_system_generated_and_an_integer_lead_id() {
    let fake = FakeMeta::start(TOKEN).await;
    let now = Timestamp::now();
    let lead = |lead_id: Value, source: &str, event_source: &str| {
        let mut e = event(Some("L"), "Lead", 0.0, now);
        e["action_source"] = json!(source);
        e["custom_data"] = json!({"event_source": event_source, "lead_event_source": "HubSpot"});
        if !lead_id.is_null() {
            e["user_data"]["lead_id"] = lead_id;
        }
        e
    };
    let ok = lead(json!(1234567890123456u64), "system_generated", "crm");
    assert_eq!(send(&fake, vec![ok]).await.0, 200);
    for bad in [
        lead(json!("1234567890123456"), "system_generated", "crm"),
        lead(json!(12345u64), "system_generated", "crm"),
        lead(json!(1234567890123456u64), "other", "crm"),
        lead(json!(1234567890123456u64), "system_generated", "CRM"),
        lead(Value::Null, "system_generated", "crm"),
    ] {
        let (s, b) = send(&fake, vec![bad.clone()]).await;
        assert_eq!((s, code(&b)), (400, (100, None)), "{bad}");
    }
    fake.set_require_lead_id(false);
    assert_eq!(
        send(&fake, vec![lead(Value::Null, "system_generated", "crm")])
            .await
            .0,
        200
    );
    let mut half = event(Some("H"), "Lead", 0.0, now);
    half["custom_data"] = json!({"event_source": "crm"});
    assert_eq!(code(&send(&fake, vec![half]).await.1), (100, None));
    // A Purchase is no lead stage: the Conversion Leads fields do not belong on it.
    let mut purchase = event(Some("PU"), "Purchase", 5.0, now);
    purchase["action_source"] = json!("system_generated");
    purchase["custom_data"]["event_source"] = json!("crm");
    purchase["custom_data"]["lead_event_source"] = json!("HubSpot");
    purchase["user_data"]["lead_id"] = json!(1234567890123456u64);
    let (_, b) = send(&fake, vec![purchase]).await;
    assert_eq!(code(&b), (100, None));
    assert!(b.to_string().contains("lead stages"), "{b}");
    fake.set_strict(false);
    assert_eq!(
        send(
            &fake,
            vec![lead(json!("1234567890123456"), "system_generated", "crm")]
        )
        .await
        .0,
        200
    );
}

#[test]
fn multipart_fields_are_read_by_name() {
    let body = "--b\r\nContent-Disposition: form-data; name=\"access_token\"\r\n\r\ntok\r\n--b\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\n[{\"a\":1}]\r\n--b--\r\n";
    assert_eq!(
        multipart_fields("multipart/form-data; boundary=b", body.as_bytes()),
        Some(vec![
            ("access_token".into(), "tok".into()),
            ("data".into(), "[{\"a\":1}]".into())
        ])
    );
    assert_eq!(
        multipart_fields("multipart/form-data", body.as_bytes()),
        None
    );
}

/// Sends `req` and checks Graph answered 200.
async fn accepted(req: reqwest::RequestBuilder) {
    let r = req.send().await.expect("send");
    assert_eq!(
        r.status().as_u16(),
        200,
        "{}",
        r.text().await.unwrap_or_default()
    );
}
