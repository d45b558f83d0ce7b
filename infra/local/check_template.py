#!/usr/bin/env python3
"""Checks infra/template.yaml for the rules a deployment must keep, beyond what cfn-lint knows:

- each delivery queue's DLQ keeps messages longer than the queue (AWS's guidance), and the
  refund wait deadline fits in the queue's retention;
- queue visibility is at least six times the senders' timeout and the claim lease at least the
  timeout (both come from the SenderTimeouts mapping);
- least privilege: no wildcard actions or resources, SSM access scoped to its parameters;
- each function may call every SSM action its code calls (read from functions/<name>/src:
  IAM is not enforced by the emulator, so a missing action shows only in a deployment);
- every function logs to a group with a retention; one log level knob;
- the event table is protected from deletion; the reports bucket refuses plain HTTP;
- the public ingest function has reserved concurrency, each SQS mapping a maximum concurrency;
- the alarms on reconcile errors, enqueue failures, ingest unavailability and refused
  signatures exist, the last two per source (a Metrics Insights query grouped by source).

Usage: check_template.py [--self-test]   (exit 1 and one line per broken rule)
"""

import copy
import sys
from pathlib import Path

from samcli.yamlhelper import yaml_parse

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "infra" / "template.yaml"

# The bridge_aws::clients helpers a function's code may call, and the SSM action each makes.
SSM_HELPERS = {
    "clients::parameter(": "ssm:GetParameter",
    "clients::parameters(": "ssm:GetParameters",
    "clients::deferred_parameters(": "ssm:GetParameters",
    "clients::parameters_by_path(": "ssm:GetParametersByPath",
}
FUNCTION_DIRS = {
    "IngestFunction": "ingest",
    "MetaSenderFunction": "meta-sender",
    "GoogleSenderFunction": "google-sender",
    "ReconcileFunction": "reconcile",
}


def ssm_calls(function):
    """The SSM actions a function's own code calls, through the helpers above."""
    calls = set()
    src_dir = ROOT / "functions" / FUNCTION_DIRS[function] / "src"
    if not src_dir.is_dir():
        raise SystemExit(f"check_template.py: {src_dir} does not exist (FUNCTION_DIRS is stale)")
    for src in src_dir.rglob("*.rs"):
        text = src.read_text()
        calls |= {action for helper, action in SSM_HELPERS.items() if helper in text}
    return calls


def props(t, name):
    return t["Resources"][name].get("Properties", {})


def ref_name(node):
    return node.get("Ref") if isinstance(node, dict) else None


def check(t):
    problems = []
    res = t["Resources"]
    params = t.get("Parameters", {})
    mapping = t.get("Mappings", {}).get("SenderTimeouts", {})

    # Queues and their dead-letter queues.
    for name, r in res.items():
        if r.get("Type") != "AWS::SQS::Queue" or "RedrivePolicy" not in r.get("Properties", {}):
            continue
        p = r["Properties"]
        target = p["RedrivePolicy"]["deadLetterTargetArn"]["Fn::GetAtt"][0]
        q_keep = int(p.get("MessageRetentionPeriod", 345600))
        dlq_keep = int(props(t, target).get("MessageRetentionPeriod", 345600))
        if dlq_keep <= q_keep:
            problems.append(f"{target}: retention {dlq_keep}s must exceed {name}'s {q_keep}s")
        deadline = int(params.get("WaitDeadlineSeconds", {}).get("MaxValue", 0))
        if deadline >= q_keep:
            problems.append(f"WaitDeadlineSeconds may reach {deadline}s, past {name}'s retention {q_keep}s")
        vis = p.get("VisibilityTimeout")
        if not (isinstance(vis, dict) and vis.get("Fn::FindInMap", [None])[0] == "SenderTimeouts"):
            problems.append(f"{name}: VisibilityTimeout must come from the SenderTimeouts mapping")
    allowed = params.get("SenderTimeoutSeconds", {}).get("AllowedValues", [])
    for timeout in allowed:
        entry = mapping.get(str(timeout))
        if entry is None:
            problems.append(f"SenderTimeouts has no entry for SenderTimeoutSeconds {timeout}")
            continue
        if int(entry["Visibility"]) < 6 * int(timeout):
            problems.append(f"SenderTimeouts.{timeout}: visibility {entry['Visibility']} is under six times the timeout")
        if int(entry["Lease"]) < int(timeout):
            problems.append(f"SenderTimeouts.{timeout}: lease {entry['Lease']} is under the timeout")
    env = t.get("Globals", {}).get("Function", {}).get("Environment", {}).get("Variables", {})
    lease = env.get("LEASE_SECS")
    if not (isinstance(lease, dict) and lease.get("Fn::FindInMap", [None])[0] == "SenderTimeouts"):
        problems.append("Globals LEASE_SECS must come from the SenderTimeouts mapping")
    if "RUST_LOG" in env:
        problems.append("Globals set RUST_LOG as well as ApplicationLogLevel: one log level knob only")
    logging = t.get("Globals", {}).get("Function", {}).get("LoggingConfig", {})
    if ref_name(logging.get("ApplicationLogLevel")) != "LogLevel":
        problems.append("Globals LoggingConfig.ApplicationLogLevel must be the LogLevel parameter")

    # Functions.
    for name, r in res.items():
        if r.get("Type") != "AWS::Serverless::Function":
            continue
        p = r["Properties"]
        group = ref_name(p.get("LoggingConfig", {}).get("LogGroup"))
        if group is None or "RetentionInDays" not in props(t, group):
            problems.append(f"{name}: logs to no log group with a retention")
        for policy in p.get("Policies", []):
            for st in policy.get("Statement", []) if isinstance(policy, dict) else []:
                actions = st.get("Action", [])
                actions = actions if isinstance(actions, list) else [actions]
                for a in actions:
                    if "*" in a:
                        problems.append(f"{name}: wildcard action {a}")
                resources = st.get("Resource", [])
                resources = resources if isinstance(resources, list) else [resources]
                for rsc in resources:
                    if rsc == "*":
                        problems.append(f"{name}: wildcard resource for {actions}")
                    text = str(rsc)
                    if any(a.startswith("ssm:") for a in actions) and "parameter" in text:
                        if text.rstrip("'}]\"").endswith("*") and not text.rstrip("'}]\"").endswith("/*"):
                            problems.append(f"{name}: SSM access {text} is not scoped to <path>/*")
                    if "index/*" in text:
                        problems.append(f"{name}: every index of the table, not the ones it reads")
        for ev in p.get("Events", {}).values():
            if ev.get("Type") == "SQS" and "MaximumConcurrency" not in ev["Properties"].get("ScalingConfig", {}):
                problems.append(f"{name}: SQS mapping without ScalingConfig.MaximumConcurrency")
    for function in FUNCTION_DIRS:
        allowed = set()
        for policy in props(t, function).get("Policies", []):
            for st in policy.get("Statement", []) if isinstance(policy, dict) else []:
                if st.get("Effect") != "Allow":
                    continue
                actions = st.get("Action", [])
                allowed |= set(actions if isinstance(actions, list) else [actions])
        for action in sorted(ssm_calls(function) - allowed):
            problems.append(f"{function}: its code calls {action}, which its policy does not allow")
    if "ReservedConcurrentExecutions" not in props(t, "IngestFunction"):
        problems.append("IngestFunction: no ReservedConcurrentExecutions")

    # Data.
    if props(t, "EventsTable").get("DeletionProtectionEnabled") is not True:
        problems.append("EventsTable: DeletionProtectionEnabled is not true")
    tls = False
    for r in res.values():
        if r.get("Type") == "AWS::S3::BucketPolicy" and ref_name(r["Properties"].get("Bucket")) == "ReportsBucket":
            for st in r["Properties"]["PolicyDocument"]["Statement"]:
                if st.get("Effect") == "Deny" and st.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false":
                    tls = True
    if not tls:
        problems.append("ReportsBucket: no policy denying requests without TLS")

    # Alarms.
    for alarm in ["ReconcileErrorAlarm", "EnqueueFailureAlarm", "IngestUnavailableAlarm", "IngestUnauthorizedAlarm"]:
        if res.get(alarm, {}).get("Type") != "AWS::CloudWatch::Alarm":
            problems.append(f"{alarm}: missing")
    for alarm in ["IngestUnavailableAlarm", "IngestUnauthorizedAlarm"]:
        queries = [m.get("Expression", "") for m in res.get(alarm, {}).get("Properties", {}).get("Metrics") or []]
        if not any("GROUP BY source" in q for q in queries):
            problems.append(f"{alarm}: not per source (no Metrics Insights query grouped by source)")
    return problems


def statement(t, function, prefix):
    for policy in props(t, function).get("Policies", []):
        for st in policy.get("Statement", []) if isinstance(policy, dict) else []:
            actions = st.get("Action", [])
            actions = actions if isinstance(actions, list) else [actions]
            if any(a.startswith(prefix) for a in actions):
                return st
    raise KeyError(f"{function} has no {prefix} statement")


def ssm_statement(t, function):
    return statement(t, function, "ssm:")


def dynamodb_statement(t, function):
    return statement(t, function, "dynamodb:")


def self_test(t):
    """Each rule must catch the breakage it is about."""
    cases = {
        "DLQ retention": lambda x: props(x, "MetaDeadLetterQueue").update(MessageRetentionPeriod=60),
        "visibility": lambda x: x["Mappings"]["SenderTimeouts"]["60"].update(Visibility=120),
        "lease": lambda x: x["Mappings"]["SenderTimeouts"]["60"].update(Lease=30),
        "wildcard": lambda x: props(x, "MetaSenderFunction")["Policies"][0]["Statement"][0].update(Action=["dynamodb:*"]),
        "log group": lambda x: props(x, "IngestFunction").pop("LoggingConfig"),
        "deletion": lambda x: props(x, "EventsTable").pop("DeletionProtectionEnabled"),
        "tls": lambda x: x["Resources"].pop("ReportsBucketPolicy"),
        "reserved": lambda x: props(x, "IngestFunction").pop("ReservedConcurrentExecutions"),
        "alarm": lambda x: x["Resources"].pop("ReconcileErrorAlarm"),
        "two knobs": lambda x: x["Globals"]["Function"]["Environment"]["Variables"].update(RUST_LOG="debug"),
        "enqueue alarm": lambda x: x["Resources"].pop("EnqueueFailureAlarm"),
        "per-source alarm": lambda x: props(x, "IngestUnauthorizedAlarm").update(
            Metrics=[], Namespace="ConversionBridge", MetricName="unauthorized", Statistic="Sum", Period=300
        ),
        "maximum concurrency": lambda x: props(x, "GoogleSenderFunction")["Events"]["Deliveries"]["Properties"].pop("ScalingConfig"),
        "SSM scope": lambda x: ssm_statement(x, "IngestFunction").update(
            Resource={"Fn::Sub": "arn:aws:ssm:${AWS::Region}:${AWS::AccountId}:parameter${WebhookSecretsParameterPath}*"}
        ),
        "SSM action": lambda x: ssm_statement(x, "GoogleSenderFunction").update(Action=["ssm:GetParameter"]),
        "SSM action denied": lambda x: ssm_statement(x, "MetaSenderFunction").update(Effect="Deny"),
        "index wildcard": lambda x: dynamodb_statement(x, "ReconcileFunction").update(
            Resource=[{"Fn::Sub": "${EventsTable.Arn}/index/*"}]
        ),
    }
    failed = []
    for name, breakage in cases.items():
        broken = copy.deepcopy(t)
        breakage(broken)
        if not check(broken):
            failed.append(name)
    return failed


def main():
    t = yaml_parse(TEMPLATE.read_text())
    problems = check(t)
    for p in problems:
        print(f"template: {p}")
    if "--self-test" in sys.argv:
        missed = self_test(t)
        for m in missed:
            print(f"self-test: the check did not catch a broken {m}")
        problems += missed
    if problems:
        sys.exit(1)
    print("template checks passed")


if __name__ == "__main__":
    main()
