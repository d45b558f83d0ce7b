#!/usr/bin/env python3
"""Runs moto's server with DynamoDB requests applied one at a time.

moto's server handles requests on concurrent threads and its DynamoDB backend does not lock
an item between checking a condition and writing it, so two conditional UpdateItem calls can
both pass (seen here: two workers winning one claim). DynamoDB guarantees that a conditional
write is atomic; serializing DynamoDB requests reproduces that. Other services (SQS long
polls in particular) stay concurrent.

It also counts requests per operation (GET /_bridge/requests answers the counts as JSON), so
tests can state how many AWS requests each delivered conversion cost, and bills every DynamoDB
write by DynamoDB's documented rules (GET /_bridge/write-units answers the write units per
table, for the table and each index), which moto does not.

Usage: moto_server.py [--host 127.0.0.1] [--port 5000]
"""

import argparse
import io
import json
import threading
import time

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple

_dynamodb = threading.Lock()
_counts = {}
_origins = {}
_millis = {}
_counts_lock = threading.Lock()


def serialize_dynamodb(app):
    def wrapped(environ, start_response):
        if environ.get("PATH_INFO") == "/_bridge/requests":
            with _counts_lock:
                body = json.dumps(_counts).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        if environ.get("PATH_INFO") == "/_bridge/requests-by-origin":
            # The bridge's own requests, and the test harness's and the emulated event source
            # mappings' (user agent app/bridge-devstack), by operation.
            with _counts_lock:
                body = json.dumps(_origins).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        if environ.get("PATH_INFO") == "/_bridge/storage":
            # Stored bytes of a table and its indexes as DynamoDB bills storage: each item's
            # size plus 100 bytes, each index entry's likewise (GET /_bridge/storage?table=T).
            table = environ.get("QUERY_STRING", "").partition("table=")[2].partition("&")[0]
            with _dynamodb:
                body = json.dumps(stored_bytes(_backend(environ), table)).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        if environ.get("PATH_INFO") == "/_bridge/write-units":
            with _counts_lock:
                body = json.dumps(_units).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        if environ.get("PATH_INFO") == "/_bridge/millis":
            # Time spent per DynamoDB operation, for finding what slows the emulator down.
            with _counts_lock:
                body = json.dumps({k: round(v) for k, v in _millis.items()}).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        op = target or environ.get("QUERY_STRING", "").partition("Action=")[2].partition("&")[0] or "other"
        ua = environ.get("HTTP_USER_AGENT", "") + environ.get("HTTP_X_AMZ_USER_AGENT", "")
        origin = "devstack" if "app/bridge-devstack" in ua else "bridge"
        with _counts_lock:
            _counts[op] = _counts.get(op, 0) + 1
            by = _origins.setdefault(origin, {})
            by[op] = by.get(op, 0) + 1
        if target.startswith("DynamoDB"):
            with _dynamodb:
                # Consume the body inside the lock: the response is computed here.
                t = time.monotonic()
                length = int(environ.get("CONTENT_LENGTH") or 0)
                raw = environ["wsgi.input"].read(length) if length else b""
                environ["wsgi.input"] = io.BytesIO(raw)
                out = metered(app, environ, start_response, op, raw)
                with _counts_lock:
                    _millis[op] = _millis.get(op, 0) + (time.monotonic() - t) * 1000
                return out
        return app(environ, start_response)

    return wrapped


# --- DynamoDB write units, by DynamoDB's documented billing rules ---------------------------
# moto answers ReturnConsumedCapacity with a constant, so the bill is computed here from the
# item before and after each write. Sources:
# - item size: "Item sizes and formats" and "Capacity unit consumption"
#   (docs.aws.amazon.com/amazondynamodb/latest/developerguide/CapacityUnitCalculations.html):
#   a string is its UTF-8 bytes, a number about 1 byte per two significant digits plus 1,
#   a binary its bytes, a boolean or null 1 byte, a list or map 3 bytes plus 1 byte per
#   element, and every attribute name counts its UTF-8 bytes.
# - a write costs one unit per 1 KB of the larger of the item before and after (PutItem,
#   UpdateItem) or of the deleted item; a failed condition still costs the existing item's
#   size, at least one unit; a transactional write costs twice.
# - global secondary indexes (GSI.html, "Provisioned throughput considerations for global
#   secondary indexes"): putting an item into an index or deleting it from one costs one
#   write of the index entry, changing an index key attribute costs two (a delete and a put),
#   changing only projected attributes costs one, and an item in the index neither before
#   nor after costs nothing. An entry's size is the table's key, the index's key and the
#   projected attributes, plus 100 bytes.
import base64
import math

_units = {}


def _number_size(text):
    digits = text.lstrip("+-").lower().split("e")[0].replace(".", "").strip("0")
    return math.ceil(len(digits) / 2) + 1


def _value_size(av):
    ((t, v),) = av.items()
    if t == "S":
        return len(v.encode())
    if t == "N":
        return _number_size(v)
    if t == "B":
        return len(base64.b64decode(v)) if isinstance(v, str) else len(v)
    if t in ("BOOL", "NULL"):
        return 1
    if t == "SS":
        return sum(len(x.encode()) for x in v)
    if t == "NS":
        return sum(_number_size(x) for x in v)
    if t == "BS":
        return sum(len(base64.b64decode(x)) for x in v)
    if t == "L":
        return 3 + sum(1 + _value_size(x) for x in v)
    if t == "M":
        return 3 + sum(1 + len(k.encode()) + _value_size(x) for k, x in v.items())
    return 0


def item_size(item):
    return sum(len(k.encode()) + _value_size(v) for k, v in (item or {}).items())


def _kb(size):
    return max(1, math.ceil(size / 1024))


def _index_entry(index, item, table_keys):
    keys = [k["AttributeName"] for k in index.schema]
    if not item or any(k not in item for k in keys):
        return None
    projection = index.projection or {}
    kind = projection.get("ProjectionType", "ALL")
    if kind == "ALL":
        names = set(item)
    else:
        names = set(keys) | set(table_keys)
        if kind == "INCLUDE":
            names |= set(projection.get("NonKeyAttributes", []))
    entry = {k: item[k] for k in names if k in item}
    return {k: item[k] for k in keys}, entry


def index_units(index, before, after, table_keys):
    """Write units an index is billed for one table write that turned `before` into `after`."""
    b = _index_entry(index, before, table_keys)
    a = _index_entry(index, after, table_keys)
    if b is None and a is None:
        return 0
    if a is None:
        return _kb(item_size(b[1]) + 100)
    if b is None:
        return _kb(item_size(a[1]) + 100)
    if a[0] != b[0]:
        return _kb(item_size(b[1]) + 100) + _kb(item_size(a[1]) + 100)
    if a[1] != b[1]:
        return _kb(item_size(a[1]) + 100)
    return 0


def _backend(environ):
    from moto.dynamodb.models import dynamodb_backends

    auth = environ.get("HTTP_AUTHORIZATION", "")
    scope = auth.partition("Credential=")[2].split("/")
    region = scope[2] if len(scope) > 2 else "us-east-1"
    return dynamodb_backends["123456789012"][region]


def _writes(op, body):
    """(table, kind, key-or-item, factor) for every item a write request touches."""
    op = op.rpartition(".")[2]
    if op in ("PutItem", "UpdateItem", "DeleteItem"):
        return [(body.get("TableName"), op, body.get("Item") or body.get("Key") or {}, 1)]
    out = []
    if op == "BatchWriteItem":
        for table, reqs in body.get("RequestItems", {}).items():
            for r in reqs:
                if "PutRequest" in r:
                    out.append((table, "PutItem", r["PutRequest"].get("Item", {}), 1))
                elif "DeleteRequest" in r:
                    out.append((table, "DeleteItem", r["DeleteRequest"].get("Key", {}), 1))
    if op == "TransactWriteItems":
        for t in body.get("TransactItems", []):
            for kind, r in t.items():
                if kind in ("Put", "Update", "Delete"):
                    out.append((r.get("TableName"), kind + "Item", r.get("Item") or r.get("Key") or {}, 2))
    return out


def stored_bytes(backend, table):
    try:
        t = backend.get_table(table)
    except Exception:
        return {}
    keys = [k for k in (t.hash_key_attr, t.range_key_attr) if k]
    items = [i.to_json()["Attributes"] for i in t.all_items()]
    out = {"items": len(items), "table": sum(item_size(i) + 100 for i in items), "indexes": {}}
    for index in t.global_indexes:
        entries = [e for e in (_index_entry(index, i, keys) for i in items) if e]
        out["indexes"][index.name] = sum(item_size(e[1]) + 100 for e in entries)
    return out


def _new_units():
    return {"writes": 0, "failed_conditions": 0, "table": 0, "indexes": {}, "max_item_bytes": 0, "reads": 0}


def _current(backend, table, key_or_item):
    try:
        t = backend.get_table(table)
        keys = {k: key_or_item[k] for k in (t.hash_key_attr, t.range_key_attr) if k and k in key_or_item}
        found = backend.get_item(table, keys)
        return t, keys, (found.to_json()["Attributes"] if found else None)
    except Exception:
        return None, None, None


def _read_units(op, body, response):
    """(table, read units) a read request is billed: one unit per 4 KB read consistently, half
    that eventually consistently; a query or scan per 4 KB of all it read (counted here from
    what it returned, so a filtered scan is billed more than this says)."""
    op = op.rpartition(".")[2]
    factor = 1.0 if body.get("ConsistentRead") else 0.5
    if op == "GetItem":
        item = response.get("Item")
        return [(body.get("TableName"), factor * math.ceil(item_size(item) / 4096) if item else factor)]
    if op in ("Query", "Scan"):
        size = sum(item_size(i) for i in response.get("Items", []))
        return [(body.get("TableName"), factor * max(1, math.ceil(size / 4096)))]
    if op == "BatchGetItem":
        out = []
        for table, items in response.get("Responses", {}).items():
            f = 1.0 if body.get("RequestItems", {}).get(table, {}).get("ConsistentRead") else 0.5
            out += [(table, f * math.ceil(item_size(i) / 4096)) for i in items]
        return out
    return []


def metered(app, environ, start_response, op, raw):
    """Runs one DynamoDB request and adds what it is billed to `_units`. Requests from the
    test harness and the event source mapping emulator (user agent app/bridge-devstack) are
    not the bridge's and are not billed."""
    if "app/bridge-devstack" in environ.get("HTTP_USER_AGENT", "") + environ.get("HTTP_X_AMZ_USER_AGENT", ""):
        return list(app(environ, start_response))
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        body = {}
    writes = _writes(op, body)
    if not writes:
        out = list(app(environ, start_response))
        try:
            response = json.loads(b"".join(out) or b"{}")
        except ValueError:
            return out
        with _counts_lock:
            for table, units in _read_units(op, body, response):
                u = _units.setdefault(table, _new_units())
                u["reads"] = u.get("reads", 0) + units
        return out
    backend = _backend(environ)
    before = [_current(backend, t, k) for t, _, k, _ in writes]
    status = {}

    def capture(s, headers, exc_info=None):
        status["code"] = s
        return start_response(s, headers, exc_info)

    out = list(app(environ, capture))
    ok = status.get("code", "").startswith("200")
    failed_condition = b"ConditionalCheckFailed" in b"".join(out) or b"TransactionCanceled" in b"".join(out)
    with _counts_lock:
        for (table, kind, key_or_item, factor), (t, keys, old) in zip(writes, before):
            if t is None:
                continue
            u = _units.setdefault(table, _new_units())
            if not ok:
                if failed_condition:
                    u["failed_conditions"] += 1
                    u["table"] += factor * _kb(item_size(old))
                continue
            _, _, new = _current(backend, table, keys)
            u["writes"] += 1
            u["table"] += factor * _kb(max(item_size(old), item_size(new)))
            u["max_item_bytes"] = max(u["max_item_bytes"], item_size(new))
            table_keys = [k for k in (t.hash_key_attr, t.range_key_attr) if k]
            for index in t.global_indexes:
                n = index_units(index, old, new, table_keys)
                if n:
                    u["indexes"][index.name] = u["indexes"].get(index.name, 0) + factor * n
    return out


def self_test():
    """The billing rules above on small cases worked out by hand from the same pages."""
    from types import SimpleNamespace

    S = lambda v: {"S": v}  # noqa: E731
    assert item_size({"pk": S("abc")}) == 5, "name bytes + UTF-8 bytes"
    assert item_size({"n": {"N": "12345"}}) == 1 + 4, "ceil(5 digits / 2) + 1"
    assert item_size({"n": {"N": "-0.0012300"}}) == 1 + 3, "leading and trailing zeroes trimmed"
    assert item_size({"b": {"B": base64.b64encode(bytes(32)).decode()}}) == 1 + 32
    assert item_size({"m": {"M": {"a": S("x")}}}) == 1 + 3 + 1 + 1 + 1, "map: 3 + per element 1 + name + value"
    assert item_size({"l": {"L": [S("x"), {"BOOL": True}]}}) == 1 + 3 + 2 + 2, "list: 3 + per element 1 + value"
    assert (_kb(1), _kb(1024), _kb(1025)) == (1, 1, 2)
    keys_only = SimpleNamespace(schema=[{"AttributeName": "g"}], projection={"ProjectionType": "KEYS_ONLY"})
    every = SimpleNamespace(schema=[{"AttributeName": "g"}], projection={"ProjectionType": "ALL"})
    base = {"pk": S("p"), "x": S("1")}
    with_key = dict(base, g=S("k1"))
    assert index_units(keys_only, base, dict(base, x=S("2")), ["pk"]) == 0, "in the index neither before nor after"
    assert index_units(keys_only, base, with_key, ["pk"]) == 1, "put into the index"
    assert index_units(keys_only, with_key, base, ["pk"]) == 1, "deleted from the index"
    assert index_units(keys_only, with_key, dict(with_key, g=S("k2")), ["pk"]) == 2, "key moved: delete + put"
    assert index_units(keys_only, with_key, dict(with_key, x=S("2")), ["pk"]) == 0, "no projected attribute changed"
    assert index_units(every, with_key, dict(with_key, x=S("2")), ["pk"]) == 1, "a projected attribute changed"
    big = dict(with_key, x=S("y" * 1000))
    assert index_units(every, base, big, ["pk"]) == 2, "entry size + 100 bytes, per KB"
    print("moto_server.py billing rules: ok")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-H", "--host", default="127.0.0.1")
    ap.add_argument("-p", "--port", type=int, default=5000)
    ap.add_argument("--self-test", action="store_true", help="check the write-unit rules and exit")
    a = ap.parse_args()
    if a.self_test:
        self_test()
        return
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(a.host, a.port, serialize_dynamodb(app), threaded=True, use_reloader=False, use_debugger=False)


if __name__ == "__main__":
    main()
