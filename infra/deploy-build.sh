#!/usr/bin/env bash
# Builds the deploy artifacts exactly as a deploy does: one `cargo lambda build` of the four
# functions (arm64, the `release` profile; one invocation, so the dependencies compile once and
# the links run side by side, where sam building each function on its own took 826 s of CI's
# 2,071), then `sam build` from infra/, which packages each function's bootstrap from
# target/lambda/<binary>/ (the template's CodeUri, SkipBuild). Then checks every function's
# artifact: an aarch64 ELF `bootstrap`, its size printed against the 8 MB target, and failing
# above --max-mb (a ceiling that catches a regression, 12 MB by default). Installs what it needs:
# the SAM CLI (infra/local/setup.sh), cargo-lambda and the zig linker from PyPI into .venv, and
# the aarch64 Rust target. The build lands in infra/.aws-sam/build, where `sam deploy --guided`
# run from infra/ (README, Deploy) finds it, and saves its answers in infra/samconfig.toml.
#   infra/deploy-build.sh [--max-mb 12]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
max_mb=12
case "${1:-}" in
  "") ;;
  --max-mb)
    if [[ ! "${2:-}" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
      echo "usage: infra/deploy-build.sh [--max-mb N]  (N in MB, default 12)" >&2; exit 2
    fi
    max_mb="$2" ;;
  *) echo "usage: infra/deploy-build.sh [--max-mb N]  (N in MB, default 12)" >&2; exit 2 ;;
esac
bash infra/local/setup.sh
req="infra/requirements-deploy.txt"
stamp=".venv/.deploy-requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -r "$req"
  echo "$want" > "$stamp"
fi
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx aarch64-unknown-linux-gnu; then
  rustup target add aarch64-unknown-linux-gnu
fi
# cargo finds `cargo lambda` on PATH, and cargo-lambda finds zig through this python.
export PATH="$root/.venv/bin:$PATH" SAM_CLI_TELEMETRY=0
start=$(date +%s)
cargo lambda build --release --arm64 -p ingest -p meta-sender -p google-sender -p reconcile --bins
echo "cargo lambda build: $(( $(date +%s) - start )) s"
start=$(date +%s)
(cd infra && sam build --template-file template.yaml)
echo "sam build: $(( $(date +%s) - start )) s"
.venv/bin/python - "$max_mb" <<'PY'
import pathlib, sys
from samcli.yamlhelper import yaml_parse  # the SAM CLI's own reader (CloudFormation tags)
limit = float(sys.argv[1]) * 1024 * 1024
target = 8 * 1024 * 1024
bad = []
# Each function's artifact as `sam deploy` will package it: the built template's CodeUri.
built = pathlib.Path("infra/.aws-sam/build")
resources = yaml_parse((built / "template.yaml").read_text()).get("Resources", {})
functions = [
    (name, r.get("Properties", {}).get("CodeUri", ""))
    for name, r in sorted(resources.items())
    if r.get("Type") == "AWS::Serverless::Function"
]
if len(functions) != 4 or not all(uri for _, uri in functions):
    sys.exit(f"expected 4 functions with a CodeUri in {built / 'template.yaml'}, found {functions}")
for name, uri in functions:
    d = (built / uri).resolve()
    f = d / "bootstrap"
    if not f.is_file():
        bad.append(f"{name}: no bootstrap in {d}")
        continue
    head = f.read_bytes()[:20]
    # ELF magic, 64-bit, and e_machine 0xB7 (EM_AARCH64) at offset 18, little endian.
    if head[:4] != b"\x7fELF" or head[4] != 2 or int.from_bytes(head[18:20], "little") != 0xB7:
        bad.append(f"{name}: bootstrap is not an aarch64 ELF")
    size = f.stat().st_size
    verdict = "within" if size <= target else "OVER"
    print(f"{name:28} {size / 1024 / 1024:6.2f} MB arm64 bootstrap ({verdict} the 8 MB target)")
    if size > limit:
        bad.append(f"{name}: {size / 1024 / 1024:.2f} MB is over {sys.argv[1]} MB")
if bad:
    sys.exit("deploy artifacts: " + "; ".join(bad))
PY
