#!/usr/bin/env bash
# Fuzzes the manifest parser (fuzz/fuzz_targets/parse_manifests.rs) for a bounded time.
#   ci/fuzz.sh [SECONDS]     default 60; FUZZ_JOBS=N runs N jobs in parallel (default 1)
# Installs cargo-fuzz from crates.io if it is missing (idempotent). Builds on the stable
# toolchain with RUSTC_BOOTSTRAP=1, which cargo-fuzz's sanitizer flags (-Z) need.
# Seeds: fixtures/policies and fixtures/invalid; what libFuzzer learns is kept in
# fuzz/corpus/parse_manifests (not committed). A crash or a slow input (over 10 s) fails
# the run and is saved under fuzz/artifacts/parse_manifests/: turn it into a regression
# test in reconciler/policy, then fix the parser.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
jobs="${FUZZ_JOBS:-1}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

corpus=fuzz/corpus/parse_manifests
mkdir -p "$corpus"
export RUSTC_BOOTSTRAP=1
cd fuzz
cargo fuzz run parse_manifests \
    "../$corpus" ../fixtures/policies ../fixtures/invalid \
    --jobs "$jobs" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1
