#!/usr/bin/env bash
# The cost of authentication: the load generator's spawned 3-server cluster (TLS on) with
# users (every request carries the admin's token, checked against the replicated user
# table) against the same cluster started with --no-auth, in alternating pairs so that a
# drift of the machine's speed hits both alike. Writes, under OUT (default results/auth):
#
#   auth.csv     every run's summary row (label auth-on-* / auth-off-*)
#   README.md    the command, the machine, each pair's ratio and the median ratio
#
#   scripts/bench-auth.sh
#   PAIRS=5 DURATION=10s CLIENTS=64 scripts/bench-auth.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-results/auth}"
PAIRS="${PAIRS:-3}"
DURATION="${DURATION:-8s}"
WARMUP="${WARMUP:-2s}"
CLIENTS="${CLIENTS:-64}"
RUN_LIMIT="${RUN_LIMIT:-120}"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/replikv-loadgen"

log() { echo "bench-auth: $*" >&2; }

log "building replikv-loadgen (release)"
cargo build --release -q -p replikv-loadgen >&2
mkdir -p "$OUT"
rm -f "$OUT/auth.csv"
for ((i = 1; i <= PAIRS; i++)); do
    for mode in on off; do
        flags=()
        [ "$mode" = off ] && flags=(--no-auth)
        log "pair $i: users $mode"
        timeout --signal=TERM --kill-after=20 "$RUN_LIMIT" "$BIN" --spawn 3 --sync always \
            --clients "$CLIENTS" --read-ratio 0 --duration "$DURATION" --warmup "$WARMUP" \
            "${flags[@]}" --label "auth-$mode-$i" --out "$OUT/runs" \
            --summary "$OUT/auth.csv" --quiet >/dev/null
    done
done
rm -rf "$OUT/runs"

{
    echo "# The cost of authentication"
    echo
    echo "Made by \`PAIRS=$PAIRS DURATION=$DURATION CLIENTS=$CLIENTS scripts/bench-auth.sh\` on" \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ) at commit \`$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\`," \
        "$(nproc) CPUs, everything on loopback."
    echo "Puts of $CLIENTS clients against \`replikv-loadgen --spawn 3\` (TLS on both planes), with"
    echo "users (the admin's token on every request) and with \`--no-auth\`, run in alternating pairs."
    echo
    python3 - "$OUT/auth.csv" <<'PY'
import csv, statistics, sys
rows = {r["label"]: r for r in csv.DictReader(open(sys.argv[1]))}
pairs = sorted({int(l.rsplit("-", 1)[1]) for l in rows})
print("| pair | users on ops/s | users off ops/s | on / off | on p99 us | off p99 us |")
print("|---|---|---|---|---|---|")
ratios = []
for i in pairs:
    on, off = rows.get(f"auth-on-{i}"), rows.get(f"auth-off-{i}")
    if not on or not off:
        continue
    r = float(on["all_ops_per_s"]) / float(off["all_ops_per_s"])
    ratios.append(r)
    print(f"| {i} | {float(on['all_ops_per_s']):.0f} | {float(off['all_ops_per_s']):.0f} | "
          f"{r:.3f} | {on['all_p99_us']} | {off['all_p99_us']} |")
print()
print(f"Median on / off: **{statistics.median(ratios):.3f}** over {len(ratios)} pairs.")
PY
} >"$OUT/README.md"
cat "$OUT/README.md"
