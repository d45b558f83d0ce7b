#!/usr/bin/env bash
# Runs the whole bridge on this machine: moto with the resources of infra/template.yaml, the
# four functions' optimised binaries under a local Lambda runtime, the SQS event source mappings
# and the reconcile schedule as the template declares them, the function URL at
# http://127.0.0.1:${BRIDGE_PORT:-9000}, and (unless BRIDGE_REAL_DESTINATIONS=1) the strict
# Meta, Google and HubSpot fakes. Ctrl-C stops everything it started.
#   up.sh [--port N] [--instances N] [--param TemplateParam=Value ...]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
export MOTO_PORT="${MOTO_PORT:-5000}"
mkdir -p .local
bash infra/local/setup.sh
echo "building the functions and the local runtime (first run takes a few minutes)"
bash infra/local/build.sh --quiet
endpoint="$(bash infra/local/moto.sh start)"
trap 'bash infra/local/moto.sh stop' EXIT
export AWS_ENDPOINT_URL="$endpoint" AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
target/local/bridge-local up --bin-dir target/local "$@"
