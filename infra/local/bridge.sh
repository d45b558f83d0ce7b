#!/usr/bin/env bash
# Operator commands against the local bridge (started by up.sh):
#   bridge.sh show <event_id>        the stored event: record, consent decisions, delivery log
#   bridge.sh redrive <meta|google>  the console's DLQ redrive: DLQ messages back to the queue
#   bridge.sh status                 queue and DLQ depths
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
export AWS_ENDPOINT_URL="${AWS_ENDPOINT_URL:-http://127.0.0.1:${MOTO_PORT:-5000}}" AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
bash infra/local/build.sh --quiet
target/debug/bridge-local "$@"
