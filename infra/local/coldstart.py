#!/usr/bin/env python3
"""Measures cold start: process start to first response, for the functions' binaries (target/local by default).

Serves a minimal Lambda Runtime API (the protocol AWS speaks to provided.al2023 functions),
starts a binary against it with the function's environment (table, queues, secrets in SSM of
a stack created from infra/template.yaml in moto), hands it one event, and times from spawn to
the response. Repeats and prints the median and the worst.

Usage: coldstart.py [--runs 15] [--target-dir target/local]
Needs: moto running (infra/local/moto.sh start) and `bash infra/local/build.sh`.
"""

import argparse
import hashlib
import hmac
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deploy  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


class Runtime:
    """One invocation: the event to hand out, and when (and what) the function answered."""

    def __init__(self, event):
        self.event = event
        self.handed = False
        self.done = threading.Event()
        self.result = None

    def handler(self):
        rt = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                if not self.path.endswith("/runtime/invocation/next"):
                    self.send_error(404)
                    return
                if rt.handed:
                    # The second poll only ends when the process is killed after its answer.
                    rt.done.wait(30)
                    return
                rt.handed = True
                body = json.dumps(rt.event).encode()
                self.send_response(200)
                self.send_header("Lambda-Runtime-Aws-Request-Id", "req-1")
                self.send_header("Lambda-Runtime-Deadline-Ms", str(int(time.time() * 1000) + 30000))
                self.send_header("Lambda-Runtime-Invoked-Function-Arn", "arn:aws:lambda:us-east-1:123456789012:function:bench")
                self.send_header("Lambda-Runtime-Trace-Id", "Root=1-00000000-000000000000000000000000")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                payload = self.rfile.read(n)
                rt.result = (time.perf_counter(), self.path, payload)
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()
                rt.done.set()

        return H


def once(binary, env, event):
    rt = Runtime(event)
    server = ThreadingHTTPServer(("127.0.0.1", 0), rt.handler())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    full_env = dict(os.environ, **env, AWS_LAMBDA_RUNTIME_API=f"127.0.0.1:{server.server_port}")
    t0 = time.perf_counter()
    proc = subprocess.Popen([binary], env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ok = rt.done.wait(30)
    proc.kill()
    _, err = proc.communicate()
    server.shutdown()
    if not ok or "/error" in rt.result[1]:
        sys.exit(f"{binary} failed: {rt.result}\n{err.decode()[-2000:]}")
    return (rt.result[0] - t0) * 1000, rt.result[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--target-dir", default=str(ROOT / "target" / "local"))
    a = ap.parse_args()
    stack = f"coldstart-{os.getpid()}"
    env = deploy.deploy(stack, {})
    ssm = deploy.client("ssm")
    path = f"/{stack}/webhooks"
    for k, v in {"generic": "s3cret", "hubspot-app-secret": "x"}.items():
        ssm.put_parameter(Name=f"{path}/{k}", Value=v, Type="SecureString")
    ssm.put_parameter(Name=f"/{stack}/meta-token", Value="token", Type="SecureString")
    common = dict(
        env,
        AWS_ENDPOINT_URL=os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:5000"),
        AWS_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_LAMBDA_FUNCTION_NAME="bench",
        AWS_LAMBDA_FUNCTION_MEMORY_SIZE="128",
        AWS_LAMBDA_FUNCTION_VERSION="1",
        RUST_LOG="warn",
    )
    body = json.dumps({"event_name": "lead", "occurred_at": "2026-11-27T10:00:00Z", "entity_type": "lead",
                       "entity_id": "L-cold", "identity": {"email": "a@example.com", "phone": "+1 650 555 1234"},
                       "consent": {"status": "granted"}})
    targets = {
        "ingest": ("bridge-ingest", dict(common, WEBHOOK_SECRETS_PARAMETER_PATH=path)),
        "meta sender": ("bridge-meta-sender", dict(common, META_PIXEL_ID="1", META_ACCESS_TOKEN_PARAMETER=f"/{stack}/meta-token")),
    }

    def ingest_event():
        t = str(int(time.time()))
        sig = hmac.new(b"s3cret", f"{t}.{body}".encode(), hashlib.sha256).hexdigest()
        return {
            "version": "2.0", "routeKey": "$default", "rawPath": "/webhooks/generic", "rawQueryString": "",
            "headers": {"content-type": "application/json", "host": "localhost", "x-bridge-signature": f"t={t},v1={sig}"},
            "requestContext": {"accountId": "anonymous", "apiId": "x", "domainName": "localhost", "domainPrefix": "x",
                               "http": {"method": "POST", "path": "/webhooks/generic", "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1", "userAgent": "bench"},
                               "requestId": "r", "routeKey": "$default", "stage": "$default", "time": "27/Nov/2026:14:05:05 +0000", "timeEpoch": 0},
            "body": body, "isBase64Encoded": False,
        }

    sqs_event = {"Records": [{"messageId": "m1", "receiptHandle": "r1", "body": json.dumps({"event_id": "nope", "destination": "meta"}),
                              "attributes": {}, "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
                              "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q", "awsRegion": "us-east-1"}]}
    print(f"cold start, process start to first response ({a.runs} runs each; includes init's SSM reads against moto):")
    for name, (binary, e) in targets.items():
        exe = str(Path(a.target_dir) / binary)
        size = Path(exe).stat().st_size / 1e6
        times = []
        for _ in range(a.runs):
            ev = ingest_event() if name == "ingest" else sqs_event
            ms, _payload = once(exe, e, ev)
            times.append(ms)
        print(f"  {name:12} median {statistics.median(times):6.1f} ms, worst {max(times):6.1f} ms   (binary {size:.1f} MB, {os.uname().machine})")
    deploy.delete(stack)


if __name__ == "__main__":
    main()
