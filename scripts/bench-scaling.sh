#!/usr/bin/env bash
# How replikv scales, one variable at a time (3 servers, 64 clients, 256-byte values unless
# the sweep varies it), put-only and get-only:
#
#   - servers: 3, 5, 10
#   - clients: 1, 8, 64, 256
#   - value size: 16, 256, 2048 bytes
#   - memory: resident memory and disk of each server before and after writing 1 000 000 keys
#   - catch-up: a restarted backup catching up on 100 000 writes it missed, in MB/s
#
#   scripts/bench-scaling.sh
#   DURATION=10s SWEEPS="clients values" scripts/bench-scaling.sh
#
# Environment (all optional):
#   DURATION     measured time per run (default 4s)
#   WARMUP       unmeasured time before each run (default 1s)
#   SWEEPS       any of servers clients values memory catchup (default all)
#   MEMORY_KEYS  keys written for the memory figure (default 1000000)
#   OUT          results directory (default results/scaling)
#
# Writes one summary CSV, plot and table per sweep into OUT, and OUT/README.md.
# Everything it starts is stopped when it exits, however it exits.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DURATION="${DURATION:-4s}"
WARMUP="${WARMUP:-1s}"
SWEEPS="${SWEEPS:-servers clients values memory catchup}"
MEMORY_KEYS="${MEMORY_KEYS:-1000000}"
OUT="${OUT:-results/scaling}"
KEYS=10000
# One run may take this long before it is stopped (the memory preload takes longest).
RUN_LIMIT="${RUN_LIMIT:-600}"
READY_LIMIT=60

log() { echo "bench-scaling: $*" >&2; }

TMP_PREFIX=replikv-scaling
# shellcheck source=scripts/lib-processes.sh
source "$ROOT/scripts/lib-processes.sh"

log "building replikv-loadgen and replikv-chaos (release)"
cargo build --release -p replikv-loadgen -p replikv-chaos >&2
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/replikv-loadgen"
CHAOS_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/replikv-chaos"
mkdir -p "$OUT/runs"

failed=0
# run SWEEP LABEL ARGS...: one spawned-cluster run, its summary row appended to SWEEP.csv.
run() {
    local sweep="$1" label="$2"
    shift 2
    log "$sweep: $label"
    if ! timeout --signal=TERM --kill-after=20 "$RUN_LIMIT" "$BIN" --sync always \
        --keys "$KEYS" --duration "$DURATION" --warmup "$WARMUP" --label "$label" \
        --out "$OUT/runs" --summary "$OUT/$sweep.csv" --quiet "$@" >/dev/null; then
        log "$label failed"
        failed=$((failed + 1))
    fi
}

ratio() { case "$1" in put) echo 0 ;; get) echo 1 ;; esac; }

sweep_servers() {
    rm -f "$OUT/servers.csv"
    local s w
    for s in 3 5 10; do
        for w in put get; do
            run servers "$w-$s-servers" --spawn "$s" --clients 64 --read-ratio "$(ratio $w)"
        done
    done
}

sweep_clients() {
    rm -f "$OUT/clients.csv"
    local c w
    for c in 1 8 64 256; do
        for w in put get; do
            run clients "$w-$c-clients" --spawn 3 --clients "$c" --read-ratio "$(ratio $w)"
        done
    done
}

sweep_values() {
    rm -f "$OUT/values.csv"
    local v w
    for v in 16 256 2048; do
        for w in put get; do
            run values "$w-$v-bytes" --spawn 3 --clients 64 --value-size "$v" \
                --read-ratio "$(ratio $w)"
        done
    done
}

# --- memory per million keys ------------------------------------------------------------

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

sweep_memory() {
    local ports=() peers="" i pids=()
    for i in 0 1 2; do
        free_port
        ports+=("$FREE_PORT")
        peers="${peers:+$peers,}127.0.0.1:${ports[$i]}"
    done
    for i in 0 1 2; do
        RUST_LOG=warn "$BIN" server --rank "$i" --peers "$peers" --data-dir "$TMP/mem$i" \
            --sync always --bootstrap >"$TMP/mem$i.log" 2>&1 &
        PIDS+=("$!")
        pids+=("$!")
    done
    wait_until "memory cluster" "$BIN" --servers "$peers" --no-preload --duration 200ms \
        --warmup 0s --clients 1 --read-ratio 0 --quiet --out "$TMP/ready" || return 1
    local before=() i
    for i in 0 1 2; do before+=("$(rss_kib "${pids[$i]}")"); done
    log "memory: writing $MEMORY_KEYS keys of 256 bytes"
    local started=$SECONDS
    timeout --signal=TERM --kill-after=20 "$RUN_LIMIT" "$BIN" --servers "$peers" \
        --keys "$MEMORY_KEYS" --value-size 256 --clients 64 --read-ratio 1 \
        --duration 1s --warmup 0s --quiet --out "$TMP/mem-run" >/dev/null
    local secs=$(( SECONDS - started ))
    {
        echo "server,rss_before_mib,rss_after_mib,rss_per_million_keys_mib,disk_mib"
        for i in 0 1 2; do
            local after disk
            after="$(rss_kib "${pids[$i]}")"
            disk="$(du -sk "$TMP/mem$i" | awk '{print $1}')"
            awk -v s="$i" -v b="${before[$i]}" -v a="$after" -v d="$disk" -v k="$MEMORY_KEYS" \
                'BEGIN { printf "%d,%.0f,%.0f,%.0f,%.0f\n", s, b/1024, a/1024, (a-b)/1024*1e6/k, d/1024 }'
        done
    } > "$OUT/memory.csv"
    log "memory: preload took ${secs}s"
    for i in 0 1 2; do
        kill "${pids[$i]}" 2>/dev/null || true
    done
}

sweep_catchup() {
    timeout --signal=TERM --kill-after=20 "$RUN_LIMIT" "$CHAOS_BIN" --spawn 3 measure \
        --scenarios catch-up --catch-up-value-size 256 --out-dir "$TMP/catchup" >&2
    cp "$TMP/catchup/catch-up.csv" "$OUT/catch-up.csv"
}

for sweep in $SWEEPS; do
    case "$sweep" in
        servers|clients|values|memory|catchup) "sweep_$sweep" || failed=$((failed + 1)) ;;
        *) log "unknown sweep $sweep (servers clients values memory catchup)"; exit 2 ;;
    esac
done

csv_table() {
    awk -F, 'NR == 1 { h = "|"; s = "|"; for (i = 1; i <= NF; i++) { h = h " " $i " |"; s = s "---|" }
             print h; print s; next }
             { r = "|"; for (i = 1; i <= NF; i++) r = r " " $i " |"; print r }' "$1"
}

{
    echo "# replikv scaling sweeps"
    echo
    echo "Made by \`scripts/bench-scaling.sh\` on $(date -u +%Y-%m-%dT%H:%M:%SZ) at commit" \
        "\`$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\` on $(nproc) CPUs" \
        "($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'))," \
        "$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 )) MiB, loopback,"
    echo "\`--sync always\`, $KEYS keys, $DURATION measured after $WARMUP warm-up per run;" \
        "the load generator shares the machine with every server."
    for sweep in servers clients values; do
        [ -s "$OUT/$sweep.csv" ] || continue
        echo
        echo "## Against $sweep (\`$sweep.csv\`, \`$sweep.png\`)"
        echo
        "$BIN" compare --summary "$OUT/$sweep.csv" --plot "$OUT/$sweep.png" \
            --title "replikv against $sweep"
    done
    if [ -s "$OUT/memory.csv" ]; then
        echo
        echo "## Memory and disk per server for $MEMORY_KEYS keys of 256 bytes (\`memory.csv\`)"
        echo
        csv_table "$OUT/memory.csv"
    fi
    if [ -s "$OUT/catch-up.csv" ]; then
        echo
        echo "## Catch-up of a restarted backup (\`catch-up.csv\`)"
        echo
        csv_table "$OUT/catch-up.csv"
    fi
    [ "$failed" -eq 0 ] || { echo; echo "$failed run(s) or sweep(s) failed and are missing."; }
} > "$OUT/README.md"
cat "$OUT/README.md"
[ "$failed" -eq 0 ]
