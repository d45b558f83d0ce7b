//! The fake Google Ads API: what it keeps, counts and refuses.

use super::{CUSTOMER, Client, adjust, ads_time, hash, request_error, row_errors, upload};
use crate::fakes::Clock;
use crate::fakes::google::{ADWORDS_SCOPE, Conversion, ConversionKey, FakeGoogle, OrderKey};
use bridge_core::timestamp::Timestamp;
use serde_json::{Value, json};
use std::time::Duration;

fn action(id: &str) -> String {
    format!("customers/{CUSTOMER}/conversionActions/{id}")
}

fn click(order: Option<&str>, action_id: &str, at: &str, value: f64) -> Value {
    let mut r = json!({"gclid": "G-1", "conversionAction": action(action_id), "conversionDateTime": at,
        "conversionValue": value, "currencyCode": "USD", "consent": {"adUserData": "GRANTED"}});
    if let Some(o) = order {
        r["orderId"] = json!(o);
    }
    r
}

fn restate(order: &str, action_id: &str, at: &str, value: f64) -> Value {
    json!({"conversionAction": action(action_id), "adjustmentType": "RESTATEMENT", "orderId": order,
        "adjustmentDateTime": at, "restatementValue": {"adjustedValue": value, "currencyCode": "USD"}})
}

fn retract(order: &str, action_id: &str, at: &str) -> Value {
    json!({"conversionAction": action(action_id), "adjustmentType": "RETRACTION", "orderId": order, "adjustmentDateTime": at})
}

fn hours_ago(h: i64) -> String {
    ads_time(Timestamp::now().minus_secs(h * 3600))
}

#[tokio::test]
async fn the_first_conversion_per_action_and_order_is_kept() {
    let fake = FakeGoogle::start().await;
    let c = Client::new(&fake).await;
    let at = hours_ago(30);
    let (s, b) = c.upload(vec![click(Some("O-1"), "1", &at, 10.0)]).await;
    assert_eq!((s, row_errors(&b)), (200, vec![]), "{b}");
    let (_, b) = c.upload(vec![click(Some("O-1"), "1", &at, 20.0)]).await;
    assert_eq!(row_errors(&b), [(0, "ORDER_ID_ALREADY_IN_USE".to_string())]);
    assert_eq!(b["results"], json!([{}]));
    // The same order id under another action is another conversion.
    let (_, b) = c.upload(vec![click(Some("O-1"), "2", &at, 20.0)]).await;
    assert_eq!(row_errors(&b), vec![]);
    assert_eq!(fake.count(), 2);
    assert_eq!(
        fake.revenue()["USD"],
        30.0,
        "the original 10 kept, 20 under action 2"
    );
    assert_eq!(fake.requests("uploadClickConversions").len(), 3);
    assert!(
        b["jobId"]
            .as_str()
            .and_then(|j| j.parse::<i64>().ok())
            .is_some_and(|j| j >= 1 << 31)
    );
}

#[tokio::test]
async fn a_repeated_order_fails_every_row_and_unordered_rows_are_all_kept() {
    let fake = FakeGoogle::start().await;
    let c = Client::new(&fake).await;
    let (a, b_) = (hours_ago(30), hours_ago(29));
    let (_, b) = c
        .upload(vec![
            click(Some("O-2"), "1", &a, 1.0),
            click(Some("O-2"), "1", &b_, 1.0),
            click(Some("O-3"), "1", &a, 1.0),
        ])
        .await;
    assert_eq!(
        row_errors(&b),
        [
            (0, "DUPLICATE_ORDER_ID".to_string()),
            (1, "DUPLICATE_ORDER_ID".to_string())
        ]
    );
    assert_eq!(fake.count(), 1, "none of the repeated order imported");
    // Rows without an order id: one per request, each kept (none overwrites another).
    for at in [&a, &b_] {
        let (_, b) = c.upload(vec![click(None, "1", at, 2.0)]).await;
        assert_eq!(row_errors(&b), vec![]);
    }
    assert_eq!(fake.count(), 3);
    let (_, b) = c.upload(vec![click(None, "1", &a, 2.0)]).await;
    assert_eq!(
        row_errors(&b),
        [(0, "CLICK_CONVERSION_ALREADY_EXISTS".to_string())]
    );
    let t = hours_ago(28);
    let (_, b) = c
        .upload(vec![click(None, "1", &t, 2.0), click(None, "1", &t, 2.0)])
        .await;
    assert_eq!(row_errors(&b).len(), 2);
    assert!(
        row_errors(&b)
            .iter()
            .all(|(_, e)| e == "DUPLICATE_CLICK_CONVERSION_IN_REQUEST")
    );
    assert_eq!(fake.conversions().len(), 3);
    assert!(fake.conversions().contains_key("O-3"));
}

#[tokio::test]
async fn the_latest_restatement_wins_and_a_retraction_is_final() {
    let fake = FakeGoogle::start().await;
    let c = Client::new(&fake).await;
    c.upload(vec![click(Some("O-A"), "1", &hours_ago(30), 100.0)])
        .await;
    let (t1, t15, t2, t3, t4) = (
        hours_ago(10),
        hours_ago(9),
        hours_ago(8),
        hours_ago(7),
        hours_ago(6),
    );
    let run = |rows: Vec<Value>| c.adjust(rows);
    assert_eq!(
        row_errors(&run(vec![restate("O-A", "1", &t1, 70.0)]).await.1),
        vec![]
    );
    assert_eq!(
        row_errors(&run(vec![restate("O-A", "1", &t2, 50.0)]).await.1),
        vec![]
    );
    assert_eq!(
        row_errors(&run(vec![restate("O-A", "1", &t15, 60.0)]).await.1),
        [(0, "MORE_RECENT_RESTATEMENT_FOUND".to_string())]
    );
    assert_eq!(
        row_errors(&run(vec![restate("O-A", "1", &t2, 40.0)]).await.1),
        [(0, "RESTATEMENT_ALREADY_EXISTS".to_string())]
    );
    assert_eq!(fake.revenue()["USD"], 50.0);
    // Two adjustments of one conversion at one time in one request: both refused.
    let (_, b) = run(vec![
        restate("O-A", "1", &t3, 30.0),
        retract("O-A", "1", &t3),
    ])
    .await;
    assert_eq!(
        row_errors(&b),
        [
            (0, "DUPLICATE_ADJUSTMENT_IN_REQUEST".to_string()),
            (1, "DUPLICATE_ADJUSTMENT_IN_REQUEST".to_string())
        ]
    );
    assert_eq!(fake.revenue()["USD"], 50.0);
    // The lookup is per conversion action.
    assert_eq!(
        row_errors(&run(vec![retract("O-A", "2", &t3)]).await.1),
        [(0, "CONVERSION_NOT_FOUND".to_string())]
    );
    assert_eq!(
        row_errors(&run(vec![retract("O-A", "1", &t3)]).await.1),
        vec![]
    );
    assert_eq!(
        row_errors(&run(vec![restate("O-A", "1", &t4, 10.0)]).await.1),
        [(0, "CONVERSION_ALREADY_RETRACTED".to_string())]
    );
    assert_eq!(fake.count(), 0, "a retracted conversion counts zero");
    assert_eq!(fake.revenue().get("USD"), None);
    assert!(fake.conversions()["O-A"].retracted);
    // A gclid + time pair names a conversion without an order id; both at once is refused.
    let at = hours_ago(30);
    c.upload(vec![click(None, "1", &at, 5.0)]).await;
    let pair = json!({"conversionAction": action("1"), "adjustmentType": "RESTATEMENT", "adjustmentDateTime": t1,
        "gclidDateTimePair": {"gclid": "G-1", "conversionDateTime": at}, "restatementValue": {"adjustedValue": 4.0}});
    assert_eq!(row_errors(&run(vec![pair.clone()]).await.1), vec![]);
    assert_eq!(fake.revenue()["USD"], 4.0);
    let mut both = pair;
    both["orderId"] = json!("O-A");
    assert_eq!(
        row_errors(&run(vec![both]).await.1),
        [(0, "GCLID_DATE_TIME_PAIR_AND_ORDER_ID_BOTH_SET".to_string())]
    );
}

#[tokio::test]
async fn consent_terms_and_allowlist_are_enforced_per_row_or_request() {
    let fake = FakeGoogle::start().await;
    let c = Client::new(&fake).await;
    let at = hours_ago(30);
    let mut personalised = click(Some("O-P"), "1", &at, 1.0);
    personalised["consent"]["adPersonalization"] = json!("GRANTED");
    assert_eq!(
        row_errors(&c.upload(vec![personalised]).await.1),
        [(0, "VALUE_MUST_BE_UNSET".to_string())]
    );
    fake.with(|d| d.terms.insert(CUSTOMER.into(), false));
    let mut with_data = click(Some("O-U"), "1", &at, 1.0);
    with_data["userIdentifiers"] = json!([{"hashedEmail": hash("ada@example.com")}]);
    let (_, b) = c
        .upload(vec![with_data, click(Some("O-C"), "1", &at, 1.0)])
        .await;
    assert_eq!(
        row_errors(&b),
        [(0, "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS".to_string())]
    );
    assert_eq!(fake.count(), 1, "the click-only row imports");
    let mut address = click(Some("O-X"), "1", &at, 1.0);
    address["userIdentifiers"] = json!([{"addressInfo": {"hashedFirstName": hash("ada")}}]);
    assert_eq!(
        row_errors(&c.upload(vec![address]).await.1),
        [(0, "UNSUPPORTED_USER_IDENTIFIER".to_string())]
    );
    // An enum value the API does not know fails the whole request (proto3 JSON mapping).
    let mut bad = click(Some("O-E"), "1", &at, 1.0);
    bad["consent"]["adUserData"] = json!("YES");
    assert_eq!(c.upload(vec![bad]).await.0, 400);
    fake.set_allowlisted(CUSTOMER, false);
    let (s, b) = c.upload(vec![click(Some("O-N"), "1", &at, 1.0)]).await;
    assert_eq!(
        (s, request_error(&b)),
        (
            403,
            (
                "notAllowlistedError".into(),
                "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE".into()
            )
        )
    );
    // Unknown actions once a registry exists; an action of the wrong type.
    fake.set_allowlisted(CUSTOMER, true);
    fake.add_conversion_action("1", "UPLOAD_CLICKS");
    fake.add_conversion_action("3", "WEBPAGE");
    let (_, b) = c
        .upload(vec![
            click(Some("O-9"), "9", &at, 1.0),
            click(Some("O-9"), "3", &at, 1.0),
        ])
        .await;
    assert_eq!(
        row_errors(&b),
        [
            (0, "NO_CONVERSION_ACTION_FOUND".to_string()),
            (1, "INVALID_CONVERSION_ACTION_TYPE".to_string())
        ]
    );
}

#[tokio::test]
async fn click_times_on_the_fakes_clock_drive_the_timing_codes() {
    let fake = FakeGoogle::start().await;
    let clock = Clock::virtual_at(Timestamp::now());
    fake.set_clock(clock.clone());
    let mut c = Client::new(&fake).await;
    let now = clock.now();
    fake.add_click("G-1", now.minus_secs(3600));
    let row = click(Some("O-R"), "1", &ads_time(now.minus_secs(1800)), 1.0);
    let (_, b) = c.upload(vec![row.clone()]).await;
    assert_eq!(row_errors(&b), [(0, "TOO_RECENT_EVENT".to_string())]);
    clock.advance(Duration::from_secs(6 * 3600));
    c.refresh().await;
    let early = click(Some("O-E"), "1", &ads_time(now.minus_secs(7200)), 1.0);
    let (_, b) = c.upload(vec![row, early]).await;
    assert_eq!(
        row_errors(&b),
        [(1, "CONVERSION_PRECEDES_EVENT".to_string())]
    );
    fake.with(|d| d.unknown_clicks.insert("G-2".into()));
    let mut unknown = click(Some("O-U"), "1", &ads_time(now), 1.0);
    unknown["gclid"] = json!("G-2");
    assert_eq!(
        row_errors(&c.upload(vec![unknown]).await.1),
        [(0, "EVENT_NOT_FOUND".to_string())]
    );
    // 55 days after the conversion, it can no longer be adjusted.
    clock.advance(Duration::from_secs(55 * 86_400));
    c.refresh().await;
    let (_, b) = c
        .adjust(vec![retract("O-R", "1", &ads_time(clock.now()))])
        .await;
    assert_eq!(row_errors(&b), [(0, "CONVERSION_EXPIRED".to_string())]);
}

#[tokio::test]
async fn the_frame_partial_failure_row_limits_job_ids_and_scopes() {
    let fake = FakeGoogle::start().await;
    let c = Client::new(&fake).await;
    let at = hours_ago(30);
    let (s, b) = c
        .ads(
            "uploadClickConversions",
            json!({"conversions": [click(None, "1", &at, 1.0)], "partialFailure": false}),
        )
        .await;
    assert_eq!(
        (s, request_error(&b)),
        (
            400,
            (
                "partialFailureError".into(),
                "PARTIAL_FAILURE_MODE_REQUIRED".into()
            )
        )
    );
    let many: Vec<Value> = (0..2001)
        .map(|i| click(Some(&format!("M-{i}")), "1", &at, 1.0))
        .collect();
    let (s, b) = c.upload(many).await;
    assert_eq!(
        (s, request_error(&b).1),
        (400, "TOO_MANY_CONVERSIONS_IN_REQUEST".into())
    );
    let mut body = upload(vec![click(Some("J-1"), "1", &at, 1.0)]);
    body["jobId"] = json!(0);
    assert_eq!(
        request_error(&c.ads("uploadClickConversions", body.clone()).await.1).1,
        "INVALID_JOB_ID"
    );
    body["jobId"] = json!(5);
    assert_eq!(c.ads("uploadClickConversions", body).await.1["jobId"], "5");
    let mut adj = adjust(vec![retract("J-1", "1", &hours_ago(1))]);
    adj["jobId"] = json!(6);
    let (s, b) = c.ads("uploadConversionAdjustments", adj).await;
    assert_eq!((s, &b["jobId"]), (200, &json!("6")), "{b}");
    // validateOnly: errors only, nothing stored.
    let mut dry = upload(vec![click(Some("V-1"), "1", &at, 1.0)]);
    dry["validateOnly"] = json!(true);
    let (_, b) = c.ads("uploadClickConversions", dry).await;
    assert_eq!(b["results"], json!([]));
    assert!(!fake.conversions().contains_key("V-1"));
    // A token without the datamanager scope cannot ingest, and one without adwords cannot upload.
    fake.with(|d| d.refresh_token_scopes = vec![ADWORDS_SCOPE.into()]);
    let c = Client::new(&fake).await;
    let (s, b) = c.ingest(json!({})).await;
    assert_eq!(
        (s, b["error"]["status"].as_str()),
        (403, Some("PERMISSION_DENIED"))
    );
    assert_eq!(fake.with(|d| d.scope_denied), 1);
}

#[tokio::test]
async fn a_lead_without_a_click_needs_enhanced_conversions_for_leads_turned_on() {
    let fake = FakeGoogle::start().await;
    let c = Client::new(&fake).await;
    let at = hours_ago(30);
    let lead = |order: &str| {
        let mut r = click(Some(order), "1", &at, 1.0);
        r.as_object_mut().unwrap().remove("gclid");
        r["userIdentifiers"] = json!([{"hashedEmail": hash("ada@example.com")}]);
        r
    };
    fake.with(|d| d.ec_for_leads_disabled.insert(CUSTOMER.into()));
    let (_, b) = c
        .upload(vec![lead("O-L1"), click(Some("O-C1"), "1", &at, 1.0)])
        .await;
    assert_eq!(
        row_errors(&b),
        [(
            0,
            "CUSTOMER_NOT_ENABLED_ENHANCED_CONVERSIONS_FOR_LEADS".to_string()
        )],
        "{b}"
    );
    assert_eq!(
        fake.count(),
        1,
        "a row with a click id is not a lead conversion"
    );
    fake.with(|d| d.ec_for_leads_disabled.clear());
    let (_, b) = c.upload(vec![lead("O-L2")]).await;
    assert_eq!(row_errors(&b), vec![], "{b}");
    assert_eq!(fake.count(), 2);
}

#[tokio::test]
async fn account_action_and_click_configuration_refuse_their_rows() {
    let fake = FakeGoogle::start().await;
    let c = Client::new(&fake).await;
    let at = hours_ago(30);
    let braid = |order: &str, action_id: &str| {
        let mut r = click(Some(order), action_id, &at, 1.0);
        let o = r.as_object_mut().unwrap();
        o.remove("gclid");
        o.insert("gbraid".into(), json!("B-1"));
        r
    };
    let with_click = |order: &str, gclid: &str| {
        let mut r = click(Some(order), "1", &at, 1.0);
        r["gclid"] = json!(gclid);
        r
    };
    let mut enhanced = click(Some("O-EC"), "1", &at, 1.0);
    enhanced["userIdentifiers"] = json!([{"hashedEmail": hash("ada@example.com")}]);
    fake.with(|d| {
        d.one_per_click_actions.insert("7".into());
        d.click_accounts
            .insert("G-OTHER".into(), ("2222222222".into(), true));
        d.click_accounts
            .insert("G-FOREIGN".into(), ("3333333333".into(), false));
        d.click_accounts
            .insert("G-MINE".into(), (CUSTOMER.into(), true));
        d.ec_prohibited.insert(CUSTOMER.into());
    });
    let (_, b) = c
        .upload(vec![
            braid("O-B7", "7"),
            braid("O-B1", "1"),
            with_click("O-OTHER", "G-OTHER"),
            with_click("O-FOREIGN", "G-FOREIGN"),
            with_click("O-MINE", "G-MINE"),
            enhanced,
        ])
        .await;
    assert_eq!(
        row_errors(&b),
        [
            (
                0,
                "ONE_PER_CLICK_CONVERSION_ACTION_NOT_PERMITTED_WITH_BRAID".to_string()
            ),
            (2, "INVALID_CUSTOMER_FOR_CLICK".to_string()),
            (3, "UNAUTHORIZED_CUSTOMER".to_string()),
            (
                5,
                "CUSTOMER_DATA_POLICY_PROHIBITS_ENHANCED_CONVERSIONS".to_string()
            ),
        ],
        "{b}"
    );
    assert_eq!(
        fake.count(),
        2,
        "a braid on a many-per-click action and a click of this account import"
    );

    // Enhancements (G-ERR-ADJ #16, #23), of a conversion the site's tag recorded under a
    // WEBPAGE action (uploads cannot create one: INVALID_CONVERSION_ACTION_TYPE).
    fake.add_conversion_action("8", "WEBPAGE");
    fake.add_conversion_action("9", "WEBPAGE");
    fake.with(|d| {
        let tagged = Conversion {
            customer: CUSTOMER.into(),
            action: action("8"),
            action_id: "8".into(),
            order_id: Some("O-W8".into()),
            gclid: None,
            gbraid: None,
            wbraid: None,
            value: 1.0,
            currency: "USD".into(),
            at: at.clone(),
            retracted: false,
            adjusted_at: None,
            restatements: 0,
            enhanced: false,
        };
        let key = ConversionKey {
            customer: CUSTOMER.into(),
            action_id: "8".into(),
            order: OrderKey::Order("O-W8".into()),
        };
        d.conversions.insert(key, tagged)
    });
    let enhance = |order: &str, action_id: &str| {
        json!({"conversionAction": action(action_id), "adjustmentType": "ENHANCEMENT", "orderId": order,
            "adjustmentDateTime": hours_ago(1), "userIdentifiers": [{"hashedEmail": hash("ada@example.com")}]})
    };
    fake.with(|d| d.not_enhanceable_actions.insert("9".into()));
    let (_, b) = c
        .adjust(vec![enhance("O-W9", "9"), enhance("O-W8", "8")])
        .await;
    assert_eq!(
        row_errors(&b),
        [
            (
                0,
                "CONVERSION_ACTION_NOT_ELIGIBLE_FOR_ENHANCEMENT".to_string()
            ),
            (1, "CUSTOMER_DATA_POLICY_PROHIBITS_ENHANCEMENT".to_string()),
        ],
        "{b}"
    );
    fake.with(|d| d.ec_prohibited.clear());
    let (_, b) = c.adjust(vec![enhance("O-W8", "8")]).await;
    assert_eq!(row_errors(&b), vec![], "{b}");
}
