#!/usr/bin/env bash
# Bounded growth check (docs/design.md §3): a 3-server cluster, then 1 000 000 keys written and
# deleted; prints each server's resident memory and data-directory size before the writes,
# after them, and after the deletes once the tombstones are collected, and fails if any
# ends more than 20 % above where it started. Takes minutes.
#
#   scripts/gc-check.sh                  # debug server binary built by cargo
#   RELEASE=1 scripts/gc-check.sh        # a release server (built without LTO: faster to build)
#   KEYS=100000 scripts/gc-check.sh
#
# A smaller version (12 000 keys of 4 KiB, disk only) runs with every
# `cargo test -p replikv-server --test gc_check`.
#
# Environment (all optional):
#   KEYS         keys written then deleted (default 1000000)
#   VALUE_BYTES  bytes per value (default 100)
#   BASE_KEYS    keys written before the baseline and kept (default 0)
#   TOLERANCE    allowed growth over the baseline (default 0.2)
#   CYCLES       times the keys are written and deleted (default 1); with more, the check
#                also prints each cycle's memory after deletes + GC, to tell the allocator's
#                retained pages (reused by the next cycle) from growth
#   RELEASE      1: run a release build of the server
#   MIMALLOC_*   mimalloc's options, passed on to the servers: MIMALLOC_ALLOW_THP=0 keeps the
#                allocator off transparent huge pages, which otherwise make up most of an idle
#                server's resident memory (results/README.md, "Collection")
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

export REPLIKV_GC_CHECK_KEYS="${KEYS:-1000000}"
export REPLIKV_GC_CHECK_VALUE_BYTES="${VALUE_BYTES:-100}"
export REPLIKV_GC_CHECK_BASE_KEYS="${BASE_KEYS:-0}"
export REPLIKV_GC_CHECK_TOLERANCE="${TOLERANCE:-0.2}"
export REPLIKV_GC_CHECK_CYCLES="${CYCLES:-1}"

if [[ "${RELEASE:-0}" == 1 ]]; then
    CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
        cargo build --release -p replikv-server --bin replikv-server
    export REPLIKV_SERVER_BIN="$ROOT/target/release/replikv-server"
fi
# Servers log at info so the check can see their collection horizons.
export RUST_LOG="${RUST_LOG:-info}"
exec cargo test -p replikv-server --test gc_check -- --ignored --nocapture
