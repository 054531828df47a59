#!/usr/bin/env bash
# Lints the eBPF programs with the workspace's lints (warnings denied). They only build for
# bpfel-unknown-none with `-Z build-std=core`, as reconciler/agent/build.rs builds them;
# RUSTC_BOOTSTRAP=1 is set here, for this one command, for the same reason. A clippy check
# does not link, so bpf-linker is not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir=${CARGO_TARGET_DIR:-target}/bpf-clippy
RUSTC_BOOTSTRAP=1 cargo clippy --package palisade-ebpf --release --target bpfel-unknown-none \
  -Z build-std=core --target-dir "$target_dir" "$@" -- -D warnings
