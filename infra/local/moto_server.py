#!/usr/bin/env python3
"""Runs moto's server with DynamoDB requests applied one at a time.

moto's server handles requests on concurrent threads and its DynamoDB backend does not lock
an item between checking a condition and writing it, so two conditional UpdateItem calls can
both pass (seen here: two workers winning one claim). DynamoDB guarantees that a conditional
write is atomic; serializing DynamoDB requests reproduces that. Other services (SQS long
polls in particular) stay concurrent.

It also counts requests per operation (GET /_bridge/requests answers the counts as JSON), so
tests can state how many AWS requests each delivered conversion cost.

Usage: moto_server.py [--host 127.0.0.1] [--port 5000]
"""

import argparse
import json
import threading
import time

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple

_dynamodb = threading.Lock()
_counts = {}
_millis = {}
_counts_lock = threading.Lock()


def serialize_dynamodb(app):
    def wrapped(environ, start_response):
        if environ.get("PATH_INFO") == "/_bridge/requests":
            with _counts_lock:
                body = json.dumps(_counts).encode()
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
        with _counts_lock:
            _counts[op] = _counts.get(op, 0) + 1
        if target.startswith("DynamoDB"):
            with _dynamodb:
                # Consume the body inside the lock: the response is computed here.
                t = time.monotonic()
                out = list(app(environ, start_response))
                with _counts_lock:
                    _millis[op] = _millis.get(op, 0) + (time.monotonic() - t) * 1000
                return out
        return app(environ, start_response)

    return wrapped


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-H", "--host", default="127.0.0.1")
    ap.add_argument("-p", "--port", type=int, default=5000)
    a = ap.parse_args()
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(a.host, a.port, serialize_dynamodb(app), threaded=True, use_reloader=False, use_debugger=False)


if __name__ == "__main__":
    main()
