#!/usr/bin/env bash
# The long nemesis soak: five servers, every fault kind in healed rounds (lost
# disks, whole-cluster restarts with a wiped disk, two faults together, crashes
# armed at the steps of a view change or transfer), ten recording clients, then
# the checks of `replikv-chaos` (docs/design.md §8, §10): convergence, no
# acknowledged write lost, growing epochs, wiped servers serving only after they
# rejoined, no panics, a linearizable history.
#
#   scripts/chaos.sh 10m
#   scripts/chaos.sh 30m --seed 42 --clients 16
#
# The first argument is the run length (default 5m); any further arguments go
# to `replikv-chaos`. The history (operations and nemesis actions) is
# written to $OUT/soak-<time>.csv; a failed run also keeps the servers' data
# and logs and says where. Exits non-zero when any check fails.
#
# Environment (optional):
#   OUT       results directory (default results/chaos)
#   SERVERS   number of servers (default 5)
#   FAULTS    comma-separated fault kinds (default all)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DURATION="${1:-5m}"
shift || true
OUT="${OUT:-results/chaos}"
SERVERS="${SERVERS:-5}"
FAULTS="${FAULTS:-all}"

cargo build --release -p replikv-chaos
mkdir -p "$OUT"
HISTORY="$OUT/soak-$(date -u +%Y%m%dT%H%M%SZ).csv"

# exec: a Ctrl-C or SIGTERM reaches the nemesis directly, and it stops
# every server it started before exiting.
exec target/release/replikv-chaos \
    --spawn "$SERVERS" \
    --duration "$DURATION" \
    --faults "$FAULTS" \
    --out "$HISTORY" \
    "$@"
