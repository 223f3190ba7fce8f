#!/usr/bin/env bash
# The cost of TLS: scripts/bench-peers.sh in the clear (TLS=0), then right after with TLS on
# every client and peer connection (TLS=1), replikv and etcd alike. Writes, under OUT
# (default results/tls):
#
#   plain/peers.csv, tls/peers.csv   each mode's runs (and their peers.md, peers.png)
#   tls.csv                          both modes in one summary, the target named with its mode
#   tls.png                          throughput and p99 per workload, one bar per target+mode
#   README.md                        the command, the machine, and TLS/plain per workload
#
#   scripts/bench-tls.sh
#   DURATION=10s scripts/bench-tls.sh
#
# Environment: OUT, and whatever scripts/bench-peers.sh takes (DURATION, WARMUP, CONNS...).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-results/tls}"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/replikv-loadgen"

log() { echo "bench-tls: $*" >&2; }

mkdir -p "$OUT"
log "in the clear (TLS=0)"
TLS=0 OUT="$OUT/plain" scripts/bench-peers.sh
log "with TLS (TLS=1)"
TLS=1 OUT="$OUT/tls" scripts/bench-peers.sh

# One summary of both modes, each row's target named with its mode, for the plot.
python3 - "$OUT/plain/peers.csv" "$OUT/tls/peers.csv" "$OUT/tls.csv" <<'PY'
import csv, sys
plain, tls, out = sys.argv[1:]
rows = []
for path, mode in ((plain, "plain"), (tls, "TLS")):
    for r in csv.DictReader(open(path)):
        r["target"] = f"{r['target']} {mode}"
        # The plot names a target by its sync mode too; the mode is in the name already.
        r["sync"] = ""
        rows.append(r)
with open(out, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
    w.writeheader()
    w.writerows(rows)
PY

{
    echo "# The cost of TLS"
    echo
    echo "Made by \`scripts/bench-tls.sh\` (DURATION=${DURATION:-5s}) on $(date -u +%Y-%m-%dT%H:%M:%SZ) at commit" \
        "\`$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\`: \`scripts/bench-peers.sh\` with"
    echo "TLS=0 (everything in the clear), then with TLS=1 (TLS on every client and peer connection"
    echo "of replikv and etcd: replikv \`--tls-dir\` with clients trusting the CA, etcd \`--cert-file\`"
    echo "and the \`--peer-*\` flags, one CA made by \`replikv cert\`; mutual TLS between servers, clients"
    echo "present no certificate). Redis is left out: Debian's redis-server 7.0 is built with TLS"
    echo "(\`--tls-port\`), but the load generator's Redis client is built without it."
    echo
    echo "Machine: $(nproc) CPUs, \`$(uname -a)\`; everything on loopback."
    echo
    echo "| workload | target | plain ops/s | TLS ops/s | TLS / plain | plain p99 us | TLS p99 us |"
    echo "|---|---|---|---|---|---|---|"
    python3 - "$OUT/plain/peers.csv" "$OUT/tls/peers.csv" <<'PY'
import csv, sys
def rows(path):
    return {(r["label"], r["target"]): r for r in csv.DictReader(open(path))}
plain, tls = rows(sys.argv[1]), rows(sys.argv[2])
for key, p in plain.items():
    t = tls.get(key)
    if t is None:
        continue
    ratio = float(t["all_ops_per_s"]) / float(p["all_ops_per_s"])
    print(f"| {key[0]} | {key[1]} | {float(p['all_ops_per_s']):.0f} | "
          f"{float(t['all_ops_per_s']):.0f} | {ratio:.2f} | {p['all_p99_us']} | {t['all_p99_us']} |")
PY
    echo
    echo "Both modes' runs: [plain/peers.md](plain/peers.md), [tls/peers.md](tls/peers.md)."
    echo
    echo "![throughput and p99, in the clear and with TLS](tls.png)"
} >"$OUT/README.md"
"$BIN" compare --summary "$OUT/tls.csv" --plot "$OUT/tls.png" \
    --title "replikv and etcd, in the clear and with TLS: 3 servers each" >/dev/null
cat "$OUT/README.md"
