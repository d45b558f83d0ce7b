#!/usr/bin/env bash
# Builds what the local stack and the end-to-end tests run: the four functions and the local
# Lambda runtime (bridge-local), in the `local` profile (optimised, no LTO) and in one cargo
# invocation, so up.sh and test.sh share one feature set and neither rebuilds after the other.
# The deploy artifacts are built by infra/deploy-build.sh (arm64, the `release` profile).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --profile local "$@" \
  -p ingest -p meta-sender -p google-sender -p reconcile -p bridge-devstack --bins
