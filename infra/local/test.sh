#!/usr/bin/env bash
# Runs every test: unit tests, and integration tests against moto (started here if needed,
# and stopped again if this script started it). Extra arguments go to `cargo test`.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
port="${MOTO_PORT:-5000}"
bash infra/local/setup.sh
started=""
if ! python3 -c "import socket,sys; s=socket.socket(); s.settimeout(0.3); sys.exit(s.connect_ex(('127.0.0.1', $port)))" 2>/dev/null; then
  bash infra/local/moto.sh start >/dev/null
  started=1
fi
cleanup() { if [[ -n "$started" ]]; then bash infra/local/moto.sh stop; fi; }
trap cleanup EXIT
export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
export AWS_REGION="${AWS_REGION:-us-east-1}" AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
# The end-to-end and chaos tests run the functions' binaries from the same dev build as the
# tests (infra/local/build.sh), so nothing compiles twice.
bash infra/local/build.sh
export BRIDGE_BIN_DIR="$root/target/debug"
cargo test --workspace "$@"
