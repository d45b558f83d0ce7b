#!/usr/bin/env bash
# Installs the local AWS tooling (moto, SAM translator and CLI, cfn-lint) into .venv, once:
# it reinstalls only when infra/local/requirements.txt changes. Also installs Debian's
# headless Chromium, which the HTML report's test opens the page in, when it is missing.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
if [[ -z "${CHROMIUM:-}" ]] && ! command -v chromium >/dev/null; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "installing chromium (Debian's package) for the HTML report's test..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
  else
    echo "note: no chromium: the HTML report's test needs it (apt-get install chromium, or set CHROMIUM)" >&2
  fi
fi
venv="$root/.venv"
req="$root/infra/local/requirements.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "setting up $venv (moto, aws-sam-translator, aws-sam-cli, cfn-lint)..." >&2
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
echo "$want" > "$stamp"
