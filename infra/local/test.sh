#!/usr/bin/env bash
# Runs every test: unit tests, and integration tests against moto (started here if needed,
# and stopped again if this script started it). Extra arguments go to one `cargo test`.
#
# Without arguments the suite runs in four lanes side by side: the chaos test (about 5 min,
# mostly waiting on its fakes' timeouts and Lambda's retries) against a moto of its own, the
# model test (about 3.5 min, in memory, mostly waiting on simulated timeouts), everything else
# against the shared moto, and the fuzz targets (tests/fuzz/run.sh: a nightly build with
# libFuzzer, then 12 s per target; skipped with a notice where nightly is missing), whose
# build, niced, uses the CPU the waiting lanes leave idle. Run one after the other the tests alone
# took 10 minutes. Each lane's output is printed as the lane ends.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
port="${MOTO_PORT:-5000}"
bash infra/local/setup.sh

listening() {
  python3 -c "import socket,sys; s=socket.socket(); s.settimeout(0.3); sys.exit(s.connect_ex(('127.0.0.1', $1)))" 2>/dev/null
}
started=()
start_moto() {
  if ! listening "$1"; then
    MOTO_PORT="$1" bash infra/local/moto.sh start >/dev/null
    started+=("$1")
  fi
}
cleanup() {
  for p in "${started[@]}"; do MOTO_PORT="$p" bash infra/local/moto.sh stop; done
}
trap cleanup EXIT
start_moto "$port"
export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
export AWS_REGION="${AWS_REGION:-us-east-1}" AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
# The end-to-end and chaos tests run the functions' binaries from the same dev build as the
# tests (infra/local/build.sh), so nothing compiles twice.
bash infra/local/build.sh
export BRIDGE_BIN_DIR="$root/target/debug"
# Tests that need the emulator are #[ignore]d with that reason, so a bare `cargo test
# --workspace` passes and names them; here, with the emulator running, they all run.
if [[ $# -gt 0 ]]; then
  if [[ " $* " == *" --ignored "* || " $* " == *" --include-ignored "* ]]; then
    cargo test --workspace "$@"
  elif [[ " $* " == *" -- "* ]]; then
    cargo test --workspace "$@" --include-ignored
  else
    cargo test --workspace "$@" -- --include-ignored
  fi
  exit
fi

slow=(local_chaos model)
# Every other integration test target of the workspace, read from cargo's metadata so a new one
# is not missed. Each lane selects its targets with --workspace, so every lane resolves the
# same features as the build above and nothing compiles again.
others=()
while read -r name; do
  [[ " ${slow[*]} " == *" $name "* ]] || others+=(--test "$name")
done < <(cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
for p in json.load(sys.stdin)["packages"]:
    for t in p["targets"]:
        if "test" in t["kind"]:
            print(t["name"])
')
chaos_port=$((port + 1))
start_moto "$chaos_port"
logs="$root/.local/test-lanes"
rm -rf "$logs"; mkdir -p "$logs"
lane() {
  local name="$1"; shift
  local t0; t0=$(date +%s)
  if "$@" > "$logs/$name.log" 2>&1; then echo 0 > "$logs/$name.rc"; else echo $? > "$logs/$name.rc"; fi
  echo $(( $(date +%s) - t0 )) > "$logs/$name.secs"
}
lane chaos env AWS_ENDPOINT_URL="http://127.0.0.1:$chaos_port" \
  cargo test --workspace --test local_chaos -- --include-ignored &
lane model cargo test --workspace --test model -- --include-ignored &
lane rest bash -c 'cargo test --workspace --lib --bins "$@" -- --include-ignored && cargo test --workspace --doc' _ "${others[@]}" &
# Niced: the chaos test's emulator is CPU-bound, and the fuzz build must only take what is idle.
lane fuzz nice -n 19 bash tests/fuzz/run.sh "${FUZZ_SECONDS:-12}" &
wait
failed=0
for name in rest model chaos fuzz; do
  echo "==== lane $name: $(cat "$logs/$name.secs") s, exit $(cat "$logs/$name.rc")"
  # The functions' JSON log lines (EMF metrics) are kept in the lane's log file, not echoed.
  grep -v '^{"_aws"' "$logs/$name.log" || true
  [[ "$(cat "$logs/$name.rc")" == 0 ]] || failed=1
done
if [[ "$failed" != 0 ]]; then
  echo "some lane failed; full logs in $logs" >&2
  exit 1
fi
