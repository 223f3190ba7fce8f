#!/usr/bin/env bash
# Runs a local replikv cluster on 127.0.0.1 for trying things out by hand.
# Run with no arguments for usage.
set -euo pipefail

STATE_DIR="${REPLIKV_CLUSTER_DIR:-/tmp/replikv-cluster}"
BASE_PORT="${REPLIKV_BASE_PORT:-7000}"
PEER_BASE_PORT="${REPLIKV_PEER_BASE_PORT:-$((BASE_PORT + 100))}"
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    cat <<EOF
usage: $(basename "$0") COMMAND

Commands:
  start N      build if needed, make certificates (once), then start N secure
               servers (ranks 0..N-1): client ports BASE_PORT..BASE_PORT+N-1
               (TLS), peer ports PEER_BASE_PORT.. (mutual TLS); show their status
  env          print the shell exports for the replikv CLI:
               eval "\$($(basename "$0") env)" && replikv put k v
  stop         stop every server (SIGTERM, then SIGKILL after 5 s); data and
               logs are kept, so 'start' with the same N resumes the cluster
  kill R       crash server R (SIGKILL)
  restart R    crash server R if it runs, then start it again with its data
  status       show every server's view, role, applied/committed lsn and lease
  logs R       follow server R's log
  clean        stop everything and delete all data and logs

Environment:
  REPLIKV_CLUSTER_DIR  state, data and logs (default /tmp/replikv-cluster; now $STATE_DIR)
  REPLIKV_BASE_PORT    client port of rank 0 (default 7000; now $BASE_PORT)
  REPLIKV_PEER_BASE_PORT peer port of rank 0 (default BASE_PORT+100; now $PEER_BASE_PORT)
  REPLIKV_CLUSTER_INSECURE=1  no certificates, no TLS (loopback only); users stay on
  REPLIKV_BIN_DIR      use the binaries in this directory instead of building
  REPLIKV_SERVER_ARGS  extra server flags, e.g. "--sync none --lease-ms 300"
  RUST_LOG             server log filter (default info)

Example:
  $(basename "$0") start 3
  $(basename "$0") kill 0 && sleep 2 && $(basename "$0") status
  $(basename "$0") restart 0
EOF
}

die() {
    echo "cluster.sh: $*" >&2
    exit 1
}

# Prints the directory holding replikv-server and replikv, building them
# (release) unless REPLIKV_BIN_DIR names one already.
bin_dir() {
    if [[ -n "${REPLIKV_BIN_DIR:-}" ]]; then
        echo "$REPLIKV_BIN_DIR"
        return
    fi
    # cargo's progress goes to stderr, so only the directory reaches stdout.
    (cd "$REPO_DIR" && cargo build --release -p replikv-server -p replikv-client >&2) ||
        die "build failed"
    local target
    target="$(cd "$REPO_DIR" && cargo metadata --format-version 1 --no-deps |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
    [[ -n "$target" ]] || die "cannot find cargo's target directory"
    echo "$target/release"
}

size() {
    [[ -f "$STATE_DIR/size" ]] || die "no cluster in $STATE_DIR; run: $0 start N"
    cat "$STATE_DIR/size"
}

# The servers' --peers value: host:client_port/peer_port by rank.
peers() {
    local n="$1" list="" r
    for ((r = 0; r < n; r++)); do
        list+="${list:+,}127.0.0.1:$((BASE_PORT + r))/$((PEER_BASE_PORT + r))"
    done
    echo "$list"
}

# The client addresses, as clients take them.
clients() {
    local n="$1" list="" r
    for ((r = 0; r < n; r++)); do
        list+="${list:+,}127.0.0.1:$((BASE_PORT + r))"
    done
    echo "$list"
}

# Makes the CA, a certificate per rank and the admin client certificate into
# STATE_DIR/certs, once.
make_certs() {
    local n="$1" bin="$2" r dir="$STATE_DIR/certs"
    [[ -f "$dir/ca.pem" ]] || "$bin/replikv" cert ca --dir "$dir" --cluster local >/dev/null
    for ((r = 0; r < n; r++)); do
        [[ -f "$dir/node-$r.pem" ]] ||
            "$bin/replikv" cert node --dir "$dir" --rank "$r" --hosts 127.0.0.1,localhost >/dev/null
    done
    [[ -f "$dir/client-admin.pem" ]] ||
        "$bin/replikv" cert client --dir "$dir" --name admin >/dev/null
}

tls_args() {
    [[ -f "$STATE_DIR/certs/ca.pem" ]] && echo "--tls-dir $STATE_DIR/certs"
    return 0
}

# The admin user's token (docs/security.md "Users"): made once into STATE_DIR, readable by
# its owner only; rank 0 creates the admin user with it as it forms the cluster.
make_admin_token() {
    local f="$STATE_DIR/admin-token"
    [[ -f "$f" ]] && return 0
    (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$f" && echo >>"$f")
}

check_rank() {
    local r="$1" n
    n="$(size)"
    if ! [[ "$r" =~ ^[0-9]+$ ]] || ((r >= n)); then
        die "rank must be 0..$((n - 1)), got '$r'"
    fi
}

# The pid of server R if it is running, else nothing. The command-line check
# guards against a pid reused by another program since the server exited.
pid_of() {
    local f="$STATE_DIR/pid-$1" pid
    [[ -f "$f" ]] || return 0
    pid="$(cat "$f")"
    if kill -0 "$pid" 2>/dev/null &&
        { [[ ! -r "/proc/$pid/cmdline" ]] || grep -qa replikv-server "/proc/$pid/cmdline"; }; then
        echo "$pid"
    fi
}

launch() {
    local r="$1" n bin
    n="$(size)"
    bin="$(cat "$STATE_DIR/bin-dir")/replikv-server"
    [[ -x "$bin" ]] || die "$bin is missing; run: $0 start $n"
    mkdir -p "$STATE_DIR/data-$r"
    echo "--- cluster.sh: starting rank $r at $(date '+%F %T') ---" >>"$STATE_DIR/server-$r.log"
    # shellcheck disable=SC2086 # REPLIKV_SERVER_ARGS is a list of flags
    RUST_LOG="${RUST_LOG:-info}" nohup "$bin" \
        --rank "$r" --peers "$(cat "$STATE_DIR/peers")" \
        --data-dir "$STATE_DIR/data-$r" --bootstrap $(tls_args) \
        --admin-token-file "$STATE_DIR/admin-token" ${REPLIKV_SERVER_ARGS:-} \
        >>"$STATE_DIR/server-$r.log" 2>&1 </dev/null &
    echo $! >"$STATE_DIR/pid-$r"
    echo "rank $r: pid $!, 127.0.0.1:$((BASE_PORT + r)) (peers: $((PEER_BASE_PORT + r))), log $STATE_DIR/server-$r.log"
}

# Signals server R; with SIGTERM, waits up to 5 s before resorting to SIGKILL.
stop_one() {
    local r="$1" sig="$2" pid i
    pid="$(pid_of "$r")"
    if [[ -z "$pid" ]]; then
        rm -f "$STATE_DIR/pid-$r"
        return 0
    fi
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "rank $r did not stop within 5 s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE_DIR/pid-$r"
    echo "rank $r: stopped (pid $pid, SIG$sig)"
}

cmd_start() {
    local n="${1:-}" r bin running=""
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "start needs a server count, e.g. '$0 start 3'"
    if [[ -f "$STATE_DIR/size" ]]; then
        for ((r = 0; r < $(size); r++)); do
            [[ -z "$(pid_of "$r")" ]] || running+=" $r"
        done
        [[ -z "$running" ]] || die "ranks$running are running already; run: $0 stop"
        [[ "$(size)" == "$n" ]] ||
            die "$STATE_DIR holds a cluster of $(size) servers; start $(size), or run: $0 clean"
    fi
    bin="$(bin_dir)"
    mkdir -p "$STATE_DIR"
    echo "$n" >"$STATE_DIR/size"
    peers "$n" >"$STATE_DIR/peers"
    echo "$bin" >"$STATE_DIR/bin-dir"
    if [[ "${REPLIKV_CLUSTER_INSECURE:-}" != 1 ]]; then
        make_certs "$n" "$bin"
    fi
    make_admin_token
    for ((r = 0; r < n; r++)); do
        launch "$r"
    done
    # Give the servers a moment to elect a primary before showing the status.
    sleep 1.5
    cmd_status
}

cmd_stop() {
    local n r
    n="$(size)"
    for ((r = 0; r < n; r++)); do
        stop_one "$r" TERM
    done
}

cmd_kill() {
    [[ $# -eq 1 ]] || die "kill needs a rank"
    check_rank "$1"
    [[ -n "$(pid_of "$1")" ]] || die "rank $1 is not running"
    stop_one "$1" KILL
}

cmd_restart() {
    [[ $# -eq 1 ]] || die "restart needs a rank"
    check_rank "$1"
    stop_one "$1" KILL
    launch "$1"
}

cmd_status() {
    local n r
    n="$(size)"
    for ((r = 0; r < n; r++)); do
        if [[ -n "$(pid_of "$r")" ]]; then
            echo "rank $r: running (pid $(pid_of "$r"))"
        else
            echo "rank $r: not running (log: $STATE_DIR/server-$r.log)"
        fi
    done
    (eval "$(cmd_env)" && "$(cat "$STATE_DIR/bin-dir")/replikv" status)
}

cmd_env() {
    local n dir="$STATE_DIR/certs"
    n="$(size)"
    echo "export REPLIKV_SERVERS=$(clients "$n")"
    if [[ -f "$dir/ca.pem" ]]; then
        echo "export REPLIKV_CA=$dir/ca.pem"
        echo "export REPLIKV_CERT=$dir/client-admin.pem"
        echo "export REPLIKV_KEY=$dir/client-admin-key.pem"
    else
        echo "unset REPLIKV_CA REPLIKV_CERT REPLIKV_KEY"
    fi
    echo "export REPLIKV_USER=admin"
    echo "export REPLIKV_TOKEN=$(cat "$STATE_DIR/admin-token")"
}

cmd_logs() {
    [[ $# -eq 1 ]] || die "logs needs a rank"
    check_rank "$1"
    exec tail -n 50 -F "$STATE_DIR/server-$1.log"
}

cmd_clean() {
    if [[ -f "$STATE_DIR/size" ]]; then
        cmd_stop
    fi
    [[ -d "$STATE_DIR" ]] || return 0
    # Only remove what looks like a cluster directory, never an arbitrary path.
    [[ -f "$STATE_DIR/size" || -z "$(ls -A "$STATE_DIR")" ]] ||
        die "$STATE_DIR does not look like a cluster directory; not deleting it"
    rm -rf "$STATE_DIR"
    echo "removed $STATE_DIR"
}

main() {
    local cmd="${1:-}"
    [[ $# -gt 0 ]] && shift
    case "$cmd" in
        start) cmd_start "$@" ;;
        stop) cmd_stop ;;
        kill) cmd_kill "$@" ;;
        restart) cmd_restart "$@" ;;
        status) cmd_status ;;
        env) cmd_env ;;
        logs) cmd_logs "$@" ;;
        clean) cmd_clean ;;
        -h | --help | help) usage ;;
        "") usage >&2; exit 2 ;;
        *) usage >&2; die "unknown command '$cmd'" ;;
    esac
}

main "$@"
