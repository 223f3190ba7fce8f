#!/usr/bin/env bash
# replikv beside etcd and Redis on the same workloads, in one run on this machine:
#
#   - etcd: a 3-member cluster on loopback, default fsync, linearizable reads
#   - Redis: a primary with 2 replicas, appendonly yes + appendfsync always, every write
#     followed by WAIT 2 so it is on both replicas before it counts (as a replikv write is)
#   - replikv: 3 servers spawned by the load generator, --sync always
#
# Workloads: put-only and get-only with 64 clients, and with 1 client; 256-byte values,
# 10 000 keys. Writes results/peers.csv, results/peers.png and results/peers.md.
#
#   scripts/bench-peers.sh
#   DURATION=10s scripts/bench-peers.sh
#
# Environment (all optional):
#   DURATION       measured time per run (default 5s)
#   WARMUP         unmeasured time before each run (default 1s)
#   OUT            results directory (default results)
#   REDIS_ROUTE    primary (default: every read on the primary, which is what makes Redis
#                  reads consistent) or random (reads spread over the replicas too)
#   ETCD_SERIALIZABLE  1 for member-local etcd reads (default 0: linearizable)
#   CONNS          connections (one to each server) the clients of a run share, as the
#                  tasks of one application share a client (default 4; 0: one per client).
#                  replikv and etcd alike; Redis clients keep their own (WAIT blocks one)
#   BASELINE_BIN   a replikv-loadgen binary of an earlier commit: every replikv run is made
#                  with it too, right before the current one, into $OUT/peers-baseline.csv,
#                  and $OUT/peers.md gets a table of both and their ratio
#   TLS            unset: as described above (replikv spawned by the load generator).
#                  0 or 1: the cost-of-TLS comparison (scripts/bench-tls.sh runs both back
#                  to back). This script then starts the 3 replikv servers itself, the same
#                  way in both modes, and leaves Redis out (the load generator's Redis
#                  client speaks no TLS). TLS=1: certificates from `replikv cert`; replikv
#                  with --tls-dir (TLS on the client port, mutual TLS between servers) and
#                  clients trusting the CA (REPLIKV_CA); etcd with TLS on client URLs
#                  (--cert-file/--key-file), mutual TLS on peer URLs (the --peer-* flags)
#                  and clients trusting the CA (ETCDCTL_CACERT). Clients present no
#                  certificate to either. TLS=0: both in the clear.
#
# Installs etcd-server and redis-server from Debian's packages when they are missing.
# Everything it starts is stopped when it exits, however it exits.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DURATION="${DURATION:-5s}"
WARMUP="${WARMUP:-1s}"
OUT="${OUT:-results}"
REDIS_ROUTE="${REDIS_ROUTE:-primary}"
ETCD_SERIALIZABLE="${ETCD_SERIALIZABLE:-0}"
CONNS="${CONNS:-4}"
KEYS=10000
VALUE_SIZE=256
# One run may take this long (cluster start, preload, warm-up, measurement) before it is
# stopped; a waiting loop gives up after READY_LIMIT.
RUN_LIMIT="${RUN_LIMIT:-150}"
READY_LIMIT=60
TLS="${TLS:-}"
case "$TLS" in "" | 0 | 1) ;; *) echo "bench-peers: TLS must be 0, 1 or unset" >&2; exit 2 ;; esac

log() { echo "bench-peers: $*" >&2; }

TMP_PREFIX=replikv-peers
# shellcheck source=scripts/lib-processes.sh
source "$ROOT/scripts/lib-processes.sh"

# --- installs ---------------------------------------------------------------------------

install_missing() {
    local missing=()
    command -v etcd >/dev/null || missing+=(etcd-server)
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v redis-cli >/dev/null || missing+=(redis-tools)
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    # Keep the packages' init scripts from starting system-wide daemons on their default
    # ports: only the servers this script starts should be running.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod +x "$policy"
        created_policy=1
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
    [ "$created_policy" -eq 1 ] && $sudo rm -f "$policy"
    return 0
}

# --- etcd -------------------------------------------------------------------------------

ETCD_ADDRS=""
start_etcd() {
    local client_ports=() peer_ports=() cluster="" i
    for i in 0 1 2; do
        free_port
        client_ports+=("$FREE_PORT")
        free_port
        peer_ports+=("$FREE_PORT")
        cluster="${cluster:+$cluster,}m$i=$SCHEME://127.0.0.1:${peer_ports[$i]}"
    done
    for i in 0 1 2; do
        local tls_flags=()
        if [ "$TLS" = 1 ]; then
            # The replikv node certificates serve etcd too: same CA, loopback SANs, and
            # both server and client use (an etcd member dials its peers with it). Clients
            # present no certificate, as replikv's do not (etcd would require one with
            # --trusted-ca-file); peers do, mutual TLS on both.
            tls_flags=(--cert-file "$CERTS/node-$i.pem" --key-file "$CERTS/node-$i-key.pem"
                --peer-cert-file "$CERTS/node-$i.pem" --peer-key-file "$CERTS/node-$i-key.pem"
                --peer-trusted-ca-file "$CERTS/ca.pem" --peer-client-cert-auth)
        fi
        etcd --name "m$i" --data-dir "$TMP/etcd$i" \
            --listen-client-urls "$SCHEME://127.0.0.1:${client_ports[$i]}" \
            --advertise-client-urls "$SCHEME://127.0.0.1:${client_ports[$i]}" \
            --listen-peer-urls "$SCHEME://127.0.0.1:${peer_ports[$i]}" \
            --initial-advertise-peer-urls "$SCHEME://127.0.0.1:${peer_ports[$i]}" \
            --initial-cluster "$cluster" --initial-cluster-state new \
            --initial-cluster-token replikv-bench --log-level warn "${tls_flags[@]}" \
            >"$TMP/etcd$i.log" 2>&1 &
        PIDS+=("$!")
        ETCD_ADDRS="${ETCD_ADDRS:+$ETCD_ADDRS,}127.0.0.1:${client_ports[$i]}"
    done
    for i in 0 1 2; do
        wait_until "etcd member $i" etcd_healthy "${client_ports[$i]}"
    done
    log "etcd up: $ETCD_ADDRS"
}

# /health answers {"health":"true"} once the member has a leader.
etcd_healthy() {
    local reply
    if [ "$TLS" = 1 ]; then
        reply=$(timeout 2 curl -s --cacert "$CERTS/ca.pem" "https://127.0.0.1:$1/health") || return 1
        case "$reply" in *'"health":"true"'*) return 0 ;; *) return 1 ;; esac
    fi
    exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
    printf 'GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
    reply=$(timeout 2 cat <&3)
    exec 3<&-
    case "$reply" in *'"health":"true"'*) return 0 ;; *) return 1 ;; esac
}

# --- Redis ------------------------------------------------------------------------------

REDIS_ADDRS=""
start_redis() {
    local ports=() i
    for i in 0 1 2; do
        free_port
        ports+=("$FREE_PORT")
    done
    for i in 0 1 2; do
        mkdir -p "$TMP/redis$i"
        local replica=()
        [ "$i" -gt 0 ] && replica=(--replicaof 127.0.0.1 "${ports[0]}")
        redis-server --port "${ports[$i]}" --bind 127.0.0.1 --dir "$TMP/redis$i" \
            --appendonly yes --appendfsync always --save "" --daemonize no \
            --logfile "$TMP/redis$i.log" "${replica[@]}" >/dev/null 2>&1 &
        PIDS+=("$!")
        REDIS_ADDRS="${REDIS_ADDRS:+$REDIS_ADDRS,}127.0.0.1:${ports[$i]}"
    done
    wait_until "redis replication" redis_replicas_online "${ports[0]}"
    log "redis up: $REDIS_ADDRS (primary first)"
}

redis_replicas_online() {
    [ "$(redis-cli -p "$1" INFO replication | grep -c '^slave[0-9]*:.*state=online')" -eq 2 ]
}

# --- replikv started by this script (TLS=0|1) ---------------------------------------------

SCHEME=http
[ "$TLS" = 1 ] && SCHEME=https
CERTS="$TMP/certs"

# The CA and node certificates of ranks 0-2 for 127.0.0.1, from `replikv cert`.
make_certs() {
    log "building replikv (the CLI, for its cert command)"
    cargo build -q -p replikv-client --bin replikv >&2
    local cli="${CARGO_TARGET_DIR:-$ROOT/target}/debug/replikv" i
    "$cli" cert ca --dir "$CERTS" --cluster bench >/dev/null
    for i in 0 1 2; do
        "$cli" cert node --dir "$CERTS" --rank "$i" --hosts 127.0.0.1 >/dev/null
    done
}

REPLIKV_ADDRS=""
start_replikv() {
    local peers="" ports=() pports=() i
    for i in 0 1 2; do
        free_port
        ports+=("$FREE_PORT")
        free_port
        pports+=("$FREE_PORT")
        peers="${peers:+$peers,}127.0.0.1:${ports[$i]}/${pports[$i]}"
    done
    for i in 0 1 2; do
        local flags=(--rank "$i" --peers "$peers" --data-dir "$TMP/replikv$i" --sync always)
        [ "$i" -eq 0 ] && flags+=(--bootstrap)
        [ "$TLS" = 1 ] && flags+=(--tls-dir "$CERTS")
        # A thread per core each, as the load generator's --spawn gives 3 servers on
        # this machine: cores / (servers + 1), at least one.
        TOKIO_WORKER_THREADS=$(( $(nproc) / 4 > 0 ? $(nproc) / 4 : 1 )) \
            "$BIN" server "${flags[@]}" >"$TMP/replikv$i.log" 2>&1 &
        PIDS+=("$!")
        REPLIKV_ADDRS="${REPLIKV_ADDRS:+$REPLIKV_ADDRS,}127.0.0.1:${ports[$i]}"
    done
    # Rank 0 formed the cluster with an admin user whose token it wrote into its data
    # directory; the CLI and the load generator speak as that user.
    export REPLIKV_USER=admin REPLIKV_TOKEN_FILE="$TMP/replikv0/admin-token"
    wait_until "replikv servers" replikv_ready
    log "replikv up: $REPLIKV_ADDRS (TLS=$TLS)"
}

# Every server is a member of a 3-member view.
replikv_ready() {
    local cli="${CARGO_TARGET_DIR:-$ROOT/target}/debug/replikv" members
    members=$(REPLIKV_SERVERS="$REPLIKV_ADDRS" timeout 5 "$cli" status 2>/dev/null \
        | grep -cw up) || return 1
    [ "$members" -eq 3 ]
}

# --- runs -------------------------------------------------------------------------------

install_missing

log "building replikv-loadgen (release)"
cargo build --release -p replikv-loadgen >&2
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/replikv-loadgen"

if [ -n "$TLS" ]; then
    make_certs
    if [ "$TLS" = 1 ]; then
        export REPLIKV_CA="$CERTS/ca.pem" ETCDCTL_CACERT="$CERTS/ca.pem"
    fi
    start_replikv
else
    start_redis
fi
start_etcd

mkdir -p "$OUT/peers"
SUMMARY="$OUT/peers.csv"
# One run's files only: older timelines would sit beside a summary that does not list them.
rm -f "$SUMMARY" "$OUT/peers/"*.timeline.csv

etcd_flags=()
[ "$ETCD_SERIALIZABLE" = 1 ] && etcd_flags=(--etcd-serializable)

BASELINE_SUMMARY="$OUT/peers-baseline.csv"
rm -f "$BASELINE_SUMMARY"

failed=0
# run LABEL TARGET ARGS...: one measured run with $BIN (or with $RUN_BIN, into $RUN_SUMMARY).
run() {
    local label="$1" target="$2"
    shift 2
    log "$label: $target${RUN_BIN:+ ($RUN_BIN)}"
    if ! timeout --signal=TERM --kill-after=20 "$RUN_LIMIT" "${RUN_BIN:-$BIN}" --target "$target" "$@" \
        --keys "$KEYS" --value-size "$VALUE_SIZE" --duration "$DURATION" --warmup "$WARMUP" \
        --label "$label" --out "$OUT/peers" --summary "${RUN_SUMMARY:-$SUMMARY}" --quiet >/dev/null; then
        log "$label against $target failed"
        failed=$((failed + 1))
    fi
}

# Prints the baseline's and this build's replikv throughput per workload, and their ratio.
baseline_table() {
    python3 - "$BASELINE_SUMMARY" "$SUMMARY" <<'PY'
import csv, sys
def rows(path):
    return {r["label"]: r for r in csv.DictReader(open(path)) if r["target"] == "replikv"}
base, cur = rows(sys.argv[1]), rows(sys.argv[2])
print("| workload | baseline ops/s | this build ops/s | ratio | baseline p50 us | this build p50 us |")
print("|---|---|---|---|---|---|")
for label, b in base.items():
    c = cur.get(label)
    if c is None:
        continue
    ratio = float(c["all_ops_per_s"]) / float(b["all_ops_per_s"])
    print(f"| {label} | {float(b['all_ops_per_s']):.0f} | {float(c['all_ops_per_s']):.0f} | "
          f"{ratio:.2f} | {b['all_p50_us']} | {c['all_p50_us']} |")
PY
}

for clients in 64 1; do
    for mode in put get; do
        case "$mode" in put) ratio=0 ;; get) ratio=1 ;; esac
        label="$mode-only-$clients-client$([ "$clients" -eq 1 ] || echo s)"
        common=(--clients "$clients" --conns "$CONNS" --read-ratio "$ratio")
        if [ -n "${BASELINE_BIN:-}" ]; then
            RUN_BIN="$BASELINE_BIN" RUN_SUMMARY="$BASELINE_SUMMARY" \
                run "$label" replikv --spawn 3 --sync always "${common[@]}"
        fi
        if [ -n "$TLS" ]; then
            run "$label" replikv --servers "$REPLIKV_ADDRS" "${common[@]}"
        else
            run "$label" replikv --spawn 3 --sync always "${common[@]}"
        fi
        # etcd's own client spreads requests over the members; followers forward writes
        # to the leader inside the cluster.
        run "$label" etcd --servers "$ETCD_ADDRS" --route random "${etcd_flags[@]}" "${common[@]}"
        if [ -z "$TLS" ]; then
            run "$label" redis --servers "$REDIS_ADDRS" --redis-wait 2 --route "$REDIS_ROUTE" \
                "${common[@]}"
        fi
    done
done

if [ -s "$SUMMARY" ]; then
    {
        echo "# replikv, etcd and Redis on the same workloads"
        echo
        echo "Made by \`scripts/bench-peers.sh\` on $(date -u +%Y-%m-%dT%H:%M:%SZ) at commit" \
            "\`$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\` on $(nproc) CPUs and" \
            "$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 )) MiB, everything on loopback."
        echo "$KEYS keys, $VALUE_SIZE-byte values, $DURATION measured after $WARMUP warm-up."
        echo "etcd $(etcd --version 2>/dev/null | head -n 1 | awk '{print $3}'): 3 members," \
            "default fsync, $([ "$ETCD_SERIALIZABLE" = 1 ] && echo serializable || echo linearizable) reads."
        if [ -z "$TLS" ]; then
            echo "Redis $(redis-server --version | awk '{print $3}' | cut -d= -f2): primary + 2 replicas," \
                "appendfsync always, WAIT 2 after every write, reads on the $REDIS_ROUTE route."
            echo "replikv: 3 servers, --sync always, linearizable reads from any member."
        else
            echo "TLS=$TLS: $([ "$TLS" = 1 ] && echo "TLS on every client and peer connection of replikv and etcd (replikv --tls-dir, etcd --cert-file and --peer-cert-file, one CA from \`replikv cert\`; mutual between servers, clients present no certificate)" || echo "replikv and etcd in the clear"); Redis left out (the load generator's Redis client speaks no TLS)."
            echo "replikv: 3 servers started by the script, --sync always, linearizable reads from any member."
        fi
        echo "Clients: replikv's and etcd's share $CONNS connection sets (\`--conns $CONNS\`);" \
            "each Redis client has its own connection."
        echo
        "$BIN" compare --summary "$SUMMARY" --plot "$OUT/peers.png" \
            --title "replikv, etcd and Redis: 3 servers each, $VALUE_SIZE-byte values"
        if [ -s "$BASELINE_SUMMARY" ]; then
            echo
            echo "replikv against the baseline binary \`$BASELINE_BIN\`, each pair run back to back:"
            echo
            baseline_table
        fi
        [ "$failed" -eq 0 ] || { echo; echo "$failed run(s) failed and are missing."; }
    } > "$OUT/peers.md"
    cat "$OUT/peers.md"
fi
log "wrote $SUMMARY, $OUT/peers.png, $OUT/peers.md ($failed failed run(s))"
[ "$failed" -eq 0 ]
