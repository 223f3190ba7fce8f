#!/usr/bin/env bash
# The replikv experiment matrix: cluster sizes x client counts x workloads, one fresh
# spawned cluster per run, results in results/ and a results/README.md with the headline
# numbers.
#
#   scripts/bench.sh                      # 3/5/10 servers, 1/8/64 clients, 4 workloads, 5 s each
#   DURATION=10s SERVERS="3" scripts/bench.sh
#
# Environment (all optional):
#   DURATION   measured time per run (default 5s)
#   WARMUP     unmeasured time before each run (default 1s)
#   SERVERS    cluster sizes (default "3 5 10")
#   CLIENTS    client counts (default "1 8 64")
#   WORKLOADS  any of get put uniform hotkey (default all four)
#   SYNC       --sync of the servers: always | none (default always)
#   KEYS       distinct keys (default 10000)
#   VALUE_SIZE bytes per value (default 256)
#   OUT        results directory (default results)
#   RUN_LIMIT  seconds after which one run is stopped (default: duration + 120)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DURATION="${DURATION:-5s}"
WARMUP="${WARMUP:-1s}"
SERVERS="${SERVERS:-3 5 10}"
CLIENTS="${CLIENTS:-1 8 64}"
WORKLOADS="${WORKLOADS:-get put uniform hotkey}"
SYNC="${SYNC:-always}"
KEYS="${KEYS:-10000}"
VALUE_SIZE="${VALUE_SIZE:-256}"
OUT="${OUT:-results}"

# Whole seconds of DURATION, for the per-run time limit (accepts 5s, 5, 2m).
duration_secs() {
    case "$1" in
        *ms) echo 1 ;;
        *m) echo $(( ${1%m} * 60 )) ;;
        *s) echo "${1%s}" ;;
        *) echo "$1" ;;
    esac
}
RUN_LIMIT="${RUN_LIMIT:-$(( $(duration_secs "$DURATION") + 120 ))}"

echo "building replikv-loadgen (release)" >&2
cargo build --release -p replikv-loadgen >&2
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/replikv-loadgen"

mkdir -p "$OUT/bench"
SUMMARY="$OUT/bench.csv"
# The matrix is regenerated as a whole: an old file would mix runs of another commit.
rm -f "$SUMMARY" "$OUT/bench/"*.timeline.csv

workload_args() {
    case "$1" in
        get) echo "--workload uniform --read-ratio 1" ;;
        put) echo "--workload uniform --read-ratio 0" ;;
        uniform) echo "--workload uniform --read-ratio 0.5" ;;
        hotkey) echo "--workload hotkey --read-ratio 0.5 --hot-keys 0.1 --hot-ops 0.9" ;;
        *) echo "unknown workload $1 (get put uniform hotkey)" >&2; return 1 ;;
    esac
}

failed=0
started=$(date +%s)
for servers in $SERVERS; do
    for clients in $CLIENTS; do
        for workload in $WORKLOADS; do
            label="s${servers}-c${clients}-${workload}"
            echo "== $label" >&2
            # shellcheck disable=SC2046 # workload_args is a list of flags
            if ! timeout --signal=TERM --kill-after=20 "$RUN_LIMIT" "$BIN" \
                --spawn "$servers" --sync "$SYNC" --clients "$clients" \
                $(workload_args "$workload") \
                --keys "$KEYS" --value-size "$VALUE_SIZE" \
                --duration "$DURATION" --warmup "$WARMUP" \
                --label "$label" --out "$OUT/bench" --summary "$SUMMARY" --quiet; then
                echo "!! $label failed" >&2
                failed=$((failed + 1))
            fi
        done
    done
done
elapsed=$(( $(date +%s) - started ))

mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
# Sections written by hand or by other scripts (from the first "## " heading on) survive.
kept=""
if [ -f "$OUT/README.md" ]; then
    kept=$(awk '/^## /{found=1} found' "$OUT/README.md")
fi
{
    echo "# replikv benchmark results"
    echo
    echo "Made by \`scripts/bench.sh\` on $(date -u +%Y-%m-%dT%H:%M:%SZ) at commit" \
        "\`$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\`, in ${elapsed} s:"
    echo
    echo '```sh'
    echo "DURATION=$DURATION WARMUP=$WARMUP SERVERS=\"$SERVERS\" CLIENTS=\"$CLIENTS\" \\"
    echo "  WORKLOADS=\"$WORKLOADS\" SYNC=$SYNC KEYS=$KEYS VALUE_SIZE=$VALUE_SIZE scripts/bench.sh"
    echo '```'
    echo
    echo "Machine: $(nproc) CPUs (${cpu:-unknown model}), $(( mem_kb / 1024 )) MiB memory"
    echo "(MemTotal in /proc/meminfo). The load generator and every server share it, so the"
    echo "numbers compare configurations with each other, not with dedicated hardware."
    echo
    echo "Each run spawns a fresh cluster on loopback (\`--sync $SYNC\`), writes all $KEYS keys,"
    echo "warms up for $WARMUP and measures for $DURATION with closed-loop clients, each its own"
    echo "session. Workloads: \`get\` = get-only, \`put\` = put-only, \`uniform\` = 50/50 over"
    echo "uniform keys, \`hotkey\` = 50/50 with 90 % of operations on 10 % of the keys."
    echo "Latencies in microseconds over gets and puts together; \`errors\` = failed operations."
    echo "Every column of \`bench.csv\` is described in \`loadgen/README.md\`; per-second"
    echo "timelines are in \`bench/\`."
    echo
    if [ -s "$SUMMARY" ]; then
        "$BIN" compare --summary "$SUMMARY"
    else
        echo "No run completed."
    fi
    if [ "$failed" -gt 0 ]; then
        echo
        echo "$failed run(s) failed and are missing from the table."
    fi
    if [ -n "$kept" ]; then
        echo
        echo "$kept"
    fi
} > "$OUT/README.md.new"
mv "$OUT/README.md.new" "$OUT/README.md"

echo "wrote $SUMMARY and $OUT/README.md ($failed failed run(s))" >&2
[ "$failed" -eq 0 ]
