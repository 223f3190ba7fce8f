#!/usr/bin/env bash
# The simulator soak: runs `replikv-sim` (release) over fresh seeds in batches until the
# given wall time has passed, then prints the totals. Every seed is five servers and eight
# clients for 60 simulated seconds of faults plus 15 s of healing, checked for
# linearizability, lost acknowledged writes, two primaries in one epoch, epochs going back
# and divergence after healing (docs/simulator.md). Every other batch adds the retrying
# proxy (--proxy-retries). A failing seed prints the command that replays it and the events
# before the violation.
#
#   scripts/sim-soak.sh 10m
#   START=50000 BATCH=5000 scripts/sim-soak.sh 1h
#
# Environment (optional):
#   START   first seed (default: derived from the current time, so runs differ)
#   BATCH   seeds per batch (default 2000)
#   JOBS    worker threads (default: the number of cores)
#   ARGS    extra arguments for replikv-sim (e.g. "--servers 3 --clients 16")
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DURATION="${1:-10m}"
case "$DURATION" in
  *h) SECS=$(( ${DURATION%h} * 3600 )) ;;
  *m) SECS=$(( ${DURATION%m} * 60 )) ;;
  *s) SECS=${DURATION%s} ;;
  *) SECS=$DURATION ;;
esac
BATCH="${BATCH:-2000}"
JOBS="${JOBS:-$(nproc)}"
START="${START:-$(( $(date +%s) % 100000 * 100000 ))}"

cargo build --release -q -p replikv-sim
BIN="$ROOT/target/release/replikv-sim"

deadline=$(( $(date +%s) + SECS ))
seed=$START
total=0
failed=0
batch=0
while [ "$(date +%s)" -lt "$deadline" ]; do
  # Every other batch also runs the retrying proxy on the append stream (docs/simulator.md
  # "Retried appends"), a fault that changes the runs it fires in, so it is kept apart.
  proxy=()
  [ $(( batch % 2 )) -eq 1 ] && proxy=(--proxy-retries)
  batch=$(( batch + 1 ))
  # shellcheck disable=SC2086
  if ! "$BIN" --seeds "$BATCH" --start "$seed" --jobs "$JOBS" "${proxy[@]}" ${ARGS:-}; then
    failed=$(( failed + 1 ))
  fi
  seed=$(( seed + BATCH ))
  total=$(( total + BATCH ))
done
echo "soak: seeds $START..$(( seed - 1 )) ($total seeds), failing batches $failed"
[ "$failed" -eq 0 ]
