#!/usr/bin/env bash
# Builds what the local stack and the end-to-end tests run: the four functions and the local
# Lambda runtime (bridge-local), together with every test, in the dev profile and one cargo
# invocation. `--all-targets` gives this build the same feature set as `cargo test --workspace`
# (dev-dependencies' features included), so the functions, the tests and up.sh share every
# compiled dependency and nothing compiles twice; the functions' own code is unoptimised but
# their dependencies are built at opt-level 1 (see Cargo.toml). The deploy artifacts are built
# by infra/deploy-build.sh (arm64, the `release` profile); the cold-start benchmark builds the
# optimised `local` profile (README, Development).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --workspace --all-targets "$@"
