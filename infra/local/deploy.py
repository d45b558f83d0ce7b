#!/usr/bin/env python3
"""Creates the template's AWS resources in the local emulator, from infra/template.yaml itself.

The SAM transform is expanded offline with aws-sam-translator (moto ignores it), then the
resources an emulator can host (tables, queues, buckets) are created as a CloudFormation stack.
The functions are not created there: locally they run natively (see tests/devstack/README.md).
Prints the stack outputs as environment variables (TABLE_NAME=..., META_QUEUE_URL=...).

With --plan PATH it also writes what the local runtime needs to stand in for Lambda, from the
same expanded template: each function's binary, resolved environment, timeout and memory; each
SQS event source mapping (queue, BatchSize, MaximumBatchingWindowInSeconds, response types);
each schedule; each function URL; and each queue's redrive target (for the console redrive).

Usage: deploy.py [--stack-name NAME] [--param Key=Value ...] [--env-file PATH] [--plan PATH]
                 [--reuse] [--delete]
"""

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import boto3
from samcli.yamlhelper import yaml_parse
from samtranslator.translator.transform import transform

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "infra" / "template.yaml"

# Resource types the local emulator hosts. Everything else (functions, roles, event source
# mappings, schedules) is provided natively by the local runtime.
LOCAL_TYPES = {
    "AWS::DynamoDB::Table",
    "AWS::SQS::Queue",
    "AWS::SQS::QueuePolicy",
    "AWS::S3::Bucket",
    "AWS::S3::BucketPolicy",
}

# Stack outputs (CloudFormation only allows alphanumeric names) to the environment variables
# the functions read.
OUTPUT_ENV = {
    "TableName": "TABLE_NAME",
    "MetaQueueUrl": "META_QUEUE_URL",
    "MetaDlqUrl": "META_DLQ_URL",
    "GoogleQueueUrl": "GOOGLE_QUEUE_URL",
    "GoogleDlqUrl": "GOOGLE_DLQ_URL",
    "ReportsBucketName": "REPORTS_BUCKET",
}


class _NoManagedPolicies:
    """The translator asks IAM for managed policy ARNs; offline, build them from their names."""

    def load(self):
        return _AnyPolicy()


class _AnyPolicy(dict):
    def __contains__(self, name):
        return True

    def __getitem__(self, name):
        return f"arn:aws:iam::aws:policy/service-role/{name}"

    def get(self, name, default=None):
        return self[name]


def expand(template_path=TEMPLATE):
    """The SAM template as plain CloudFormation."""
    sam = yaml_parse(Path(template_path).read_text())
    for res in sam.get("Resources", {}).values():
        if res.get("Type") == "AWS::Serverless::Function":
            # The translator wants packaged code; the local runtime runs the binaries natively.
            res["Properties"]["CodeUri"] = "s3://local-artifacts/bootstrap.zip"
    # The translator reads the region from boto3's default session.
    os.environ.setdefault("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION", "us-east-1"))
    return transform(sam, {}, _NoManagedPolicies())


def refs(node):
    """Logical ids a template fragment refers to."""
    found = set()
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "Ref" and isinstance(v, str):
                found.add(v)
            elif k == "Fn::GetAtt":
                found.add(v[0] if isinstance(v, list) else v.split(".")[0])
            elif k == "Fn::Sub":
                text = v[0] if isinstance(v, list) else v
                found.update(m.split(".")[0] for m in re.findall(r"\$\{([^}!]+)\}", text))
                if isinstance(v, list):
                    found |= refs(v[1])
            else:
                found |= refs(v)
    elif isinstance(node, list):
        for x in node:
            found |= refs(x)
    return found


def local_template(cfn):
    """Only the resources the emulator hosts, and the outputs that refer to nothing else."""
    resources = {k: v for k, v in cfn["Resources"].items() if v["Type"] in LOCAL_TYPES}
    params = set(cfn.get("Parameters", {}))
    known = set(resources) | params | {"AWS::StackName", "AWS::Region", "AWS::AccountId", "AWS::Partition", "AWS::URLSuffix"}
    outputs = {k: v for k, v in cfn.get("Outputs", {}).items() if refs(v) <= known}
    out = dict(cfn)
    out["Resources"] = resources
    out["Outputs"] = outputs
    # The template's conditions read parameters only, so they are kept as they are (the table
    # uses one for the legacy index).
    return out


def resolve_conditions(cfn, params):
    """Replaces every Fn::If with its branch and drops AWS::NoValue, evaluating the template's
    conditions (they read parameters only) against `params` and the defaults: moto's
    CloudFormation leaves a None where a conditional list entry should vanish."""
    values = {k: str(v.get("Default", "")) for k, v in cfn.get("Parameters", {}).items()}
    values.update(params)
    conds = cfn.get("Conditions", {})

    def cond(node):
        if isinstance(node, dict) and len(node) == 1:
            (k, v), = node.items()
            if k == "Condition":
                return cond(conds[v])
            if k == "Fn::Equals":
                a, b = (values.get(x["Ref"], "") if isinstance(x, dict) and "Ref" in x else str(x) for x in v)
                return a == b
            if k == "Fn::Not":
                return not cond(v[0])
            if k == "Fn::And":
                return all(cond(x) for x in v)
            if k == "Fn::Or":
                return any(cond(x) for x in v)
        raise ValueError(f"unsupported condition {node}")

    no_value = object()

    def walk(node):
        if isinstance(node, dict):
            if len(node) == 1 and "Fn::If" in node:
                name, yes, no = node["Fn::If"]
                return walk(yes if cond(conds[name]) else no)
            if node == {"Ref": "AWS::NoValue"}:
                return no_value
            out = {}
            for k, v in node.items():
                w = walk(v)
                if w is not no_value:
                    out[k] = w
            return out
        if isinstance(node, list):
            return [w for w in (walk(x) for x in node) if w is not no_value]
        return node

    out = dict(cfn)
    out["Resources"] = walk(cfn["Resources"])
    out["Outputs"] = walk(cfn.get("Outputs", {}))
    return out


def client(service):
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:5000")
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
    )


def deploy(stack, params):
    cfn = client("cloudformation")
    body = json.dumps(resolve_conditions(local_template(expand()), params))
    cfn.create_stack(
        StackName=stack,
        TemplateBody=body,
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
    )
    deadline = time.time() + 60
    while True:
        st = cfn.describe_stacks(StackName=stack)["Stacks"][0]
        status = st["StackStatus"]
        if status == "CREATE_COMPLETE":
            break
        if status.endswith("FAILED") or status.startswith("ROLLBACK") or time.time() > deadline:
            events = cfn.describe_stack_events(StackName=stack)["StackEvents"]
            reasons = [f"{e['LogicalResourceId']}: {e.get('ResourceStatusReason')}" for e in events if "FAILED" in e["ResourceStatus"]]
            sys.exit(f"stack {stack} did not create ({status}): {reasons}")
        time.sleep(0.2)
    apply_unsupported(cfn, stack)
    env = {}
    for o in st.get("Outputs", []):
        name = OUTPUT_ENV.get(o["OutputKey"])
        if name:
            env[name] = o["OutputValue"]
    return env


def apply_unsupported(cfn, stack):
    """Table settings moto's CloudFormation ignores, applied through the API from the template."""
    template = resolve_conditions(local_template(expand()), {})
    ddb = client("dynamodb")
    for res in cfn.describe_stack_resources(StackName=stack)["StackResources"]:
        if res.get("ResourceType") != "AWS::DynamoDB::Table":
            continue
        props = template["Resources"][res["LogicalResourceId"]]["Properties"]
        table = res["PhysicalResourceId"]
        ttl = props.get("TimeToLiveSpecification")
        if ttl and ttl.get("Enabled"):
            ddb.update_time_to_live(TableName=table, TimeToLiveSpecification=ttl)
        pitr = props.get("PointInTimeRecoverySpecification")
        if pitr:
            ddb.update_continuous_backups(TableName=table, PointInTimeRecoverySpecification=pitr)


class Resolver:
    """Evaluates the intrinsic functions the template uses, against the stack in the emulator."""

    def __init__(self, cfn_template, stack, params):
        self.t = cfn_template
        self.stack = stack
        self.region = os.environ.get("AWS_REGION", "us-east-1")
        self.account = "123456789012"
        self.params = {k: str(v.get("Default", "")) for k, v in cfn_template.get("Parameters", {}).items()}
        self.params.update(params)
        cfn = client("cloudformation")
        # moto lists a bucket policy without its ids: only resources with both are kept.
        self.physical = {
            r["LogicalResourceId"]: r["PhysicalResourceId"]
            for r in cfn.describe_stack_resources(StackName=stack)["StackResources"]
            if "LogicalResourceId" in r and "PhysicalResourceId" in r
        }
        self.sqs = client("sqs")
        self.ddb = client("dynamodb")

    def queue_url(self, logical):
        pid = self.physical[logical]
        if pid.startswith("http"):
            return pid
        return self.sqs.get_queue_url(QueueName=pid.rsplit(":", 1)[-1])["QueueUrl"]

    def ref(self, name):
        pseudo = {"AWS::Region": self.region, "AWS::AccountId": self.account, "AWS::Partition": "aws",
                  "AWS::StackName": self.stack, "AWS::URLSuffix": "amazonaws.com"}
        if name in pseudo:
            return pseudo[name]
        if name in self.params:
            return self.params[name]
        kind = self.t["Resources"].get(name, {}).get("Type")
        if kind == "AWS::SQS::Queue":
            return self.queue_url(name)
        if kind == "AWS::Lambda::Function":
            return name
        if name in self.physical:
            return self.physical[name]
        raise KeyError(f"cannot resolve Ref {name}")

    def getatt(self, name, attr):
        kind = self.t["Resources"][name]["Type"]
        if kind == "AWS::SQS::Queue":
            attrs = self.sqs.get_queue_attributes(QueueUrl=self.queue_url(name), AttributeNames=["QueueArn"])
            arn = attrs["Attributes"]["QueueArn"]
            return {"Arn": arn, "QueueName": arn.rsplit(":", 1)[-1], "QueueUrl": self.queue_url(name)}[attr]
        if kind == "AWS::DynamoDB::Table" and attr == "Arn":
            return self.ddb.describe_table(TableName=self.physical[name])["Table"]["TableArn"]
        if kind == "AWS::Lambda::Function" and attr == "Arn":
            return f"arn:aws:lambda:{self.region}:{self.account}:function:{name}"
        raise KeyError(f"cannot resolve GetAtt {name}.{attr}")

    def eval(self, node):
        if isinstance(node, dict) and len(node) == 1:
            (k, v), = node.items()
            if k == "Ref":
                return self.ref(v)
            if k == "Fn::FindInMap":
                name, top, second = (self.eval(x) for x in v)
                return self.t["Mappings"][name][str(top)][second]
            if k == "Fn::GetAtt":
                name, attr = v if isinstance(v, list) else v.split(".", 1)
                return self.getatt(name, attr)
            if k == "Fn::Sub":
                text, extra = (v[0], v[1]) if isinstance(v, list) else (v, {})
                def sub(m):
                    key = m.group(1)
                    if key in extra:
                        return str(self.eval(extra[key]))
                    if "." in key:
                        return str(self.getatt(*key.split(".", 1)))
                    return str(self.ref(key))
                return re.sub(r"\$\{([^}!]+)\}", sub, text)
        if isinstance(node, dict):
            return {k: self.eval(v) for k, v in node.items()}
        if isinstance(node, list):
            return [self.eval(x) for x in node]
        return node


def plan(stack, params):
    """What the local runtime runs, resolved from the expanded template and the stack."""
    cfn = expand()
    r = Resolver(cfn, stack, params)
    res = cfn["Resources"]
    out = {"stack": stack, "functions": {}, "sqs": [], "schedules": [], "urls": [], "queues": {}}
    for name, v in res.items():
        p = v.get("Properties", {})
        if v["Type"] == "AWS::Lambda::Function":
            env = r.eval(p.get("Environment", {}).get("Variables", {}))
            out["functions"][name] = {
                "binary": v.get("Metadata", {}).get("BuildProperties", {}).get("Binary", name),
                "env": {k: str(x) for k, x in env.items()},
                "timeout": int(r.eval(p.get("Timeout", 3))),
                "memory": int(r.eval(p.get("MemorySize", 128))),
            }
        elif v["Type"] == "AWS::Lambda::EventSourceMapping":
            source = p["EventSourceArn"]["Fn::GetAtt"][0]
            out["sqs"].append({
                "function": p["FunctionName"]["Ref"],
                "queue": source,
                "queue_url": r.queue_url(source),
                "queue_arn": r.getatt(source, "Arn"),
                "batch_size": int(r.eval(p.get("BatchSize", 10))),
                "window_secs": int(r.eval(p.get("MaximumBatchingWindowInSeconds", 0))),
                "report_batch_item_failures": "ReportBatchItemFailures" in p.get("FunctionResponseTypes", []),
            })
        elif v["Type"] == "AWS::Events::Rule":
            for t in p.get("Targets", []):
                sched = {
                    "function": t["Arn"]["Fn::GetAtt"][0],
                    "expression": r.eval(p["ScheduleExpression"]),
                }
                if "Input" in t:
                    sched["input"] = json.loads(r.eval(t["Input"]))
                out["schedules"].append(sched)
        elif v["Type"] == "AWS::Lambda::Url":
            out["urls"].append({"function": p["TargetFunctionArn"]["Ref"], "auth": p.get("AuthType")})
        elif v["Type"] == "AWS::SQS::Queue":
            redrive = p.get("RedrivePolicy")
            q = {"url": r.queue_url(name), "arn": r.getatt(name, "Arn")}
            if redrive:
                dlq = redrive["deadLetterTargetArn"]["Fn::GetAtt"][0]
                q["dlq"] = dlq
                q["dlq_url"] = r.queue_url(dlq)
                q["max_receive_count"] = int(r.eval(redrive["maxReceiveCount"]))
            out["queues"][name] = q
    return out


def delete(stack):
    cfn = client("cloudformation")
    cfn.delete_stack(StackName=stack)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stack-name", default="bridge-local")
    ap.add_argument("--param", action="append", default=[], help="template parameter Key=Value")
    ap.add_argument("--env-file", help="also write the variables to this file")
    ap.add_argument("--delete", action="store_true", help="delete the stack instead")
    ap.add_argument("--plan", help="write the local runtime's plan (functions, mappings, schedules) here")
    ap.add_argument("--reuse", action="store_true", help="use the stack if it already exists")
    ap.add_argument("--print-template", action="store_true", help="print the expanded local template and exit")
    a = ap.parse_args()
    if a.print_template:
        print(json.dumps(local_template(expand()), indent=2))
        return
    if a.delete:
        delete(a.stack_name)
        return
    params = dict(p.split("=", 1) for p in a.param)
    try:
        env = deploy(a.stack_name, params)
    except client("cloudformation").exceptions.AlreadyExistsException:
        if not a.reuse:
            raise
        st = client("cloudformation").describe_stacks(StackName=a.stack_name)["Stacks"][0]
        env = {OUTPUT_ENV[o["OutputKey"]]: o["OutputValue"] for o in st.get("Outputs", []) if o["OutputKey"] in OUTPUT_ENV}
    if a.plan:
        Path(a.plan).write_text(json.dumps(plan(a.stack_name, params), indent=2))
    lines = "".join(f"{k}={v}\n" for k, v in sorted(env.items()))
    if a.env_file:
        Path(a.env_file).write_text(lines)
    sys.stdout.write(lines)


if __name__ == "__main__":
    main()
