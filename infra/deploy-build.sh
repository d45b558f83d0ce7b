#!/usr/bin/env bash
# Builds the deploy artifacts exactly as a deploy does: `sam build` from infra/ (cargo-lambda,
# arm64, the `release` profile), then checks every function's artifact: an aarch64 ELF
# `bootstrap`, its size printed against the 8 MB target, and failing above --max-mb (a ceiling
# that catches a regression, 12 MB by default, while the target is not met). Installs what it needs:
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
(cd infra && sam build --template-file template.yaml)
echo "sam build: $(( $(date +%s) - start )) s"
.venv/bin/python - "$max_mb" <<'PY'
import pathlib, sys
limit = float(sys.argv[1]) * 1024 * 1024
target = 8 * 1024 * 1024
bad = []
dirs = sorted(p for p in pathlib.Path("infra/.aws-sam/build").iterdir() if p.is_dir())
if not dirs:
    sys.exit("no function artifacts under infra/.aws-sam/build")
for d in dirs:
    f = d / "bootstrap"
    if not f.is_file():
        bad.append(f"{d.name}: no bootstrap")
        continue
    head = f.read_bytes()[:20]
    # ELF magic, 64-bit, and e_machine 0xB7 (EM_AARCH64) at offset 18, little endian.
    if head[:4] != b"\x7fELF" or head[4] != 2 or int.from_bytes(head[18:20], "little") != 0xB7:
        bad.append(f"{d.name}: bootstrap is not an aarch64 ELF")
    size = f.stat().st_size
    verdict = "within" if size <= target else "OVER"
    print(f"{d.name:28} {size / 1024 / 1024:6.2f} MB arm64 bootstrap ({verdict} the 8 MB target)")
    if size > limit:
        bad.append(f"{d.name}: {size / 1024 / 1024:.2f} MB is over {sys.argv[1]} MB")
if bad:
    sys.exit("deploy artifacts: " + "; ".join(bad))
PY
