#!/usr/bin/env bash
# Posts a JSON file to the bridge with an X-Bridge-Signature header.
#   sign.sh <source> <file.json> [base-url]     (secret from $BRIDGE_SECRET)
# The signature is t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>"> with the
# source's secret: the same scheme any caller must implement (functions/ingest/README.md, "Signing a request").
set -euo pipefail
source_name="$1"; file="$2"; base="${3:-http://127.0.0.1:9000}"
secret="${BRIDGE_SECRET:?set BRIDGE_SECRET to the source signing secret}"
body="$(cat "$file")"
t="$(date +%s)"
sig="$(printf '%s' "$t.$body" | openssl dgst -sha256 -hmac "$secret" -r | cut -d' ' -f1)"
curl -sS -X POST "$base/webhooks/$source_name" \
  -H 'content-type: application/json' \
  -H "X-Bridge-Signature: t=$t,v1=$sig" \
  --data-binary "$body"
echo
