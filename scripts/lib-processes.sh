# Shared by the benchmark scripts that start servers themselves (sourced, not run):
# a scratch directory, background processes that are always stopped on exit, free loopback
# ports, and a bounded wait. The sourcing script defines `log` and sets TMP_PREFIX and
# READY_LIMIT (seconds) first.

TMP="$(mktemp -d -t "${TMP_PREFIX}-XXXXXX")"
# Every background process to stop on exit.
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    # Bounded wait for a clean exit (an etcd member whose peers are already gone takes a
    # few seconds), then SIGKILL.
    for _ in $(seq 1 100); do
        local alive=0
        for pid in "${PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        [ "$alive" -eq 0 ] && break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do
        kill -9 "$pid" 2>/dev/null || true
        # Reap quietly (no "Killed" job notice).
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

USED_PORTS=" "
# Ports are picked below the kernel's ephemeral range: a port inside it that nothing listens
# on can still be the local end of an outgoing connection (etcd members dial each other), and
# then a server cannot bind it.
read -r EPHEMERAL_LOW _ 2>/dev/null </proc/sys/net/ipv4/ip_local_port_range || EPHEMERAL_LOW=32768
PORT_LOW=10000
PORT_SPAN=$(( EPHEMERAL_LOW > PORT_LOW + 1000 ? EPHEMERAL_LOW - PORT_LOW : 20000 ))
# Sets FREE_PORT to a loopback port nothing listens on and this script has not handed out
# yet. Not for `$(...)`: the record of handed-out ports must stay in this shell.
free_port() {
    local port
    for _ in $(seq 1 200); do
        port=$(( PORT_LOW + RANDOM % PORT_SPAN ))
        case "$USED_PORTS" in *" $port "*) continue ;; esac
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            USED_PORTS="$USED_PORTS$port "
            FREE_PORT=$port
            return 0
        fi
    done
    log "no free port found"
    return 1
}

# wait_until WHAT COMMAND...: runs COMMAND until it succeeds, for at most READY_LIMIT
# seconds; then shows the logs in TMP and fails.
wait_until() {
    local what="$1"
    shift
    local deadline=$(( $(date +%s) + READY_LIMIT ))
    until "$@" >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            log "$what not ready after ${READY_LIMIT}s; logs in $TMP:"
            tail -n 20 "$TMP"/*.log >&2 || true
            return 1
        fi
        sleep 0.2
    done
}
