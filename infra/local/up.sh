#!/usr/bin/env bash
# Runs the whole bridge on this machine: moto with the resources of infra/template.yaml, the
# four functions under a local Lambda runtime, the SQS event source mappings
# and the reconcile schedule as the template declares them, the function URL at
# http://127.0.0.1:${BRIDGE_PORT:-9000}, and (unless BRIDGE_REAL_DESTINATIONS=1) the strict
# Meta, Google and HubSpot fakes. Ctrl-C stops everything it started.
#   up.sh [--port N] [--instances N] [--mapping FILE] [--param TemplateParam=Value ...]
#   (--mapping: the mapping contract every function loads, as MAPPING_PATH, absolute or relative
#   to the repository root; default the bundled infra/mapping.toml)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
export MOTO_PORT="${MOTO_PORT:-5000}"
mkdir -p .local
bash infra/local/setup.sh
echo "building the functions, the local runtime and the tests in one build (the first run takes about 10 minutes on 2 cores; later runs seconds)"
bash infra/local/build.sh --quiet
endpoint="$(bash infra/local/moto.sh start)"
trap 'bash infra/local/moto.sh stop' EXIT
export AWS_ENDPOINT_URL="$endpoint" AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
target/debug/bridge-local up --bin-dir target/debug "$@"
