#!/usr/bin/env bash
# Installs, idempotently, everything palisade's build and tests need on a fresh Debian
# machine run as root: Debian packages, the rust-src component, bpf-linker built against
# rustc's own LLVM, and a mounted bpffs. Each step is skipped when it is already done.
set -euo pipefail

say() { printf 'palisade setup: %s\n' "$*" >&2; }

# Where bpf-linker's LLVM link folder lives; its path is baked into bpf-linker's rpath,
# so it must stay put.
TOOLS_DIR=${PALISADE_TOOLS_DIR:-/opt/palisade-tools}
BPF_LINKER_VERSION=${BPF_LINKER_VERSION:-0.13.0}

if [ "$(id -u)" -ne 0 ]; then
  say "must run as root (it installs Debian packages and mounts bpffs)"; exit 1
fi

# Debian packages: iproute2 (`ip`, which the CNI test reads the plugin's work back with, and
# for people poking at a testbed), iptables/nftables (benchmark baselines),
# tcpdump is not needed: captures are done by the testbed itself.
# install_missing WHAT PACKAGE...: installs those of the Debian packages that are neither
# installed (dpkg) nor on PATH by their command's name (nodejs: node), saying what for.
install_missing() {
  local what=$1 p
  shift
  local missing=()
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || command -v "${p/nodejs/node}" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages$what: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}
install_missing "" iproute2 iptables nftables procps

# A Docker engine for the containerized-agent test (the test starts its own dockerd, with
# its own state folders and without touching the machine's firewall, and stops it).
# If it cannot be installed, that test says so and is skipped (a failure under CI=true).
if ! command -v dockerd >/dev/null 2>&1; then
  say "installing docker.io (Docker engine for the container test)"
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends docker.io >/dev/null; }; then
    say "docker.io could not be installed: the container test will be skipped (and fail under CI=true)"
  fi
fi

# etcd for the kvstore mode (the testbed and the tests start their own, on 127.0.0.1 or inside
# the testbed; the package starts none here: no systemd), and protoc with the well-known
# .proto files, which the etcd client crate's build script compiles its gRPC API with.
install_missing " for the kvstore mode" etcd-server etcd-client protobuf-compiler libprotobuf-dev

# The browser test of `palisade ui` (testbed/tests/ui_privileged.rs): Debian's Chromium,
# driven headless by playwright-core (npm, pinned by testbed/tests/browser/package-lock.json,
# installed into that folder; it downloads no browser: it is given /usr/bin/chromium).
install_missing " for the browser test" chromium nodejs npm
BROWSER_DIR="$(cd "$(dirname "$0")/.." && pwd)/testbed/tests/browser"
PW_WANT=$(sed -n 's/.*"playwright-core": *"\([^"]*\)".*/\1/p' "$BROWSER_DIR/package.json")
PW_HAVE=$(sed -n 's/^  "version": *"\([^"]*\)".*/\1/p' "$BROWSER_DIR/node_modules/playwright-core/package.json" 2>/dev/null || true)
if [ "$PW_HAVE" != "$PW_WANT" ]; then
  say "installing playwright-core $PW_WANT into $BROWSER_DIR (npm ci)"
  (cd "$BROWSER_DIR" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi

if ! rustup component list --installed 2>/dev/null | grep -q '^rust-src'; then
  say "adding the rust-src component (the eBPF crate is built with -Z build-std=core)"
  rustup component add rust-src
fi

if ! command -v bpf-linker >/dev/null 2>&1 || ! bpf-linker --version >/dev/null 2>&1; then
  SR=$(rustc --print sysroot)
  LIB=$(cd "$SR/lib" && ls libLLVM.so.*-rust-* 2>/dev/null | head -n1)
  if [ -z "$LIB" ]; then say "rustc's libLLVM not found under $SR/lib"; exit 1; fi
  LLVM_MAJOR=$(echo "$LIB" | sed -E 's/libLLVM\.so\.([0-9]+)\..*/\1/')
  say "building bpf-linker $BPF_LINKER_VERSION against rustc's LLVM $LLVM_MAJOR (about a minute)"
  mkdir -p "$TOOLS_DIR/llvm/lib"
  for n in libLLVM.so "$LIB"; do ln -sf "$SR/lib/$LIB" "$TOOLS_DIR/llvm/lib/$n"; done
  LLVM_PREFIX="$TOOLS_DIR/llvm" cargo install --locked bpf-linker --version "$BPF_LINKER_VERSION" \
    --no-default-features --features "llvm-$LLVM_MAJOR"
fi

# With --lint-tools (as `.ci/run` calls it): cargo-deny, for the licence and banned-crate
# check. Built without its default features: the advisory database (git, network) is not
# used, only `check licenses bans`. The testbed and the tests do not need it.
CARGO_DENY_VERSION=${CARGO_DENY_VERSION:-0.20.2}
if [ "${1:-}" = "--lint-tools" ] && ! cargo deny --version 2>/dev/null | grep -q " $CARGO_DENY_VERSION\b"; then
  say "building cargo-deny $CARGO_DENY_VERSION (a few minutes)"
  cargo install --locked cargo-deny --version "$CARGO_DENY_VERSION" --no-default-features
fi

if ! mountpoint -q /sys/fs/bpf; then
  say "mounting bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi
