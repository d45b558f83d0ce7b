#!/usr/bin/env bash
# Runs the bridge's AWS side locally: moto on 127.0.0.1:${MOTO_PORT:-5000} with the table and
# queues created from infra/template.yaml, the functions' environment written to
# .local/bridge.env, and everything stopped again on Ctrl-C.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
port="${MOTO_PORT:-5000}"
stack="${STACK_NAME:-bridge-local}"
mkdir -p .local
bash infra/local/setup.sh
endpoint="$(bash infra/local/moto.sh start)"
trap 'echo; echo "stopping moto"; bash infra/local/moto.sh stop' EXIT INT TERM
export AWS_ENDPOINT_URL="$endpoint" AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
if ! .venv/bin/python infra/local/deploy.py --stack-name "$stack" --env-file .local/bridge.env > /dev/null 2> .local/deploy.err; then
  if grep -q AlreadyExists .local/deploy.err; then
    echo "stack $stack already exists in this moto; reusing it"
  else
    cat .local/deploy.err >&2
    exit 1
  fi
fi
{
  echo "AWS_ENDPOINT_URL=$endpoint"
  echo "AWS_REGION=us-east-1"
} >> .local/bridge.env
echo "local AWS (moto) at $endpoint with stack $stack from infra/template.yaml"
echo "function environment (.local/bridge.env):"
sed 's/^/  /' .local/bridge.env
echo "Ctrl-C stops everything this script started."
while true; do sleep 3600; done
