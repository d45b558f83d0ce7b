//! The ingest handler end to end against the emulator: signed webhooks from every source,
//! then the table and the queues checked; HubSpot records come from a local fake of its API.

use aws_sdk_sqs::Client as Sqs;
use bridge_aws::config::Settings;
use bridge_aws::dynamodb::DynamoStore;
use bridge_aws::sqs::SqsQueue;
use bridge_core::delivery::{DeliveryStatus, Destination};
use bridge_core::hashing::sha256_hex;
use bridge_core::queue::DeliveryMessage;
use bridge_core::store::EventStore;
use bridge_core::timestamp::Timestamp;
use bridge_core::webhook::hubspot::HubSpotRecords;
use bridge_core::webhook::signature::{bridge_sign, hubspot_sign};
use bridge_platforms::hubspot::HubSpotClient;
use bridge_tests::fakes::hubspot::FakeHubSpot;
use bridge_tests::{Stack, sdk_config};
use ingest::App;
use lambda_http::http::StatusCode;
use lambda_http::{Body, Request};
use serde_json::{Value, json};
use std::sync::Arc;

struct Env {
    app: App,
    store: Arc<DynamoStore>,
    sqs: Sqs,
    stack: Stack,
}

async fn env(test: &str, hubspot: Option<&FakeHubSpot>) -> Env {
    let stack = Stack::create(test, &[]);
    let aws = sdk_config().await;
    // Secrets go through SSM exactly as in AWS: one SecureString per name under a path.
    let ssm = bridge_aws::clients::ssm(&aws);
    let path = format!("/{}/webhooks", stack.name);
    let mut params = vec![
        ("generic", "generic-secret"),
        ("salesforce", "sf-secret"),
        ("hubspot", "hs-bridge-secret"),
        ("hubspot-app-secret", "hs-app-secret"),
    ];
    if let Some(h) = hubspot {
        params.push(("hubspot-token", h.token.as_str()));
    }
    for (k, v) in params {
        ssm.put_parameter()
            .name(format!("{path}/{k}"))
            .value(v)
            .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
            .send()
            .await
            .unwrap();
    }
    let secrets = bridge_aws::clients::parameters_by_path(&ssm, &path)
        .await
        .unwrap();
    let vars = stack.env.clone();
    let settings = Settings::from_lookup(|k| vars.get(k).cloned()).unwrap();
    let store = Arc::new(DynamoStore::new(
        bridge_aws::clients::dynamodb(&aws),
        &settings.table_name,
        settings.retention_days,
    ));
    let sqs = bridge_aws::clients::sqs(&aws);
    let hubspot_api: Option<Arc<dyn HubSpotRecords>> = match (hubspot, secrets.get("hubspot-token"))
    {
        (Some(h), Some(token)) => Some(Arc::new(HubSpotClient::new(
            bridge_platforms::http::client().expect("HTTP client"),
            &h.base_url,
            token,
        ))),
        _ => None,
    };
    let app = App {
        queue: Arc::new(SqsQueue::new(sqs.clone(), settings.queues.clone())),
        store: store.clone(),
        secrets,
        hubspot: hubspot_api,
        max_body_bytes: 64 * 1024,
        public_base_url: Some("https://bridge.example.com".into()),
        hubspot_options: bridge_core::webhook::hubspot::ResolveOptions {
            portal_id: Some(62515),
            ..Default::default()
        },
        settings,
    };
    Env {
        app,
        store,
        sqs,
        stack,
    }
}

fn signed(source: &str, body: &str, secret: &str, t: i64) -> Request {
    lambda_http::http::Request::builder()
        .method("POST")
        .uri(format!("https://bridge.example.com/webhooks/{source}"))
        .header(
            "x-bridge-signature",
            bridge_sign(secret.as_bytes(), t, body.as_bytes()),
        )
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// A HubSpot delivery of `body`, signed now with HubSpot's v3 signature (the app secret).
fn hubspot_signed(body: &str) -> Request {
    let ts = Timestamp::now().unix_ms().to_string();
    let uri = "https://bridge.example.com/webhooks/hubspot";
    lambda_http::http::Request::builder()
        .method("POST")
        .uri(uri)
        .header(
            "x-hubspot-signature-v3",
            hubspot_sign(b"hs-app-secret", "POST", uri, body.as_bytes(), &ts),
        )
        .header("x-hubspot-request-timestamp", &ts)
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// `body` posted to `source`'s webhook, signed with `secret` now.
async fn post_now(app: &App, source: &str, secret: &str, body: &str) -> (StatusCode, Value) {
    call(
        app,
        signed(source, body, secret, Timestamp::now().unix_secs()),
    )
    .await
}

async fn call(app: &App, req: Request) -> (StatusCode, Value) {
    let resp = app.handle(req).await;
    let status = resp.status();
    let body: Value = serde_json::from_slice(resp.body().as_ref()).unwrap_or(Value::Null);
    (status, body)
}

/// Every message now on a queue, as delivery messages (received with a long visibility so
/// none is counted twice).
async fn drain(sqs: &Sqs, url: &str) -> Vec<DeliveryMessage> {
    let mut out = Vec::new();
    loop {
        let r = sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .visibility_timeout(300)
            .send()
            .await
            .unwrap();
        if r.messages().is_empty() {
            return out;
        }
        out.extend(
            r.messages()
                .iter()
                .map(|m| DeliveryMessage::from_body(m.body().unwrap()).unwrap()),
        );
    }
}

fn lead(entity: &str, consent: &str) -> Value {
    json!({"event_name": "lead", "occurred_at": Timestamp::now().minus_secs(600).canonical(), "entity_type": "lead",
           "entity_id": entity, "identity": {"email": format!("{entity}@example.com"), "phone": "+1 650 555 0000"},
           "consent": {"status": consent}})
}

#[tokio::test]
#[ignore = "needs the local AWS emulator: bash infra/local/test.sh starts it and runs this"]
async fn generic_batch_stores_valid_items_names_bad_fields_and_enqueues_only_what_consent_allows() {
    let e = env("generic_batch", None).await;
    let body = json!([
        lead("L-granted", "granted"),
        lead("L-denied", "denied"),
        {"event_name": "won", "occurred_at": "yesterday", "entity_type": "opportunity", "entity_id": "D-9", "value": -1}
    ])
    .to_string();
    let (status, resp) = post_now(&e.app, "generic", "generic-secret", &body).await;
    assert_eq!(status, StatusCode::MULTI_STATUS, "{resp}");
    let results = resp["results"].as_array().unwrap();
    assert_eq!(
        results
            .iter()
            .map(|r| r["status"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["accepted", "accepted", "invalid"]
    );
    let bad: Vec<&str> = results[2]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["field"].as_str().unwrap())
        .collect();
    assert_eq!(bad, ["occurred_at", "order_id", "value", "currency"]);

    let granted = results[0]["event_id"].as_str().unwrap();
    let denied = results[1]["event_id"].as_str().unwrap();
    let g = e.store.get(granted).await.unwrap().unwrap();
    assert_eq!(
        g.destinations[&Destination::Meta].status,
        DeliveryStatus::Pending
    );
    assert_eq!(
        g.identity.meta.em,
        Some(sha256_hex("l-granted@example.com"))
    );
    let d = e.store.get(denied).await.unwrap().unwrap();
    assert_eq!(
        d.destinations[&Destination::Meta].status,
        DeliveryStatus::BlockedConsent
    );
    assert!(
        d.identity.is_empty(),
        "a blocked event keeps no identifiers"
    );

    let meta = drain(&e.sqs, &e.stack.var("META_QUEUE_URL")).await;
    assert_eq!(meta, [DeliveryMessage::new(granted, Destination::Meta)]);
    assert!(
        drain(&e.sqs, &e.stack.var("GOOGLE_QUEUE_URL"))
            .await
            .is_empty(),
        "lead is not mapped to Google"
    );
}

#[tokio::test]
#[ignore = "needs the local AWS emulator: bash infra/local/test.sh starts it and runs this"]
async fn ten_deliveries_of_one_webhook_store_one_event_and_enqueue_once_per_destination() {
    let e = env("duplicates", None).await;
    let body = json!({"event_name": "won", "occurred_at": Timestamp::now().minus_secs(600).canonical(),
        "entity_type": "opportunity", "entity_id": "D-1", "order_id": "O-1", "value": 250.0, "currency": "USD",
        "identity": {"email": "buyer@example.com", "gclid": "Cj0abc"}, "consent": {"status": "granted"}})
    .to_string();
    let mut ids = Vec::new();
    for n in 0..10 {
        let (status, resp) = post_now(&e.app, "hubspot", "hs-bridge-secret", &body).await;
        assert_eq!(
            status,
            if n == 0 {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            },
            "{resp}"
        );
        assert_eq!(resp["duplicate"].as_bool().unwrap_or(false), n > 0);
        ids.push(resp["event_id"].as_str().unwrap().to_string());
    }
    assert!(
        ids.windows(2).all(|w| w[0] == w[1]),
        "one deterministic event_id"
    );
    assert_eq!(drain(&e.sqs, &e.stack.var("META_QUEUE_URL")).await.len(), 1);
    assert_eq!(
        drain(&e.sqs, &e.stack.var("GOOGLE_QUEUE_URL")).await.len(),
        1
    );
}

#[tokio::test]
#[ignore = "needs the local AWS emulator: bash infra/local/test.sh starts it and runs this"]
async fn signatures_wrong_stale_or_missing_are_refused_and_nothing_is_stored() {
    let e = env("signatures", None).await;
    let body = lead("L-sig", "granted").to_string();
    let now = Timestamp::now().unix_secs();
    let (wrong, _) = call(&e.app, signed("generic", &body, "not-the-secret", now)).await;
    let (stale, resp) = call(
        &e.app,
        signed("generic", &body, "generic-secret", now - 301),
    )
    .await;
    assert_eq!(
        resp["error"]["reason"], "not authenticated",
        "the reason (stale) goes to the log, not to an unauthenticated caller"
    );
    let mut missing = signed("generic", &body, "generic-secret", now);
    missing.headers_mut().remove("x-bridge-signature");
    let (missing, _) = call(&e.app, missing).await;
    assert_eq!(
        (wrong, stale, missing),
        (
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED
        )
    );
    assert!(
        drain(&e.sqs, &e.stack.var("META_QUEUE_URL"))
            .await
            .is_empty()
    );

    let big = "x".repeat(70 * 1024);
    let (too_big, _) = call(&e.app, signed("generic", &big, "generic-secret", now)).await;
    assert_eq!(too_big, StatusCode::PAYLOAD_TOO_LARGE);
    let (unknown, resp) = call(&e.app, signed("pipedrive", &body, "generic-secret", now)).await;
    assert_eq!(unknown, StatusCode::NOT_FOUND);
    assert!(
        !resp.to_string().contains("pipedrive"),
        "the path's source is not echoed: {resp}"
    );
    let health = lambda_http::http::Request::builder()
        .method("GET")
        .uri("https://bridge.example.com/health")
        .body(Body::Empty)
        .unwrap();
    let (status, health) = call(&e.app, health).await;
    assert_eq!((status, health), (StatusCode::OK, json!({"status": "ok"})));
    let get = lambda_http::http::Request::builder()
        .method("GET")
        .uri("https://bridge.example.com/webhooks/generic")
        .body(Body::Empty)
        .unwrap();
    assert_eq!(call(&e.app, get).await.0, StatusCode::METHOD_NOT_ALLOWED);

    // A source the mapping names but whose secret is not configured: the operator's mistake,
    // so the sender should retry later (503), and the answer names neither the source nor
    // the parameter an attacker could probe for.
    let mut e = e;
    e.app.secrets.remove("salesforce");
    e.app.secrets.remove("hubspot-app-secret");
    let (status, resp) = call(&e.app, signed("salesforce", &body, "sf-secret", now)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp["error"]["reason"], "unavailable; retry later");
    let mut v3 = signed("hubspot", "[]", "hs-app-secret", now);
    v3.headers_mut()
        .insert("x-hubspot-signature-v3", "c2ln".parse().unwrap());
    let (status, v3) = call(&e.app, v3).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    for answer in [resp.to_string(), v3.to_string()] {
        for named in ["salesforce", "hubspot", "secret"] {
            assert!(!answer.contains(named), "{named} in {answer}");
        }
    }
    assert!(
        drain(&e.sqs, &e.stack.var("META_QUEUE_URL"))
            .await
            .is_empty()
    );
}

#[tokio::test]
#[ignore = "needs the local AWS emulator: bash infra/local/test.sh starts it and runs this"]
async fn salesforce_revenue_is_stored_but_never_sent_when_hubspot_is_the_system_of_record() {
    let e = env("salesforce_sor", None).await;
    let body = json!({"object": "Opportunity", "id": "006XYZ", "stage": "Closed Won",
        "changed_at": Timestamp::now().minus_secs(60).canonical(), "amount": 5000, "currency": "USD",
        "email": "cfo@example.com", "consent": {"status": "granted"}})
    .to_string();
    let (status, resp) = post_now(&e.app, "salesforce", "sf-secret", &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{resp}");
    assert_eq!(
        resp["destinations"]["meta"],
        "rejected_not_system_of_record"
    );
    let stored = e
        .store
        .get(resp["event_id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.order_id.as_deref(), Some("006XYZ"));
    assert_eq!(stored.crm_stage.as_deref(), Some("Closed Won"));
    assert!(
        drain(&e.sqs, &e.stack.var("META_QUEUE_URL"))
            .await
            .is_empty()
    );
    assert!(
        drain(&e.sqs, &e.stack.var("GOOGLE_QUEUE_URL"))
            .await
            .is_empty()
    );

    let unmapped = json!({"object": "Lead", "id": "00Q1", "stage": "Nurturing", "changed_at": Timestamp::now().canonical()}).to_string();
    let (status, resp) = call(
        &e.app,
        signed(
            "salesforce",
            &unmapped,
            "sf-secret",
            Timestamp::now().unix_secs(),
        ),
    )
    .await;
    assert_eq!(
        (status, resp["status"].as_str()),
        (StatusCode::OK, Some("unmapped"))
    );
}

#[tokio::test]
#[ignore = "needs the local AWS emulator: bash infra/local/test.sh starts it and runs this"]
async fn hubspot_deal_won_is_fetched_from_the_crm_mapped_stored_and_enqueued() {
    let hs = FakeHubSpot::start("pat-test-token").await;
    let occurred = Timestamp::now().minus_secs(120).unix_ms();
    hs.seed_samples(occurred);
    let e = env("hubspot_fetch", Some(&hs)).await;
    let body = json!([
        {"eventId": 1, "subscriptionId": 7, "portalId": 62515, "appId": 1, "occurredAt": occurred,
         "subscriptionType": "deal.propertyChange", "attemptNumber": 0, "objectId": 9001,
         "propertyName": "dealstage", "propertyValue": "closedwon", "changeSource": "CRM"},
        {"eventId": 2, "subscriptionId": 8, "portalId": 62515, "appId": 1, "occurredAt": occurred,
         "subscriptionType": "contact.propertyChange", "attemptNumber": 0, "objectId": 101,
         "propertyName": "lifecyclestage", "propertyValue": "customer", "changeSource": "CRM"}
    ])
    .to_string();
    let (status, resp) = call(&e.app, hubspot_signed(&body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{resp}");
    let results = resp["results"].as_array().unwrap();
    assert_eq!(results[0]["status"], "accepted");
    assert_eq!(
        results[1]["status"], "unmapped",
        "`customer` is not in the mapping"
    );
    let stored = e
        .store
        .get(results[0]["event_id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.order_id.as_deref(), Some("9001"));
    assert_eq!(
        stored.value.map(|v| v.to_string()).as_deref(),
        Some("1200.5")
    );
    assert_eq!(stored.currency.as_deref(), Some("GBP"));
    assert_eq!(stored.identity.meta.em, Some(sha256_hex("ada@example.com")));
    assert_eq!(
        stored.identity.google.phone,
        Some(sha256_hex("+442079460958"))
    );
    assert_eq!(
        stored.consent.basis.as_deref(),
        Some("Freely given consent")
    );
    let contact_request = format!(
        "contact 101 properties={} history=lifecyclestage,hs_facebook_click_id",
        bridge_core::webhook::hubspot::CONTACT_PROPERTIES.join(",")
    );
    assert_eq!(
        hs.requests(),
        [
            "deal 9001 associations=contacts history=dealstage".to_string(),
            contact_request
        ]
    );
    let meta = drain(&e.sqs, &e.stack.var("META_QUEUE_URL")).await;
    let google = drain(&e.sqs, &e.stack.var("GOOGLE_QUEUE_URL")).await;
    assert_eq!((meta.len(), google.len()), (1, 1));

    // HubSpot redelivers it: answered as a duplicate without reading the CRM again.
    let sign = hubspot_signed;
    let reads = hs.requests().len();
    let (status, resp) = call(&e.app, sign(&body)).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["results"][0]["status"], "duplicate");
    assert_eq!(hs.requests().len(), reads, "no fetch for a stored change");

    // Another HubSpot account's change, and one the deal's history does not show: dropped.
    let foreign = json!([{"eventId": 3, "portalId": 1, "occurredAt": occurred + 5,
        "subscriptionType": "deal.propertyChange", "objectId": 9001,
        "propertyName": "dealstage", "propertyValue": "closedwon"},
        {"eventId": 4, "portalId": 62515, "occurredAt": occurred - 3_600_000,
        "subscriptionType": "deal.propertyChange", "objectId": 9001,
        "propertyName": "dealstage", "propertyValue": "closedwon"}])
    .to_string();
    let (status, resp) = call(&e.app, sign(&foreign)).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["results"][0]["status"], "ignored");
    assert_eq!(resp["results"][0]["errors"][0]["field"], "portalId");
    assert_eq!(resp["results"][1]["status"], "ignored");
    assert_eq!(resp["results"][1]["errors"][0]["field"], "propertyValue");

    // The contact asks HubSpot to delete its data: its deal's event loses every identifier.
    let deletion = json!([{"eventId": 9, "portalId": 62515, "occurredAt": occurred + 10,
        "subscriptionType": "contact.privacyDeletion", "objectId": 101}])
    .to_string();
    let (status, resp) = call(&e.app, sign(&deletion)).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["results"][0]["status"], "erased");
    assert_eq!(resp["results"][0]["erased"], 1);
    let erased = e
        .store
        .get(results[0]["event_id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(erased.identity.is_empty(), "{:?}", erased.identity);

    // HubSpot throttles the reads: 429 with its Retry-After, so HubSpot retries later.
    hs.change("deal", "9001", "dealstage", "closedwon", occurred + 60_000);
    hs.throttle(1, Some(7));
    let later = json!([{"eventId": 5, "portalId": 62515, "occurredAt": occurred + 60_000,
        "subscriptionType": "deal.propertyChange", "objectId": 9001,
        "propertyName": "dealstage", "propertyValue": "closedwon"}])
    .to_string();
    let req = sign(&later);
    let resp = e.app.handle(req).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "7");

    // A tampered delivery is refused before anything is fetched.
    let before = hs.requests().len();
    // Signed for an empty delivery, carrying another body.
    let mut bad = hubspot_signed("[]");
    *bad.body_mut() = Body::from(body);
    assert_eq!(call(&e.app, bad).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(hs.requests().len(), before);
}
