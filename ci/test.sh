#!/usr/bin/env bash
# Runs palisade's whole test suite: pure, kernel (BPF_PROG_TEST_RUN) and network-namespace
# tiers. Needs root (eBPF, network namespaces); installs the toolchain first if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
./ci/setup.sh
# Binaries first: the testbed's tests run the real agent binary built beside them.
cargo build --bins
# Arguments go to cargo: ci/test.sh --no-fail-fast, ci/test.sh -p palisade-policy, ...
cargo test "$@" -- --test-threads=2
