//! Reconciliation against the CRM: HubSpot's deal search (the strict fake, over HTTP, paged and
//! throttled) finds the won deals whose webhooks never arrived; the repair ingests them as their
//! webhooks would have been, and the strict fake Meta and Google count every order once with
//! the CRM's exact revenue; a second repair sends nothing; a reopened and a deleted (archived)
//! deal are reported, a lowered amount restated and a raised one reported; the lead funnel's
//! missed lifecycle stage changes (contacts' histories) are found and repaired the same way.
//! The same for Salesforce's SOQL query API (its strict fake, paged, its session expiring
//! mid-run), where a missed opportunity or lead status change is replayed as its Flow would
//! have posted it.

use bridge_core::crm_check::{
    CrmCheck, CrmFigures, Funnel, Period, check_hubspot, check_salesforce, repair, restate,
};
use bridge_core::delivery::Destination;
use bridge_core::delivery::pipeline::PipelineConfig;
use bridge_core::identity::parse_region;
use bridge_core::ingest::{IngestConfig, IngestReport, Intake, ItemStatus, ingest};
use bridge_core::mapping::Mapping;
use bridge_core::queue::memory::MemoryQueue;
use bridge_core::store::EventStore;
use bridge_core::store::memory::MemoryStore;
use bridge_core::timestamp::{Timestamp, Window};
use bridge_core::webhook::hubspot::{HubSpotEvent, HubSpotRecords, ResolveOptions, resolve};
use bridge_platforms::google::{GoogleConfig, GoogleCredentials, GooglePlatform};
use bridge_platforms::hubspot::HubSpotClient;
use bridge_platforms::meta::{MetaAccess, MetaConfig, MetaPlatform};
use bridge_platforms::salesforce::{SalesforceClient, SalesforceCredentials};
use bridge_tests::fakes::google::FakeGoogle;
use bridge_tests::fakes::hubspot::FakeHubSpot;
use bridge_tests::fakes::meta::FakeMeta;
use bridge_tests::fakes::salesforce::FakeSalesforce;
use bridge_tests::{invoke_sender, receive_records};
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

const PORTAL: i64 = 62515;
const DEALS: usize = 250;
/// Contacts of the lead funnel: each a lead, every second an MQL, every fifth an SQL.
const CONTACTS: usize = 80;
const HOUR_MS: i64 = 3_600_000;

fn cfg() -> IngestConfig {
    IngestConfig {
        default_region: parse_region("US").unwrap(),
        max_future_skew_secs: 300,
    }
}

fn opts() -> ResolveOptions {
    ResolveOptions {
        portal_id: Some(PORTAL),
        ..Default::default()
    }
}

fn pipeline() -> PipelineConfig {
    bridge_tests::pipeline(5, Duration::from_millis(10), Duration::from_millis(20))
}

fn deal_id(i: usize) -> String {
    (30_000 + i).to_string()
}

/// Deal i: won `i` hours before `now` (so within Meta's 7 days) for 100 + i EUR.
fn won_at(now: i64, i: usize) -> i64 {
    now - (i as i64 + 7) * HOUR_MS / 2
}

fn webhook(id: &str, at_ms: i64, stage: &str) -> HubSpotEvent {
    HubSpotEvent {
        event_id: Some(1),
        portal_id: Some(PORTAL),
        subscription_type: "deal.propertyChange".into(),
        object_id: id.parse().unwrap(),
        occurred_at: at_ms,
        property_name: Some("dealstage".into()),
        property_value: Some(stage.into()),
    }
}

/// The lifecycle stage changes of the funnel's contacts: (contact id, stage, when).
fn funnel_changes(now: i64) -> Vec<(String, &'static str, i64)> {
    let mut out = Vec::new();
    for j in 0..CONTACTS {
        let id = (50_000 + j).to_string();
        let at = now - (j as i64 + 5) * HOUR_MS;
        out.push((id.clone(), "lead", at));
        if j % 2 == 0 {
            out.push((id.clone(), "marketingqualifiedlead", at + HOUR_MS));
        }
        if j % 5 == 0 {
            out.push((id, "salesqualifiedlead", at + 2 * HOUR_MS));
        }
    }
    out
}

async fn drain(
    meta: &MetaPlatform,
    google: &GooglePlatform,
    store: &MemoryStore,
    queue: &MemoryQueue,
) {
    for _ in 0..20 {
        let mut any = false;
        for d in [Destination::Meta, Destination::Google] {
            let records = receive_records(queue, d, 1000);
            if records.is_empty() {
                continue;
            }
            any = true;
            let now = Timestamp::now();
            match d {
                Destination::Meta => {
                    invoke_sender(records, meta, store, queue, &pipeline(), now, None).await
                }
                _ => invoke_sender(records, google, store, queue, &pipeline(), now, None).await,
            }
        }
        if !any {
            return;
        }
    }
    panic!("the queues did not drain");
}

/// Repairs what `check` found, now, as `bridge-backfill crm-check --repair` does (HubSpot's
/// deals are read again through `hubspot`).
async fn repair_now(
    check: &CrmCheck,
    hubspot: Option<&HubSpotClient>,
    mapping: &Mapping,
    store: &MemoryStore,
    queue: &MemoryQueue,
) -> IngestReport {
    let opts = opts();
    let hubspot = hubspot.map(|c| (c as &dyn HubSpotRecords, &opts));
    let cfg = cfg();
    let to = Intake::new(mapping, &cfg, store, queue);
    repair(check, hubspot, to, Timestamp::now()).await
}

/// The strict fakes of Meta and Google, and the senders' platforms pointed at them.
async fn platforms(mapping: &Mapping) -> (FakeMeta, FakeGoogle, MetaPlatform, GooglePlatform) {
    let http = bridge_platforms::http::client().unwrap();
    let meta_fake = FakeMeta::start("meta-token").await;
    let google_fake = FakeGoogle::start().await;
    let meta = MetaPlatform::new(
        http.clone(),
        MetaConfig {
            base_url: meta_fake.base_url.clone(),
            api_version: "v26.0".into(),
            pixel_id: "1234567890".into(),
            test_event_code: None,
            timeout: Duration::from_secs(10),
        },
        mapping.clone(),
        MetaAccess::new("meta-token".into(), None),
    );
    let google = GooglePlatform::new(
        http,
        GoogleConfig {
            ads_base_url: google_fake.base_url.clone(),
            ads_api_version: "v26".into(),
            datamanager_base_url: google_fake.base_url.clone(),
            token_url: google_fake.token_url(),
            credentials: GoogleCredentials::from_json(&google_fake.credentials_json())
                .unwrap()
                .into(),
            validate_only: false,
            timeout: Duration::from_secs(10),
            terms_ttl: Duration::from_secs(3600),
        },
        mapping.clone(),
    );
    (meta_fake, google_fake, meta, google)
}

/// The deals a check found changed since they were won, sorted: (deal id, reason).
fn changed(check: &CrmCheck) -> Vec<(String, &'static str)> {
    let mut changed: Vec<(String, &str)> = check
        .changed
        .iter()
        .map(|c| (c.deal_id.clone(), c.reason))
        .collect();
    changed.sort();
    changed
}

/// The stage changes a funnel check found missed: (record id, stage).
fn missed_stages(funnel: &Funnel) -> HashSet<(String, String)> {
    funnel
        .missed
        .iter()
        .map(|m| (m.record_id.clone(), m.stage.clone()))
        .collect()
}

/// One currency's figures, with the deals the CRM counts won and those no webhook brought
/// checked.
fn figures<'a>(check: &'a CrmCheck, currency: &str, won: usize, missed: usize) -> &'a CrmFigures {
    let f = &check.per_currency[currency];
    assert_eq!((f.crm_deals, f.missed), (won as u64, missed as u64));
    f
}

#[tokio::test]
async fn webhooks_dropped_for_a_tenth_of_the_deals_are_found_and_repaired_once() {
    let mapping = Mapping::bundled().unwrap();
    let hubspot = FakeHubSpot::start("hs-token").await;
    let now = Timestamp::now().unix_ms();
    {
        let mut d = hubspot.data.lock().unwrap();
        d.contacts.insert(
            "101".into(),
            json!({"email": "ada@example.com", "hs_google_click_id": "Cj0KCQ-ada",
                   "ads_consent_status": "granted", "hs_legal_basis": "Freely given consent"}),
        );
    }
    for i in 0..DEALS {
        let id = deal_id(i);
        let at = won_at(now, i);
        hubspot.change("deal", &id, "amount", &(100 + i).to_string(), at);
        hubspot.change("deal", &id, "deal_currency_code", "EUR", at);
        hubspot.change(
            "deal",
            &id,
            "closedate",
            &Timestamp::from_unix_ms(at).canonical(),
            at,
        );
        hubspot.change("deal", &id, "dealstage", "closedwon", at);
        hubspot.data.lock().unwrap().deals.get_mut(&id).unwrap().1 = Some("101".into());
    }
    let stage_changes = funnel_changes(now);
    for (id, stage, at) in &stage_changes {
        for (k, v) in [
            ("email", format!("lead{id}@example.com")),
            ("ads_consent_status", "granted".to_string()),
        ] {
            hubspot.change("contact", id, k, &v, at - HOUR_MS);
        }
        hubspot.change("contact", id, "lifecyclestage", stage, *at);
    }
    let http = bridge_platforms::http::client().unwrap();
    let client = HubSpotClient::new(http.clone(), hubspot.base_url.clone(), "hs-token");
    let store = MemoryStore::new();
    let queue = MemoryQueue::new(5, Duration::from_secs(30));

    // Every tenth deal's webhook never arrives, nor every seventh lifecycle stage change's.
    let dropped: HashSet<String> = (0..DEALS).step_by(10).map(deal_id).collect();
    let mut delivered: Vec<HubSpotEvent> = (0..DEALS)
        .map(deal_id)
        .filter(|id| !dropped.contains(id))
        .map(|id| {
            let i = id.parse::<usize>().unwrap() - 30_000;
            webhook(&id, won_at(now, i), "closedwon")
        })
        .collect();
    let mut dropped_stages: HashSet<(String, String)> = HashSet::new();
    for (n, (id, stage, at)) in stage_changes.iter().enumerate() {
        if n % 7 == 3 {
            dropped_stages.insert((id.clone(), stage.to_string()));
            continue;
        }
        let mut hook = webhook(id, *at, stage);
        hook.subscription_type = "contact.propertyChange".into();
        hook.property_name = Some("lifecyclestage".into());
        delivered.push(hook);
    }
    let items = resolve(&delivered, &client, &mapping, &opts(), &HashSet::new()).await;
    let cfg = cfg();
    let to = Intake::new(&mapping, &cfg, &store, &queue);
    let r = ingest(items, "hubspot", to, Timestamp::now()).await;
    assert!(
        r.results.iter().all(|x| x.status == ItemStatus::Accepted),
        "{:?}",
        r.results.iter().find(|x| x.status != ItemStatus::Accepted)
    );
    // After their webhooks: deal 1 reopened, deal 2's amount corrected.
    hubspot.change(
        "deal",
        &deal_id(1),
        "dealstage",
        "appointmentscheduled",
        now,
    );
    hubspot.change("deal", &deal_id(2), "amount", "150", now);
    // Deal 3's amount lowered after it was counted (103 -> 60): restated by a refund of 43.
    hubspot.change("deal", &deal_id(3), "amount", "60", now);
    // Deal 4 deleted (archived): the search no longer lists it, the archived batch read does.
    hubspot.data.lock().unwrap().archived.insert(deal_id(4));

    let (meta_fake, google_fake, meta, google) = platforms(&mapping).await;
    drain(&meta, &google, &store, &queue).await;
    assert_eq!(meta_fake.purchases_deduped().len(), DEALS - dropped.len());

    // The search pages (200 a page) and is throttled once (retried after 1 s).
    hubspot.throttle(1, Some(1));
    let from = Timestamp::from_unix_ms(now - 30 * 24 * HOUR_MS);
    let to = Timestamp::from_unix_ms(now + 1);
    let check_now = || async {
        check_hubspot(
            &client,
            &client,
            &store,
            &mapping,
            Period {
                portal_id: Some(PORTAL),
                window: Window::new(from, to),
            },
            Timestamp::now(),
        )
        .await
        .unwrap()
    };
    let check = check_now().await;
    let searches = hubspot
        .requests()
        .iter()
        .filter(|r| r.starts_with("search deals"))
        .count();
    assert_eq!(searches, 2, "two pages of 200 for 249 deals");
    let missed: HashSet<String> = check.missed.iter().map(|m| m.deal_id.clone()).collect();
    assert_eq!(missed, dropped, "every dropped webhook found, nothing else");
    assert!(check.missed.iter().all(|m| m.notes.is_empty()));
    assert_eq!(
        changed(&check),
        [
            (deal_id(1), "reopened_in_crm"),
            (deal_id(2), "amount_changed_after_won"),
            (deal_id(3), "amount_changed_after_won"),
            (deal_id(4), "deleted_in_crm")
        ]
    );
    assert!(
        hubspot
            .requests()
            .iter()
            .any(|r| r == "batch read deals archived=true")
    );
    let eur = figures(&check, "EUR", DEALS - 2, dropped.len());
    println!(
        "crm check: {} deals won in HubSpot, {} stored, {} missed by webhook ({:.2} EUR), {} changed",
        eur.crm_deals,
        eur.stored_wons,
        eur.missed,
        eur.missed_revenue,
        check.changed.len()
    );

    // The funnel: every dropped stage change found in the contacts' histories, nothing else.
    let funnel = check.funnel.as_ref().expect("HubSpot's funnel is read");
    let found = missed_stages(funnel);
    assert_eq!(found, dropped_stages);
    let changes: u64 = funnel.per_stage.values().map(|f| f.crm_changes).sum();
    let stored: u64 = funnel.per_stage.values().map(|f| f.stored).sum();
    assert_eq!(changes as usize, stage_changes.len());
    assert_eq!((changes - stored) as usize, dropped_stages.len());
    println!(
        "crm check, lead funnel: {changes} lifecycle stage changes in HubSpot's histories, {stored} stored, {} missed by webhook ({:?})",
        funnel.missed.len(),
        funnel.per_stage
    );

    let r = repair_now(&check, Some(&client), &mapping, &store, &queue).await;
    assert_eq!(r.results.len(), dropped.len() + dropped_stages.len());
    assert!(r.results.iter().all(|x| x.status == ItemStatus::Accepted));
    let restated = restate(&check, &store, &queue, Timestamp::now())
        .await
        .unwrap();
    assert_eq!(restated.stored, 1);
    assert_eq!(restated.not_restated.len(), 1, "deal 2's amount rose");
    drain(&meta, &google, &store, &queue).await;

    // Every order counted once at each platform, with the CRM's won amounts; deal 3 restated
    // to the CRM's 60 at Google (a RESTATEMENT adjustment) and refunded by 43 at Meta.
    let expected: f64 = (0..DEALS).map(|i| (100 + i) as f64).sum();
    assert_eq!(meta_fake.purchases_deduped().len(), DEALS);
    assert_eq!(meta_fake.revenue_deduped()["EUR"], expected);
    let meta_refunds: Vec<f64> = meta_fake
        .deduped()
        .iter()
        .filter(|(_, e)| {
            e["event_name"] != "Purchase" && e["custom_data"]["order_id"] == deal_id(3)
        })
        .filter_map(|(_, e)| e["custom_data"]["value"].as_f64())
        .collect();
    assert_eq!(meta_refunds, [43.0]);
    // Each stage change counted once at Meta, under the event id its webhook would have had;
    // Google counts each SQL once (enhanced conversions for leads).
    let meta_keys = meta_fake.distinct();
    let funnel_events = |name: &str| meta_keys.keys().filter(|(n, _)| n == name).count();
    let of_stage = |stage: &str| stage_changes.iter().filter(|c| c.1 == stage).count();
    assert_eq!(funnel_events("Lead"), of_stage("lead"));
    assert_eq!(
        funnel_events("MarketingQualifiedLead"),
        of_stage("marketingqualifiedlead")
    );
    assert_eq!(
        funnel_events("SalesQualifiedLead"),
        of_stage("salesqualifiedlead")
    );
    let sqls = of_stage("salesqualifiedlead");
    assert_eq!(google_fake.count(), DEALS + sqls);
    assert_eq!(google_fake.revenue()["EUR"], expected - 43.0);

    // A second run finds nothing missed and sends nothing.
    let again = check_now().await;
    assert!(again.missed.is_empty());
    assert!(again.funnel.as_ref().unwrap().missed.is_empty());
    assert!(
        !again.changed.iter().any(|c| c.deal_id == deal_id(3)),
        "restated: no longer a change"
    );
    let r = restate(&again, &store, &queue, Timestamp::now())
        .await
        .unwrap();
    assert_eq!((r.stored, r.existing), (0, 0));
    let r = repair_now(&again, Some(&client), &mapping, &store, &queue).await;
    assert!(r.results.is_empty());
    drain(&meta, &google, &store, &queue).await;
    assert_eq!(meta_fake.purchases_deduped().len(), DEALS);
    assert_eq!(google_fake.count(), DEALS + sqls);
    assert_eq!(meta_fake.distinct().len(), meta_keys.len());
}

/// The bundled contract with Salesforce as the system of record (and its consent granted
/// when `granted`, as an org that records consent in its Flow would send it).
fn salesforce_mapping(granted: bool) -> Mapping {
    let mut text = bridge_core::mapping::BUNDLED.replace(
        "system_of_record = \"hubspot\"",
        "system_of_record = \"salesforce\"",
    );
    if granted {
        text = text.replace(
            "[sources.salesforce]\nconsent_default = \"unknown\"",
            "[sources.salesforce]\nconsent_default = \"granted\"",
        );
    }
    Mapping::load(&text).unwrap()
}

/// The Salesforce side: a Flow's callouts (Apex callouts are never retried) dropped for a tenth
/// of the won opportunities. SOQL against the strict fake finds them (paged, with the session
/// expiring mid-run), the repair ingests each as its Flow would have posted it, with the
/// primary contact's identity, and Meta counts every order once with the CRM's revenue; a
/// reopened and a deleted opportunity are reported; a second run sends nothing.
#[tokio::test]
async fn salesforce_callouts_that_never_arrived_are_found_by_soql_and_repaired_once() {
    const OPPS: usize = 120;
    let mapping = salesforce_mapping(true);
    let sf = FakeSalesforce::start().await;
    sf.with(|d| d.page_size = 50);
    let now = Timestamp::now().unix_ms();
    let opp = |i: usize| format!("006FAKE{i:011}");
    for i in 0..OPPS {
        let at = won_at(now, i);
        sf.stage_change(&opp(i), "Prospecting", 0.0, "USD", at - 86_400_000);
        sf.stage_change(&opp(i), "Closed Won", (200 + i) as f64, "USD", at);
        sf.primary_contact(&opp(i), &format!("buyer{i}@example.com"), "Ada");
    }
    // The lead funnel: 40 leads created in the period, every second one worked (MQL), every
    // fourth qualified (SQL); the callouts of every sixth status change never arrive.
    let lead_id = |j: usize| format!("00QFAKE{j:011}");
    let mut lead_changes: Vec<(String, &str, i64)> = Vec::new();
    for j in 0..40 {
        let at = now - (j as i64 + 5) * HOUR_MS;
        sf.lead(
            &lead_id(j),
            "Open - Not Contacted",
            &format!("lead{j}@example.com"),
            at,
        );
        lead_changes.push((lead_id(j), "Open - Not Contacted", at));
        if j % 2 == 0 {
            sf.lead_status(&lead_id(j), "Working - Contacted", at + HOUR_MS);
            lead_changes.push((lead_id(j), "Working - Contacted", at + HOUR_MS));
        }
        if j % 4 == 0 {
            sf.lead_status(&lead_id(j), "Qualified", at + 2 * HOUR_MS);
            lead_changes.push((lead_id(j), "Qualified", at + 2 * HOUR_MS));
        }
    }
    let store = MemoryStore::new();
    let queue = MemoryQueue::new(5, Duration::from_secs(30));
    let dropped: HashSet<String> = (0..OPPS).step_by(10).map(opp).collect();
    let mut items: Vec<_> = (0..OPPS)
        .filter(|i| !dropped.contains(&opp(*i)))
        .map(|i| {
            let raw = json!({"object": "Opportunity", "id": opp(i), "stage": "Closed Won",
                "changed_at": Timestamp::from_unix_ms(won_at(now, i)).canonical(),
                "amount": 200 + i, "currency": "USD", "email": format!("buyer{i}@example.com")})
            .to_string();
            bridge_core::webhook::salesforce::parse_item(&raw, "salesforce", &mapping)
        })
        .collect();
    let mut dropped_leads: HashSet<(String, String)> = HashSet::new();
    for (n, (id, status, at)) in lead_changes.iter().enumerate() {
        if n % 6 == 5 {
            dropped_leads.insert((id.clone(), status.to_string()));
            continue;
        }
        let raw = json!({"object": "Lead", "id": id, "stage": status,
            "changed_at": Timestamp::from_unix_ms(*at).canonical(),
            "email": format!("lead{}@example.com", id[7..].parse::<usize>().unwrap())})
        .to_string();
        items.push(bridge_core::webhook::salesforce::parse_item(
            &raw,
            "salesforce",
            &mapping,
        ));
    }
    let cfg = cfg();
    let to = Intake::new(&mapping, &cfg, &store, &queue);
    let r = ingest(items, "salesforce", to, Timestamp::now()).await;
    assert!(r.results.iter().all(|x| x.status == ItemStatus::Accepted));
    // After their callouts: one reopened, one deleted (in the recycle bin).
    sf.stage_change(&opp(1), "Negotiation/Review", 201.0, "USD", now);
    sf.delete(&opp(2));

    let (meta_fake, _google_fake, meta, google) = platforms(&mapping).await;
    drain(&meta, &google, &store, &queue).await;
    assert_eq!(meta_fake.purchases_deduped().len(), OPPS - dropped.len());

    let client = SalesforceClient::new(
        bridge_platforms::http::client().unwrap(),
        SalesforceCredentials::from_json(&sf.credentials_json()).unwrap(),
        "v65.0",
    );
    let window = Window::new(
        Timestamp::from_unix_ms(now - 30 * 24 * HOUR_MS),
        Timestamp::from_unix_ms(now + 1),
    );
    // A session that expires between runs is renewed once, transparently.
    let first = check_salesforce(&client, &store, &mapping, window, Timestamp::now())
        .await
        .unwrap();
    sf.expire_sessions();
    let check = check_salesforce(&client, &store, &mapping, window, Timestamp::now())
        .await
        .unwrap();
    assert_eq!(first, check);
    let requests = sf.requests();
    assert_eq!(
        requests.iter().filter(|r| *r == "token").count(),
        2,
        "one token, renewed once after it expired"
    );
    assert!(
        requests.iter().filter(|r| *r == "next").count() >= 4,
        "118 won opportunities in pages of 50, twice: {requests:?}"
    );
    assert!(requests.iter().any(|r| r.starts_with("queryAll ")));
    let missed: HashSet<String> = check.missed.iter().map(|m| m.deal_id.clone()).collect();
    assert_eq!(missed, dropped, "every dropped callout found, nothing else");
    assert!(
        check.missed.iter().all(|m| m.notes.is_empty()),
        "{:?}",
        check.missed
    );
    assert_eq!(
        changed(&check),
        [(opp(1), "reopened_in_crm"), (opp(2), "deleted_in_crm")]
    );
    let usd = figures(&check, "USD", OPPS - 2, dropped.len());
    println!(
        "salesforce check: {} won opportunities, {} stored, {} missed by callout ({:.2} USD), {} changed, {} API requests",
        usd.crm_deals,
        usd.stored_wons,
        usd.missed,
        usd.missed_revenue,
        check.changed.len(),
        requests.len()
    );

    // The funnel: the leads created in the period and LeadHistory's Status rows show every
    // dropped callout, nothing else.
    let funnel = check.funnel.as_ref().expect("Salesforce's funnel is read");
    let found = missed_stages(funnel);
    assert_eq!(found, dropped_leads);
    let changes: u64 = funnel.per_stage.values().map(|f| f.crm_changes).sum();
    assert_eq!(changes as usize, lead_changes.len());
    println!(
        "salesforce check, lead funnel: {changes} status changes (leads created and LeadHistory), {} missed by callout",
        funnel.missed.len()
    );

    let r = repair_now(&check, None, &mapping, &store, &queue).await;
    assert_eq!(r.results.len(), dropped.len() + dropped_leads.len());
    assert!(
        r.results.iter().all(|x| x.status == ItemStatus::Accepted),
        "{r:?}"
    );
    for id in &dropped {
        let i: usize = id[7..].parse().unwrap();
        let e = &store.find_by_order(id).await.unwrap()[0];
        assert_eq!(e.occurred_at, Timestamp::from_unix_ms(won_at(now, i)));
        assert!(
            e.identity.meta.em.is_some(),
            "the primary contact's email, hashed"
        );
    }
    drain(&meta, &google, &store, &queue).await;
    let expected: f64 = (0..OPPS).map(|i| (200 + i) as f64).sum();
    assert_eq!(meta_fake.purchases_deduped().len(), OPPS);
    assert_eq!(meta_fake.revenue_deduped()["USD"], expected);
    // Each lead status change counted once at Meta.
    let keys = meta_fake.distinct();
    for (name, status) in [
        ("Lead", "Open - Not Contacted"),
        ("MarketingQualifiedLead", "Working - Contacted"),
        ("SalesQualifiedLead", "Qualified"),
    ] {
        assert_eq!(
            keys.keys().filter(|(n, _)| n == name).count(),
            lead_changes.iter().filter(|c| c.1 == status).count(),
            "{name}"
        );
    }

    let again = check_salesforce(&client, &store, &mapping, window, Timestamp::now())
        .await
        .unwrap();
    assert!(again.missed.is_empty());
    assert!(again.funnel.as_ref().unwrap().missed.is_empty());
    let r = repair_now(&again, None, &mapping, &store, &queue).await;
    assert!(r.results.is_empty());
    assert_eq!(meta_fake.purchases_deduped().len(), OPPS);
}

/// A single-currency org refuses `CurrencyIsoCode` (the check asks again without it, and its
/// amounts are in the org's one currency, "(none)"); an org past its daily API limit answers
/// 403 `REQUEST_LIMIT_EXCEEDED`, which the check reports instead of guessing; wrong client
/// credentials are named as the token endpoint's refusal, without the secret.
#[tokio::test]
async fn salesforce_single_currency_orgs_api_limits_and_bad_credentials() {
    let mapping = salesforce_mapping(false);
    let sf = FakeSalesforce::start().await;
    sf.with(|d| d.multi_currency = false);
    let now = Timestamp::now().unix_ms();
    sf.stage_change("006SINGLE", "Closed Won", 75.0, "EUR", now - HOUR_MS);
    let client = |json: &str| {
        SalesforceClient::new(
            bridge_platforms::http::client().unwrap(),
            SalesforceCredentials::from_json(json).unwrap(),
            "v65.0",
        )
    };
    let store = MemoryStore::new();
    let window = Window::new(
        Timestamp::from_unix_ms(now - 24 * HOUR_MS),
        Timestamp::from_unix_ms(now + 1),
    );
    let c = client(&sf.credentials_json());
    let check = check_salesforce(&c, &store, &mapping, window, Timestamp::now())
        .await
        .unwrap();
    assert_eq!(check.per_currency["(none)"].crm_revenue, 75.0);
    assert_eq!(check.missed[0].deal_id, "006SINGLE");

    sf.with(|d| d.api_limit = d.api_used);
    let e = check_salesforce(&c, &store, &mapping, window, Timestamp::now())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("REQUEST_LIMIT_EXCEEDED"), "{e}");

    let wrong = client(
        &json!({"token_url": sf.token_url(), "client_id": "sf-client", "client_secret": "not-it"})
            .to_string(),
    );
    let e = check_salesforce(&wrong, &store, &mapping, window, Timestamp::now())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid_client") && !e.contains("not-it"), "{e}");
}
