//! DynamoDB event store: one item per event, conditional writes for idempotency and claims.
//!
//! Item layout (single table, see shared/aws/README.md):
//! - `pk = EV#<key>`, `sk = EVENT`: one event under its store key (the event_id when derived,
//!   `<source>:<event_id>` when the caller provided it; `event_id` is an attribute only when it
//!   differs from the key). The event's fields as attributes, identity hashes as 32-byte
//!   binaries (half the size of hex: every KB is a write unit).
//! - `d_<destination>`: that destination's delivery state and log, a map, so a claim or a
//!   result is one conditional `UpdateItem` on a document path.
//! - `pk = EV#<key>`, `sk = IDENTITY`: the event's `identity` (hashes, click ids) and
//!   `source` and `occurred_at` (what the retention and erasure scans filter on), written
//!   once before the event item and changed only by retention and
//!   erasure. Kept apart because every claim and result rewrites the event item and is
//!   billed for its whole size: without the identity (about 600 bytes for a full profile)
//!   an event item stays within the 1 KB of one write unit. A small identity (an email and
//!   little else) that keeps the event item within 1 KB through its deliveries stays on the
//!   event item instead ([`inline_identity`]): one write at ingest, not two. Items written by
//!   release 1 and earlier hold `identity` on the event item too; readers take it from there.
//! - `ord`, `ord_sk`: set on revenue events only, keys of the sparse `by-order-keys` index,
//!   which projects keys only: a state write changes no key, so it writes nothing there.
//! - `<destination>_sw`, `<destination>_due`: set only while that destination is open, keys
//!   of the sparse `sweep-<destination>` index, so the sweep reads stuck pairs and nothing else.
//!   Set when a pair opens and by a result that leaves it open, removed when it closes; a
//!   claim leaves them (a moved index key is billed as a delete and a put).
//! - `ttl`: expiry in Unix seconds. Expired items may linger (DynamoDB deletes late), so reads
//!   check it too.
//! - `pk = ORD#<order_id>`, `sk = ORDER`: the order guard; `w_<destination>` holds the key of
//!   the won counted for the order there. Small, in no index.
//! - `pk = EID#<event_id>`, `sk = EVENT_ID`: the first source that used a caller-provided
//!   event_id (`src`), to report a cross-source collision. Small, in no index.

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeValue, KeysAndAttributes, ReturnValue, ReturnValuesOnConditionCheckFailure,
};
use bridge_core::delivery::{DeliveryStatus, Destination, DestinationState};
use bridge_core::event::{CanonicalEvent, EventIdOrigin};
use bridge_core::hashing::{hex, is_sha256_hex, unhex};
use bridge_core::store::{
    ClaimOutcome, EventStore, OrderHold, PutOutcome, Scrub, StoreError, StuckRef, Transition,
};
use bridge_core::timestamp::Timestamp;
use serde_json::{Map, Number, Value};
use std::collections::HashMap;

type Item = HashMap<String, AttributeValue>;

/// One page of a scan or query: its items, and where the next page starts (none after the last).
type Page = (Vec<Item>, Option<Item>);

/// A scan or a query, read one page at a time.
trait Paged: Clone {
    async fn page(self, start: Option<Item>) -> Result<Page, StoreError>;
}

macro_rules! paged {
    ($($builder:ty),+) => {$(
        impl Paged for $builder {
            async fn page(self, start: Option<Item>) -> Result<Page, StoreError> {
                let page = self
                    .set_exclusive_start_key(start)
                    .send()
                    .await
                    .map_err(unavailable)?;
                Ok((page.items.unwrap_or_default(), page.last_evaluated_key))
            }
        }
    )+};
}
paged!(
    aws_sdk_dynamodb::operation::scan::builders::ScanFluentBuilder,
    aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder
);

/// The adapter's one pagination loop, for scans and queries alike: reads `request` from the
/// first page on, hands each page's items to `each`, and stops after the last page or once
/// `each` answers that it has enough.
async fn paginate(
    request: impl Paged,
    mut each: impl FnMut(Vec<Item>) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let mut start = None;
    loop {
        let (items, next) = request.clone().page(start).await?;
        let enough = each(items)?;
        match next {
            Some(n) if !enough => start = Some(n),
            _ => return Ok(()),
        }
    }
}

/// Shards of each sweep index partition key: spreads the index's write load (a single key
/// caps at about 1,000 writes a second) at the price of 8 small queries per sweep.
pub const SWEEP_SHARDS: u32 = 8;
const EVENT_SK: &str = "EVENT";
const ORDER_SK: &str = "ORDER";
const EVENT_ID_SK: &str = "EVENT_ID";
const IDENTITY_SK: &str = "IDENTITY";
/// Revenue events by order id, keys only (see `find_by_order`).
pub const ORDER_INDEX: &str = "by-order-keys";

pub fn sweep_index(d: Destination) -> String {
    format!("sweep-{d}")
}

pub struct DynamoStore {
    client: Client,
    table: String,
    retention_secs: i64,
}

fn unavailable<E: std::error::Error + Send + Sync + 'static>(e: E) -> StoreError {
    StoreError::Unavailable(Box::new(e))
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn pk(key: &str) -> String {
    format!("EV#{key}")
}

fn item_key(pk: String, sk: &str) -> Item {
    HashMap::from([("pk".to_string(), s(pk)), ("sk".to_string(), s(sk))])
}

fn key(event_key: &str) -> Item {
    item_key(pk(event_key), EVENT_SK)
}

fn identity_key(event_key: &str) -> Item {
    item_key(pk(event_key), IDENTITY_SK)
}

/// The bytes of one write unit: DynamoDB bills a write for each started KB of the item, the
/// larger of before and after. source: DynamoDB Developer Guide, "Read/write capacity mode"
/// (write request units)
const WRITE_UNIT_BYTES: usize = 1024;

/// What one open destination adds to an event item before it closes: a claim and a result
/// with its log entry (about 230 bytes), and room for one retry's entry and error (459 bytes
/// in all, measured in `an_inlined_identity_keeps_the_item_in_one_write_unit_through_a_retry_and_a_delivery`).
/// A pair retried more than once may then cross 1 KB, and its later writes cost two units.
const DELIVERY_GROWTH: usize = 480;

/// An item's size as DynamoDB counts it: each attribute's name and value; a string or binary
/// by its bytes, a number by its significant digits (two a byte, plus one), a boolean or null
/// 1 byte, a map or list 3 bytes plus 1 per element (and a map element's name). source:
/// DynamoDB Developer Guide, "Item sizes and formats"
fn item_bytes(item: &Item) -> usize {
    item.iter().map(|(k, v)| k.len() + value_bytes(v)).sum()
}

fn value_bytes(v: &AttributeValue) -> usize {
    let number = |n: &str| {
        let mantissa = n.trim_start_matches(['+', '-']);
        let mantissa = mantissa.split(['e', 'E']).next().unwrap_or_default();
        let digits = mantissa.replace('.', "");
        digits.trim_matches('0').len().div_ceil(2) + 1
    };
    match v {
        AttributeValue::S(s) => s.len(),
        AttributeValue::N(n) => number(n),
        AttributeValue::B(b) => b.as_ref().len(),
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::Ss(v) => v.iter().map(String::len).sum(),
        AttributeValue::Ns(v) => v.iter().map(|n| number(n)).sum(),
        AttributeValue::Bs(v) => v.iter().map(|b| b.as_ref().len()).sum(),
        AttributeValue::L(l) => 3 + l.iter().map(|x| 1 + value_bytes(x)).sum::<usize>(),
        AttributeValue::M(m) => {
            3 + m
                .iter()
                .map(|(k, x)| 1 + k.len() + value_bytes(x))
                .sum::<usize>()
        }
        _ => 0,
    }
}

/// Whether the event item keeps `identity` (the identity item's attribute) itself: when the
/// item with it, grown by [`DELIVERY_GROWTH`] for each of its `open` destinations, still fits
/// one write unit. Then ingest is one write, and no claim or result costs more for it.
fn inline_identity(item: &Item, identity: &AttributeValue, open: usize) -> bool {
    let with = item_bytes(item) + "identity".len() + value_bytes(identity);
    with + DELIVERY_GROWTH * open <= WRITE_UNIT_BYTES
}

fn order_item(order_id: &str) -> Item {
    item_key(format!("ORD#{order_id}"), ORDER_SK)
}

fn holder_attr(d: Destination) -> String {
    format!("w_{d}")
}

/// A request DynamoDB refused because the item would exceed 400 KB: a property of the item,
/// not of the moment, so retrying cannot help.
fn too_large<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> Option<String> {
    let svc = e.as_service_error()?;
    let message = svc.message().unwrap_or_default();
    (svc.code() == Some("ValidationException") && message.to_ascii_lowercase().contains("size"))
        .then(|| message.to_string())
}

fn conditional_failed<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    e.as_service_error()
        .is_some_and(|s| s.code() == Some("ConditionalCheckFailedException"))
}

/// Whether a conditional write was applied: false when its condition failed.
fn applied<T, E, R>(r: Result<T, SdkError<E, R>>) -> Result<bool, StoreError>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match r {
        Ok(_) => Ok(true),
        Err(e) if conditional_failed(&e) => Ok(false),
        Err(e) => Err(unavailable(e)),
    }
}

fn shard(event_id: &str) -> String {
    (event_id
        .bytes()
        .fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(b as u32))
        % SWEEP_SHARDS)
        .to_string()
}

/// The sweep index sort key: when to look, then the status (so a keys-only index says both).
fn due_key(due: Timestamp, status: DeliveryStatus) -> String {
    format!("{}#{}", due.canonical(), status.as_str())
}

/// JSON to DynamoDB. `hashed` turns 64-hex strings into 32-byte binaries (identity hashes only).
fn to_av(v: &Value, hashed: bool) -> Option<AttributeValue> {
    Some(match v {
        Value::Null => return None,
        Value::Bool(b) => AttributeValue::Bool(*b),
        Value::Number(n) => AttributeValue::N(n.to_string()),
        Value::String(st) if hashed && is_sha256_hex(st) => {
            AttributeValue::B(Blob::new(unhex(st)?))
        }
        Value::String(st) => AttributeValue::S(st.clone()),
        Value::Array(a) => AttributeValue::L(a.iter().filter_map(|x| to_av(x, hashed)).collect()),
        Value::Object(m) => AttributeValue::M(
            m.iter()
                .filter_map(|(k, x)| Some((k.clone(), to_av(x, hashed)?)))
                .collect(),
        ),
    })
}

fn from_av(av: &AttributeValue) -> Result<Value, String> {
    Ok(match av {
        AttributeValue::S(x) => Value::String(x.clone()),
        AttributeValue::N(n) => match n.parse::<i64>() {
            Ok(i) => Value::Number(i.into()),
            Err(_) => n
                .parse::<f64>()
                .ok()
                .and_then(Number::from_f64)
                .map(Value::Number)
                .ok_or(format!("bad number {n}"))?,
        },
        AttributeValue::B(b) => Value::String(hex(b.as_ref())),
        AttributeValue::Bool(b) => Value::Bool(*b),
        AttributeValue::Null(_) => Value::Null,
        AttributeValue::L(l) => Value::Array(l.iter().map(from_av).collect::<Result<_, _>>()?),
        AttributeValue::M(m) => Value::Object(
            m.iter()
                .map(|(k, v)| Ok((k.clone(), from_av(v)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => return Err(format!("unexpected attribute type {other:?}")),
    })
}

fn is_index_attr(k: &str) -> bool {
    matches!(k, "pk" | "sk" | "ord" | "ord_sk" | "ttl" | "event_id")
        || k.ends_with("_sw")
        || k.ends_with("_due")
}

impl DynamoStore {
    pub fn new(client: Client, table: impl Into<String>, retention_days: i64) -> Self {
        DynamoStore {
            client,
            table: table.into(),
            retention_secs: retention_days * 86_400,
        }
    }

    /// The event item and its identity item.
    fn to_item(&self, e: &CanonicalEvent) -> Result<(Item, Item), StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            key: pk(&e.key),
            reason,
        };
        let Value::Object(mut obj) = serde_json::to_value(e).map_err(|x| corrupt(x.to_string()))?
        else {
            return Err(corrupt("event is not an object".into()));
        };
        obj.remove("event_id");
        obj.remove("key");
        obj.remove("destinations");
        // Defaults cost bytes on every write of the item and read back the same without them.
        if obj.get("event_id_origin") == Some(&Value::String("derived".into())) {
            obj.remove("event_id_origin");
        }
        let mut item = key(&e.key);
        if e.key != e.event_id {
            item.insert("event_id".into(), s(e.event_id.clone()));
        }
        let ttl = AttributeValue::N((e.received_at.unix_secs() + self.retention_secs).to_string());
        let mut identity = identity_key(&e.key);
        // What the retention and erasure scans filter on beside the identity.
        identity.insert("source".into(), s(e.source.clone()));
        identity.insert("occurred_at".into(), s(e.occurred_at.canonical()));
        identity.insert("ttl".into(), ttl.clone());
        if let Some(av) = obj.remove("identity").and_then(|v| to_av(&v, true)) {
            identity.insert("identity".into(), av);
        }
        for (k, v) in &obj {
            if let Some(av) = to_av(v, false) {
                item.insert(k.clone(), av);
            }
        }
        for (d, state) in &e.destinations {
            let mut v = serde_json::to_value(state).map_err(|x| corrupt(x.to_string()))?;
            if let Some(m) = v.as_object_mut()
                && m.get("attempts_base") == Some(&Value::from(0))
            {
                m.remove("attempts_base");
            }
            if let Some(av) = to_av(&v, false) {
                item.insert(format!("d_{d}"), av);
            }
            if let Some(due) = state.sweep_due() {
                item.insert(format!("{d}_sw"), s(shard(&e.key)));
                item.insert(format!("{d}_due"), s(due_key(due, state.status)));
            }
        }
        if let (true, Some(order)) = (e.event_name.is_revenue(), &e.order_id) {
            item.insert("ord".into(), s(order.clone()));
            item.insert(
                "ord_sk".into(),
                s(format!("{}#{}", e.occurred_at.canonical(), e.key)),
            );
        }
        item.insert("ttl".into(), ttl);
        Ok((item, identity))
    }

    /// Puts the identity item of each event item in `items` that has none of its own (one
    /// written by this release), read consistently, so `from_item` sees a whole event.
    async fn attach_identities(&self, items: &mut [Item]) -> Result<(), StoreError> {
        let wanted: Vec<String> = items
            .iter()
            .filter(|i| !i.contains_key("identity"))
            .filter_map(|i| match i.get("pk") {
                Some(AttributeValue::S(p)) => Some(p.clone()),
                _ => None,
            })
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let found = self
            .batch_get(
                wanted
                    .iter()
                    .map(|p| item_key(p.clone(), IDENTITY_SK))
                    .collect(),
            )
            .await?;
        let mut by_pk = identities_by_pk(found);
        for item in items.iter_mut() {
            attach_identity(item, &mut by_pk);
        }
        Ok(())
    }

    /// Consistent reads of `keys` (any item kind), 100 per request, unprocessed keys retried.
    async fn batch_get(&self, keys: Vec<Item>) -> Result<Vec<Item>, StoreError> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(100) {
            let mut keys: Vec<Item> = chunk.to_vec();
            // Unprocessed keys come back under throttling; retry them a bounded number of times.
            for round in 0..8 {
                if keys.is_empty() {
                    break;
                }
                let ka = KeysAndAttributes::builder()
                    .set_keys(Some(keys))
                    .consistent_read(true)
                    .build()
                    .map_err(unavailable)?;
                let got = self
                    .client
                    .batch_get_item()
                    .request_items(&self.table, ka)
                    .send()
                    .await
                    .map_err(unavailable)?;
                out.extend(
                    got.responses()
                        .and_then(|r| r.get(&self.table))
                        .into_iter()
                        .flatten()
                        .cloned(),
                );
                keys = got
                    .unprocessed_keys()
                    .and_then(|u| u.get(&self.table))
                    .map(|k| k.keys().to_vec())
                    .unwrap_or_default();
                if !keys.is_empty() {
                    tokio::time::sleep(std::time::Duration::from_millis(20 << round)).await;
                }
            }
            if !keys.is_empty() {
                return Err(StoreError::Unavailable(
                    "batch read left keys unprocessed after 8 rounds".into(),
                ));
            }
        }
        Ok(out)
    }

    /// Removes `what` from the `identity` of the item at `item_key`, if that item exists;
    /// `erased_at` (an event item's) records a whole erasure.
    async fn scrub_item(
        &self,
        item_key: Item,
        what: Scrub,
        erased_at: Option<Timestamp>,
    ) -> Result<bool, StoreError> {
        const CLICKS: [&str; 6] = ["gclid", "gbraid", "wbraid", "fbc", "fbp", "lead_id"];
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(item_key))
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_names("#idn", "identity");
        let expr = match what {
            Scrub::Browser => {
                req = req
                    .expression_attribute_names("#click", "click")
                    .expression_attribute_names("#ip", "client_ip_address")
                    .expression_attribute_names("#ua", "client_user_agent");
                "REMOVE #idn.#click.#ip, #idn.#click.#ua".to_string()
            }
            Scrub::ClickIds => {
                req = req.expression_attribute_names("#click", "click");
                let mut paths = Vec::new();
                for (i, f) in CLICKS.iter().enumerate() {
                    req = req.expression_attribute_names(format!("#c{i}"), *f);
                    paths.push(format!("#idn.#click.#c{i}"));
                }
                format!("REMOVE {}", paths.join(", "))
            }
            Scrub::All => {
                req = req.expression_attribute_values(":empty", AttributeValue::M(HashMap::new()));
                match erased_at {
                    Some(now) => {
                        req = req
                            .expression_attribute_names("#erased", "erased_at")
                            .expression_attribute_values(":now", s(now.canonical()));
                        "SET #idn = :empty, #erased = :now".to_string()
                    }
                    None => "SET #idn = :empty".to_string(),
                }
            }
        };
        applied(req.update_expression(expr).send().await)
    }

    /// One event item, whole (with its identity), or None.
    async fn whole(
        &self,
        item: &Item,
        now: Timestamp,
    ) -> Result<Option<CanonicalEvent>, StoreError> {
        let mut items = [item.clone()];
        self.attach_identities(&mut items).await?;
        from_item(&items[0], now)
    }
}

impl DynamoStore {
    /// Every event matching `filter` (with `:ev` bound to the event sort key and `:idk` to the
    /// identity item's), page by page, until `limit` are found; `bind` adds the filter's names
    /// and values. `whole`: a match on either item of an event reads the whole event, identity
    /// included (the privacy scans); otherwise the matching event items are returned as they
    /// are, without a second read, and without the identity kept in its own item (the
    /// reconciliation report, which reads none).
    async fn scan_events(
        &self,
        filter: &str,
        limit: usize,
        whole: bool,
        bind: impl Fn(
            aws_sdk_dynamodb::operation::scan::builders::ScanFluentBuilder,
        ) -> aws_sdk_dynamodb::operation::scan::builders::ScanFluentBuilder,
    ) -> Result<Vec<CanonicalEvent>, StoreError> {
        let now = Timestamp::now();
        let mut keys: Vec<String> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        let mut q = self
            .client
            .scan()
            .table_name(&self.table)
            .filter_expression(filter)
            .expression_attribute_values(":ev", s(EVENT_SK));
        if whole {
            q = q.projection_expression("pk");
        }
        if filter.contains(":idk") {
            q = q.expression_attribute_values(":idk", s(IDENTITY_SK));
        }
        paginate(bind(q), |items| {
            for item in &items {
                if !whole {
                    if let Some(e) = from_item(item, now)? {
                        out.push(e);
                    }
                } else if let Some(AttributeValue::S(p)) = item.get("pk")
                    && let Some(k) = p.strip_prefix("EV#")
                    && seen.insert(k.to_string())
                {
                    keys.push(k.to_string());
                }
            }
            Ok(keys.len().max(out.len()) >= limit)
        })
        .await?;
        match whole {
            true => self.get_many(&keys).await,
            false => Ok(out),
        }
    }
}

/// What reserving a caller-provided event_id found.
enum Reservation {
    /// No source had used it.
    Fresh,
    /// This source had.
    Ours,
    /// Another source had.
    Other(String),
}

impl DynamoStore {
    /// Records the first source to use a caller-provided event_id (`EID#<event_id>`).
    async fn reserve_event_id(&self, e: &CanonicalEvent) -> Result<Reservation, StoreError> {
        let mut item = item_key(format!("EID#{}", e.event_id), EVENT_ID_SK);
        item.insert("src".into(), s(e.source.clone()));
        item.insert(
            "ttl".into(),
            AttributeValue::N((e.received_at.unix_secs() + self.retention_secs).to_string()),
        );
        let r = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk) OR src = :src")
            .expression_attribute_values(":src", s(e.source.clone()))
            .return_values(ReturnValue::AllOld)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match r {
            Ok(out) if out.attributes().is_some_and(|a| !a.is_empty()) => Ok(Reservation::Ours),
            Ok(_) => Ok(Reservation::Fresh),
            Err(err) => {
                if let Some(aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(c)) =
                    err.as_service_error()
                    && let Some(AttributeValue::S(src)) = c.item().and_then(|i| i.get("src"))
                {
                    return Ok(Reservation::Other(src.clone()));
                }
                Err(unavailable(err))
            }
        }
    }
}

/// Reads an item back into an event; `None` when it has expired.
/// The `identity` of each identity item, by its `pk` (the event's).
fn identities_by_pk(identity_items: Vec<Item>) -> HashMap<String, AttributeValue> {
    identity_items
        .into_iter()
        .filter_map(|mut i| match (i.remove("pk"), i.remove("identity")) {
            (Some(AttributeValue::S(p)), Some(idn)) => Some((p, idn)),
            _ => None,
        })
        .collect()
}

/// Gives an event item its identity item's `identity`, unless it holds its own (written by
/// release 1 or earlier, when the identity lived on the event item).
fn attach_identity(item: &mut Item, by_pk: &mut HashMap<String, AttributeValue>) {
    if item.contains_key("identity") {
        return;
    }
    if let Some(AttributeValue::S(p)) = item.get("pk")
        && let Some(idn) = by_pk.remove(p)
    {
        item.insert("identity".into(), idn);
    }
}

fn from_item(item: &Item, now: Timestamp) -> Result<Option<CanonicalEvent>, StoreError> {
    let key = match item.get("pk") {
        Some(AttributeValue::S(k)) => k.clone(),
        _ => {
            return Err(StoreError::Corrupt {
                key: "?".into(),
                reason: "no pk".into(),
            });
        }
    };
    let corrupt = |reason: String| StoreError::Corrupt {
        key: key.clone(),
        reason,
    };
    if let Some(AttributeValue::N(ttl)) = item.get("ttl")
        && ttl.parse::<i64>().is_ok_and(|t| t < now.unix_secs())
    {
        return Ok(None);
    }
    let event_key = key
        .strip_prefix("EV#")
        .ok_or_else(|| corrupt("pk is not an event key".into()))?;
    let event_id = match item.get("event_id") {
        Some(AttributeValue::S(id)) => id.as_str(),
        _ => event_key,
    };
    let mut obj = Map::new();
    let mut dests = Map::new();
    for (k, av) in item {
        if is_index_attr(k) {
            continue;
        }
        let v = from_av(av).map_err(corrupt)?;
        match k.strip_prefix("d_") {
            Some(d) => {
                dests.insert(d.to_string(), v);
            }
            None => {
                obj.insert(k.clone(), v);
            }
        }
    }
    obj.insert("event_id".into(), Value::String(event_id.to_string()));
    obj.insert("key".into(), Value::String(event_key.to_string()));
    obj.insert("destinations".into(), Value::Object(dests));
    serde_json::from_value(Value::Object(obj))
        .map(Some)
        .map_err(|e| corrupt(e.to_string()))
}

#[async_trait]
impl EventStore for DynamoStore {
    async fn put_new(&self, event: &CanonicalEvent) -> Result<PutOutcome, StoreError> {
        let (mut item, identity) = self.to_item(event)?;
        let open = event
            .destinations
            .values()
            .filter(|s| s.sweep_due().is_some())
            .count();
        let inline = match identity.get("identity") {
            Some(idn) if inline_identity(&item, idn, open) => {
                item.insert("identity".into(), idn.clone());
                true
            }
            _ => false,
        };
        let mut conflict = None;
        if event.event_id_origin == EventIdOrigin::Provided && event.key != event.event_id {
            match self.reserve_event_id(event).await? {
                Reservation::Fresh => {
                    // The previous release stored provided ids under the bare id: a replay of
                    // such an event is this event, another source's is a collision.
                    if let Some(old) = self.get(&event.event_id).await?
                        && old.event_id_origin == EventIdOrigin::Provided
                    {
                        if old.source == event.source {
                            return Ok(PutOutcome::Duplicate);
                        }
                        conflict = Some(old.source);
                    }
                }
                Reservation::Ours => {}
                Reservation::Other(src) => conflict = Some(src),
            }
        }
        // An identity of its own is written first, so an event item never exists without it (a
        // crash between the two leaves an identity item the webhook's retry finds and keeps).
        // Only if absent: an erased identity must not come back with a replayed webhook. An
        // inline identity comes with the event item's one conditional write.
        let r = match inline {
            true => Ok(()),
            false => self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(identity))
                .condition_expression("attribute_not_exists(pk)")
                .send()
                .await
                .map(|_| ()),
        };
        if let Err(e) = r
            && !conditional_failed(&e)
        {
            return Err(match too_large(&e) {
                Some(reason) => StoreError::TooLarge {
                    key: event.key.clone(),
                    reason,
                },
                None => unavailable(e),
            });
        }
        let r = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        match r {
            Ok(_) => Ok(match conflict {
                Some(other_source) => PutOutcome::CreatedWithConflict { other_source },
                None => PutOutcome::Created,
            }),
            Err(e) if conditional_failed(&e) => Ok(PutOutcome::Duplicate),
            Err(e) => match too_large(&e) {
                Some(reason) => Err(StoreError::TooLarge {
                    key: event.key.clone(),
                    reason,
                }),
                None => Err(unavailable(e)),
            },
        }
    }

    async fn get(&self, event_key: &str) -> Result<Option<CanonicalEvent>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(event_key)))
            .consistent_read(true)
            .send()
            .await
            .map_err(unavailable)?;
        match out.item() {
            Some(item) => self.whole(item, Timestamp::now()).await,
            None => Ok(None),
        }
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<CanonicalEvent>, StoreError> {
        let now = Timestamp::now();
        let mut unique: Vec<&String> = keys.iter().collect();
        unique.sort();
        unique.dedup();
        // Each event's two items in the same requests.
        let wanted: Vec<Item> = unique
            .iter()
            .flat_map(|k| [key(k), identity_key(k)])
            .collect();
        let (identity_items, events): (Vec<Item>, Vec<Item>) =
            self.batch_get(wanted).await?.into_iter().partition(
                |i| matches!(i.get("sk"), Some(AttributeValue::S(sk)) if sk == IDENTITY_SK),
            );
        let mut identities = identities_by_pk(identity_items);
        let mut found = HashMap::new();
        for mut item in events {
            attach_identity(&mut item, &mut identities);
            if let Some(e) = from_item(&item, now)? {
                found.insert(e.key.clone(), e);
            }
        }
        Ok(keys
            .iter()
            .filter_map(|id| found.get(id).cloned())
            .collect())
    }

    /// The index gives the order's keys (eventually consistent, but an order's events were
    /// written long before a refund of it is sent); the events themselves are then read
    /// consistently from the table, in the index's order (business time).
    async fn find_by_order(&self, order_id: &str) -> Result<Vec<CanonicalEvent>, StoreError> {
        let mut keys = Vec::new();
        let q = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(ORDER_INDEX)
            .key_condition_expression("ord = :o")
            .expression_attribute_values(":o", s(order_id));
        paginate(q, |items| {
            for item in &items {
                if let Some(AttributeValue::S(p)) = item.get("pk")
                    && let Some(k) = p.strip_prefix("EV#")
                {
                    keys.push(k.to_string());
                }
            }
            Ok(false)
        })
        .await?;
        self.get_many(&keys).await
    }

    async fn claim(
        &self,
        event_key: &str,
        destination: Destination,
        now: Timestamp,
        lease_until: Timestamp,
        redrive_of: Option<u32>,
    ) -> Result<ClaimOutcome, StoreError> {
        let due = lease_until.plus_secs(bridge_core::delivery::SWEEP_GRACE_SECS);
        // The sweep key is left as it is when there is one (a pending or retrying pair): a
        // changed index key is billed as a delete and a put in the sweep index, twice the
        // price of the whole claim's index work, and the sweep does not need it moved (a pair
        // still in flight when its old time comes is re-enqueued, and the claim refuses the
        // copy while the lease holds). Only a claim that reopens a closed pair (an
        // operator's redrive of a dead letter) puts the pair back into the index.
        // The claim rule of `DestinationState::claimability`: a dead-lettered pair only for
        // the message that carries its dead-letter token (an operator's redrive).
        let dead = if redrive_of.is_some() {
            "OR (#d.#st = :dead AND #d.#att = :redrive) "
        } else {
            ""
        };
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(event_key)))
            .update_expression(
                "SET #d.#st = :sending, #d.#att = #d.#att + :one, #d.#lease = :lease, #d.#upd = :now, \
                 #sw = if_not_exists(#sw, :shard), #due = if_not_exists(#due, :due)",
            )
            .condition_expression(format!(
                "attribute_exists(#d) AND (#d.#st = :pending {dead}\
                 OR (#d.#st = :retry AND (attribute_not_exists(#d.#next) OR #d.#next <= :now)) \
                 OR (#d.#st = :sending AND (attribute_not_exists(#d.#lease) OR #d.#lease <= :now)))"
            ))
            .expression_attribute_names("#d", format!("d_{destination}"))
            .expression_attribute_names("#st", "status")
            .expression_attribute_names("#att", "attempts")
            .expression_attribute_names("#lease", "lease_until")
            .expression_attribute_names("#next", "next_attempt_at")
            .expression_attribute_names("#upd", "updated_at")
            .expression_attribute_names("#sw", format!("{destination}_sw"))
            .expression_attribute_names("#due", format!("{destination}_due"))
            .expression_attribute_values(":sending", s("sending"))
            .expression_attribute_values(":pending", s("pending"))
            .expression_attribute_values(":retry", s("retry"))
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .expression_attribute_values(":lease", s(lease_until.canonical()))
            .expression_attribute_values(":now", s(now.canonical()))
            .expression_attribute_values(":shard", s(shard(event_key)))
            .expression_attribute_values(":due", s(due_key(due, DeliveryStatus::Sending)))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        if let Some(token) = redrive_of {
            req = req
                .expression_attribute_values(":dead", s("dead_letter"))
                .expression_attribute_values(":redrive", AttributeValue::N(token.to_string()));
        }
        match req.send().await {
            Ok(out) => match match out.attributes() {
                Some(a) => self.whole(a, now).await?,
                None => None,
            } {
                Some(e) => Ok(ClaimOutcome::Claimed(Box::new(e))),
                None => Ok(ClaimOutcome::Missing),
            },
            Err(err) => {
                let Some(svc) = err.as_service_error() else {
                    return Err(unavailable(err));
                };
                let aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(ccf) = svc else {
                    return Err(unavailable(err));
                };
                let Some(old) = ccf.item() else {
                    return Ok(ClaimOutcome::Missing);
                };
                // Nothing is sent for a refused claim: the event comes without its identity
                // (no read of the identity item).
                match from_item(old, now)? {
                    Some(e) => match e.destinations.get(&destination) {
                        Some(state) => Ok(ClaimOutcome::Refused(
                            state.claimability(now, redrive_of),
                            Box::new(e),
                        )),
                        None => Ok(ClaimOutcome::Missing),
                    },
                    None => Ok(ClaimOutcome::Missing),
                }
            }
        }
    }

    async fn complete(
        &self,
        event_key: &str,
        destination: Destination,
        attempt: u32,
        t: &Transition,
    ) -> Result<bool, StoreError> {
        let corrupt = |reason: &str| StoreError::Corrupt {
            key: pk(event_key),
            reason: reason.to_string(),
        };
        // The whole (bounded) log is written: the claim's condition on the attempt number
        // guarantees nobody else changed it since it was read.
        let log = serde_json::to_value(&t.log)
            .ok()
            .and_then(|v| to_av(&v, false))
            .ok_or_else(|| corrupt("log does not serialize"))?;
        let mut set = vec!["#d.#st = :st", "#d.#upd = :now", "#d.#log = :log"];
        let mut remove = vec!["#d.#lease"];
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(event_key)))
            .condition_expression("#d.#st = :sending AND #d.#att = :attempt")
            .expression_attribute_names("#d", format!("d_{destination}"))
            .expression_attribute_names("#st", "status")
            .expression_attribute_names("#att", "attempts")
            .expression_attribute_names("#lease", "lease_until")
            .expression_attribute_names("#upd", "updated_at")
            .expression_attribute_names("#log", "log")
            .expression_attribute_names("#next", "next_attempt_at")
            .expression_attribute_names("#wait", "waiting_since")
            .expression_attribute_names("#sw", format!("{destination}_sw"))
            .expression_attribute_names("#due", format!("{destination}_due"))
            .expression_attribute_values(":st", s(t.status.as_str()))
            .expression_attribute_values(":sending", s("sending"))
            .expression_attribute_values(":attempt", AttributeValue::N(attempt.to_string()))
            .expression_attribute_values(":now", s(t.now.canonical()))
            .expression_attribute_values(":log", log);
        match t.next_attempt_at {
            Some(next) => {
                set.push("#d.#next = :next");
                req = req.expression_attribute_values(":next", s(next.canonical()));
            }
            None => remove.push("#d.#next"),
        }
        match t.waiting_since {
            Some(since) => {
                set.push("#d.#wait = :wait");
                req = req.expression_attribute_values(":wait", s(since.canonical()));
            }
            None => remove.push("#d.#wait"),
        }
        if let Some(err) = t
            .error
            .as_ref()
            .and_then(|e| serde_json::to_value(e).ok())
            .and_then(|v| to_av(&v, false))
        {
            set.push("#d.#err = :err");
            req = req
                .expression_attribute_names("#err", "last_error")
                .expression_attribute_values(":err", err);
        }
        if t.status == DeliveryStatus::DeadLetter {
            set.push("#d.#ab = #d.#att");
            req = req.expression_attribute_names("#ab", "attempts_base");
        } else if t.release_attempt {
            set.push("#d.#ab = if_not_exists(#d.#ab, :zero) + :one");
            req = req
                .expression_attribute_names("#ab", "attempts_base")
                .expression_attribute_values(":zero", AttributeValue::N("0".into()))
                .expression_attribute_values(":one", AttributeValue::N("1".into()));
        }
        let probe = DestinationState {
            status: t.status,
            next_attempt_at: t.next_attempt_at,
            ..DestinationState::new(t.status, t.now)
        };
        match probe.sweep_due() {
            Some(due) => {
                set.push("#sw = :shard");
                set.push("#due = :due");
                req = req
                    .expression_attribute_values(":shard", s(shard(event_key)))
                    .expression_attribute_values(":due", s(due_key(due, t.status)));
            }
            None => {
                remove.push("#sw");
                remove.push("#due");
            }
        }
        let expr = format!("SET {} REMOVE {}", set.join(", "), remove.join(", "));
        match req.update_expression(expr).send().await {
            Ok(_) => {
                // The browser data lives on the identity item, another write; if this one
                // fails, the retention run finds the data and removes it.
                if t.scrub_browser
                    && let Err(e) = self.scrub(event_key, Scrub::Browser, t.now).await
                {
                    tracing::warn!(key = %event_key, destination = %destination, error = %e, result = "scrub_deferred", "browser data left for the retention run");
                }
                Ok(true)
            }
            Err(e) if conditional_failed(&e) => Ok(false),
            Err(e) => match too_large(&e) {
                Some(reason) => Err(StoreError::TooLarge {
                    key: event_key.to_string(),
                    reason,
                }),
                None => Err(unavailable(e)),
            },
        }
    }

    async fn hold_order(
        &self,
        order_id: &str,
        destination: Destination,
        event_key: &str,
    ) -> Result<OrderHold, StoreError> {
        let ttl = Timestamp::now().unix_secs() + self.retention_secs;
        let r = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(order_item(order_id)))
            .update_expression("SET #w = :me, #ttl = :ttl")
            .condition_expression("attribute_not_exists(#w) OR #w = :me")
            .expression_attribute_names("#w", holder_attr(destination))
            .expression_attribute_names("#ttl", "ttl")
            .expression_attribute_values(":me", s(event_key))
            .expression_attribute_values(":ttl", AttributeValue::N(ttl.to_string()))
            .return_values(ReturnValue::AllOld)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match r {
            Ok(out) => Ok(OrderHold::Held {
                first: out
                    .attributes()
                    .and_then(|a| a.get(&holder_attr(destination)))
                    .is_none(),
            }),
            Err(err) => {
                if let Some(aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(c)) =
                    err.as_service_error()
                    && let Some(AttributeValue::S(holder)) =
                        c.item().and_then(|i| i.get(&holder_attr(destination)))
                {
                    return Ok(OrderHold::HeldBy(holder.clone()));
                }
                Err(unavailable(err))
            }
        }
    }

    async fn take_over_order(
        &self,
        order_id: &str,
        destination: Destination,
        from: &str,
        to: &str,
    ) -> Result<bool, StoreError> {
        let r = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(order_item(order_id)))
            .update_expression("SET #w = :to")
            .condition_expression("#w = :from")
            .expression_attribute_names("#w", holder_attr(destination))
            .expression_attribute_values(":to", s(to))
            .expression_attribute_values(":from", s(from))
            .send()
            .await;
        applied(r)
    }

    async fn scrub(
        &self,
        event_key: &str,
        what: Scrub,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        // The identity item (this release's events), else the event item (earlier ones).
        match self.scrub_item(identity_key(event_key), what, None).await? {
            true => {
                if what == Scrub::All {
                    self.client
                        .update_item()
                        .table_name(&self.table)
                        .set_key(Some(key(event_key)))
                        .condition_expression("attribute_exists(pk)")
                        .update_expression("SET #erased = :now")
                        .expression_attribute_names("#erased", "erased_at")
                        .expression_attribute_values(":now", s(now.canonical()))
                        .send()
                        .await
                        .map_err(unavailable)?;
                }
                Ok(true)
            }
            false => self.scrub_item(key(event_key), what, Some(now)).await,
        }
    }

    async fn retention_candidates(
        &self,
        clicks_before: Timestamp,
        limit: usize,
    ) -> Result<Vec<CanonicalEvent>, StoreError> {
        let filter = "(sk = :ev OR sk = :idk) AND (attribute_exists(#idn.#click.#ip) \
             OR attribute_exists(#idn.#click.#ua) \
             OR (occurred_at < :before AND (attribute_exists(#idn.#click.#c0) \
                 OR attribute_exists(#idn.#click.#c1) OR attribute_exists(#idn.#click.#c2) \
                 OR attribute_exists(#idn.#click.#c3) OR attribute_exists(#idn.#click.#c4) \
                 OR attribute_exists(#idn.#click.#c5))))";
        let mut out = self
            .scan_events(filter, limit, true, |mut q| {
                q = q
                    .expression_attribute_names("#idn", "identity")
                    .expression_attribute_names("#click", "click")
                    .expression_attribute_names("#ip", "client_ip_address")
                    .expression_attribute_names("#ua", "client_user_agent")
                    .expression_attribute_values(":before", s(clicks_before.canonical()));
                for (i, f) in ["gclid", "gbraid", "wbraid", "fbc", "fbp", "lead_id"]
                    .iter()
                    .enumerate()
                {
                    q = q.expression_attribute_names(format!("#c{i}"), *f);
                }
                q
            })
            .await?;
        out.truncate(limit);
        Ok(out)
    }

    async fn find_for_erasure(
        &self,
        entity: Option<(&str, &str)>,
        hashes: &[String],
    ) -> Result<Vec<CanonicalEvent>, StoreError> {
        let mut terms = Vec::new();
        if entity.is_some() {
            terms.push("(#src = :src AND (entity_id = :entity OR #idn.#cc = :entity))".to_string());
        }
        let mut values: Vec<(String, AttributeValue)> = Vec::new();
        for (i, h) in hashes.iter().enumerate() {
            let Some(bytes) = unhex(h) else { continue };
            values.push((format!(":h{i}"), AttributeValue::B(Blob::new(bytes))));
            for path in ["#idn.#m.#em", "#idn.#m.#ph", "#idn.#g.#gem", "#idn.#g.#gph"] {
                terms.push(format!("{path} = :h{i}"));
            }
        }
        if terms.is_empty() {
            return Ok(Vec::new());
        }
        // DynamoDB refuses redundant parentheses: one term stands as it is.
        let filter = match terms.as_slice() {
            [one] => format!("(sk = :ev OR sk = :idk) AND {one}"),
            many => format!("(sk = :ev OR sk = :idk) AND ({})", many.join(" OR ")),
        };
        self.scan_events(&filter, usize::MAX, true, |mut q| {
            if !values.is_empty() || entity.is_some() {
                q = q.expression_attribute_names("#idn", "identity");
            }
            if entity.is_some() {
                q = q.expression_attribute_names("#cc", "crm_contact_id");
            }
            if !values.is_empty() {
                for (k, v) in [
                    ("#m", "meta"),
                    ("#em", "em"),
                    ("#ph", "ph"),
                    ("#g", "google"),
                    ("#gem", "email"),
                    ("#gph", "phone"),
                ] {
                    q = q.expression_attribute_names(k, v);
                }
            }
            if let Some((src, id)) = entity {
                q = q
                    .expression_attribute_names("#src", "source")
                    .expression_attribute_values(":src", s(src))
                    .expression_attribute_values(":entity", s(id));
            }
            for (k, v) in &values {
                q = q.expression_attribute_values(k.clone(), v.clone());
            }
            q
        })
        .await
    }

    async fn first_seen(
        &self,
        kind: &str,
        value: &str,
        at: Timestamp,
    ) -> Result<Timestamp, StoreError> {
        let key = item_key(format!("SEEN#{kind}#{value}"), "SEEN");
        let read = |item: Option<&Item>| match item.and_then(|i| i.get("t")) {
            Some(AttributeValue::S(t)) => Timestamp::parse_rfc3339(t).ok(),
            _ => None,
        };
        // Most events find an earlier time already recorded: a read, no write.
        let got = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key.clone()))
            .send()
            .await
            .map_err(unavailable)?;
        if let Some(t) = read(got.item())
            && t <= at
        {
            return Ok(t);
        }
        let ttl = Timestamp::now().unix_secs() + self.retention_secs;
        let r = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .update_expression("SET #t = :at, #ttl = :ttl")
            .condition_expression("attribute_not_exists(#t) OR #t > :at")
            .expression_attribute_names("#t", "t")
            .expression_attribute_names("#ttl", "ttl")
            .expression_attribute_values(":at", s(at.canonical()))
            .expression_attribute_values(":ttl", AttributeValue::N(ttl.to_string()))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match r {
            Ok(_) => Ok(at),
            Err(err) => {
                if let Some(aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(c)) =
                    err.as_service_error()
                    && let Some(t) = read(c.item())
                {
                    return Ok(t);
                }
                Err(unavailable(err))
            }
        }
    }

    /// Without the identity kept in its own item: the report counts and sums, it reads no
    /// identifier, and a second read of every event of the period would double the scan.
    async fn events_between(
        &self,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<CanonicalEvent>, StoreError> {
        let mut out = self
            .scan_events(
                "sk = :ev AND occurred_at >= :from AND occurred_at < :to",
                usize::MAX,
                false,
                |q| {
                    q.expression_attribute_values(":from", s(from.canonical()))
                        .expression_attribute_values(":to", s(to.canonical()))
                },
            )
            .await?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn stuck(
        &self,
        destination: Destination,
        before: Timestamp,
        limit: usize,
    ) -> Result<Vec<StuckRef>, StoreError> {
        let mut out = Vec::new();
        for sh in 0..SWEEP_SHARDS {
            let q = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(sweep_index(destination))
                .key_condition_expression("#sw = :s AND #due < :before")
                .expression_attribute_names("#sw", format!("{destination}_sw"))
                .expression_attribute_names("#due", format!("{destination}_due"))
                .expression_attribute_values(":s", s(sh.to_string()))
                .expression_attribute_values(":before", s(before.canonical()))
                .limit(limit.clamp(1, 1000) as i32);
            paginate(q, |items| {
                for item in &items {
                    let (Some(AttributeValue::S(p)), Some(AttributeValue::S(due))) =
                        (item.get("pk"), item.get(&format!("{destination}_due")))
                    else {
                        continue;
                    };
                    let Some((at, st)) = due.split_once('#') else {
                        continue;
                    };
                    let (Some(id), Ok(at), Some(status)) = (
                        p.strip_prefix("EV#"),
                        Timestamp::parse_rfc3339(at),
                        DeliveryStatus::parse(st),
                    ) else {
                        continue;
                    };
                    out.push(StuckRef {
                        key: id.to_string(),
                        destination,
                        status,
                        due: at,
                    });
                }
                Ok(out.len() >= limit * SWEEP_SHARDS as usize)
            })
            .await?;
        }
        out.sort_by(|a, b| (a.due, &a.key).cmp(&(b.due, &b.key)));
        out.truncate(limit);
        Ok(out)
    }

    async fn defer_sweep(
        &self,
        event_key: &str,
        destination: Destination,
        status: DeliveryStatus,
        due: Timestamp,
    ) -> Result<bool, StoreError> {
        let r = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(event_key)))
            .update_expression("SET #due = :due")
            // Still open (the claim does not rewrite the key's status, so match any open one).
            .condition_expression(
                "attribute_exists(#due) AND #d.#st IN (:pending, :sending, :retry)",
            )
            .expression_attribute_names("#d", format!("d_{destination}"))
            .expression_attribute_names("#st", "status")
            .expression_attribute_names("#due", format!("{destination}_due"))
            .expression_attribute_values(":pending", s("pending"))
            .expression_attribute_values(":sending", s("sending"))
            .expression_attribute_values(":retry", s("retry"))
            .expression_attribute_values(":due", s(due_key(due, status)))
            .send()
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(unavailable(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hashes_become_binary_and_come_back_as_hex() {
        let h = bridge_core::hashing::sha256_hex("a@b.co");
        let v = json!({"meta": {"em": h}, "click": {"gclid": "abc"}});
        let av = to_av(&v, true).unwrap();
        let AttributeValue::M(m) = &av else { panic!() };
        let AttributeValue::M(meta) = &m["meta"] else {
            panic!()
        };
        assert!(matches!(meta["em"], AttributeValue::B(_)));
        assert_eq!(from_av(&av).unwrap(), v);
    }

    #[test]
    fn numbers_round_trip() {
        let v = json!({"a": 1200.5, "b": 3, "c": [true, null, "x"]});
        let back = from_av(&to_av(&v, false).unwrap()).unwrap();
        assert_eq!(back, json!({"a": 1200.5, "b": 3, "c": [true, "x"]}));
    }

    /// A lead for Meta alone, as the bundled contract maps it, with `identity`; the event
    /// item and identity item `put_new` would start from.
    fn lead(identity: serde_json::Value) -> (CanonicalEvent, Item, Item) {
        use bridge_core::event::{ValidationContext, parse_event_json, validate};
        let now = Timestamp::parse_rfc3339("2026-11-28T12:00:00Z").unwrap();
        let v = json!({"source": "hubspot", "event_name": "lead", "occurred_at": "2026-11-28T11:00:00Z",
            "entity_type": "contact", "entity_id": "123456789", "identity": identity,
            "consent": {"status": "granted"}});
        let ctx = ValidationContext::for_tests(now);
        let mut e = validate(&parse_event_json(&v.to_string()).unwrap(), &ctx).unwrap();
        e.destinations.insert(
            Destination::Meta,
            DestinationState::new(DeliveryStatus::Pending, now),
        );
        let (item, identity) = unconnected().to_item(&e).unwrap();
        (e, item, identity)
    }

    /// A store whose items can be built; it sends nothing.
    fn unconnected() -> DynamoStore {
        DynamoStore {
            client: Client::from_conf(
                aws_sdk_dynamodb::Config::builder()
                    .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
                    .build(),
            ),
            table: "t".into(),
            retention_secs: 400 * 86_400,
        }
    }

    /// The allowance holds: an email-only lead keeps its identity inline, and after a retry
    /// (its error and log entry) and a delivery the item is still one write unit; a full
    /// profile's identity never goes inline.
    #[test]
    fn an_inlined_identity_keeps_the_item_in_one_write_unit_through_a_retry_and_a_delivery() {
        use bridge_core::delivery::{DeliveryLogEntry, ErrorCode, ErrorInfo, PairResult};
        let (mut e, item, identity) = lead(json!({"email": "first.last@example.com"}));
        assert!(inline_identity(&item, &identity["identity"], 1));
        let at = e.received_at;
        let s = e.destinations.get_mut(&Destination::Meta).unwrap();
        s.status = DeliveryStatus::Delivered;
        s.attempts = 2;
        s.updated_at = at.plus_secs(900);
        s.last_error = Some(ErrorInfo::new(
            ErrorCode::http(503),
            "Meta answered HTTP 503: service temporarily unavailable (code 2, transient)",
        ));
        s.log = vec![
            DeliveryLogEntry {
                error: s.last_error.clone(),
                platform_ref: Some("AbCdEfGhIjKlMnOpQrStUvW".into()),
                ..DeliveryLogEntry::new(1, PairResult::Retry, at.plus_secs(1))
            },
            DeliveryLogEntry {
                platform_ref: Some("AbCdEfGhIjKlMnOpQrStUvW".into()),
                sent_as: Some("Lead".into()),
                ..DeliveryLogEntry::new(2, PairResult::Delivered, at.plus_secs(900))
            },
        ];
        let (mut after, _) = unconnected().to_item(&e).unwrap();
        after.insert("identity".into(), identity["identity"].clone());
        let before = item_bytes(&item) + "identity".len() + value_bytes(&identity["identity"]);
        let grown = item_bytes(&after);
        println!(
            "an email-only lead: {before} bytes at ingest, {grown} after a retry and a delivery"
        );
        assert!(
            grown <= WRITE_UNIT_BYTES,
            "{grown} bytes after a retry and a delivery"
        );
        assert!(
            grown - before <= DELIVERY_GROWTH,
            "grew {} bytes, the allowance is {DELIVERY_GROWTH}",
            grown - before
        );

        let full = json!({"email": "a@example.com", "phone": "+1 650 555 1234", "first_name": "Ada",
            "last_name": "Lovelace", "city": "Menlo Park", "state": "CA", "zip": "94025",
            "country": "US", "external_id": "crm-1", "gclid": "Cj0-test"});
        let (_, item, identity) = lead(full);
        assert!(!inline_identity(&item, &identity["identity"], 1));
    }

    #[test]
    fn item_sizes_follow_dynamodbs_rules() {
        let item = Item::from([
            ("ab".to_string(), s("héllo")),
            ("n".to_string(), AttributeValue::N("-1200.50".into())),
            ("b".to_string(), AttributeValue::B(Blob::new(vec![0u8; 32]))),
            (
                "m".to_string(),
                AttributeValue::M(HashMap::from([(
                    "x".to_string(),
                    AttributeValue::Bool(true),
                )])),
            ),
            (
                "l".to_string(),
                AttributeValue::L(vec![AttributeValue::Null(true), s("yz")]),
            ),
        ]);
        // "ab" + 6 UTF-8 bytes; "n" + 3 significant digits (12005 -> 5 digits: 3 bytes) + 1;
        // "b" + 32; "m" + 3 + (1 + "x" + 1); "l" + 3 + (1 + 1) + (1 + 2).
        assert_eq!(
            item_bytes(&item),
            (2 + 6) + (1 + 4) + (1 + 32) + (1 + 6) + (1 + 8)
        );
    }

    #[test]
    fn shards_are_stable_and_in_range() {
        assert_eq!(shard("abc"), shard("abc"));
        assert!(
            (0..SWEEP_SHARDS)
                .map(|s| s.to_string())
                .any(|s| s == shard("whatever"))
        );
    }
}
