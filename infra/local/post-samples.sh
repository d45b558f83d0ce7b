#!/usr/bin/env bash
# Posts the sample CRM webhooks in events/webhooks/ to the local bridge (started by up.sh),
# signed with the local secrets and with their times moved to the last hour.
#   post-samples.sh [--url http://127.0.0.1:9000]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
export AWS_ENDPOINT_URL="${AWS_ENDPOINT_URL:-http://127.0.0.1:${MOTO_PORT:-5000}}" AWS_REGION=us-east-1
bash infra/local/build.sh --quiet
target/debug/bridge-local post-samples "$@"
