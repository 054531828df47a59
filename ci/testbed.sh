#!/usr/bin/env bash
# Runs the testbed on a scenario (default: the seed scenario) with the real agent: installs
# the toolchain if missing, builds, and prints the truth table. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
./ci/setup.sh
cargo build --release --bins -q
if [ $# -eq 0 ]; then set -- fixtures/scenarios/seed-allow-frontend-to-backend.yaml; fi
exec ./target/release/palisade-testbed run "$@"
