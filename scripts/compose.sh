#!/usr/bin/env bash
# Runs the replikv cluster of deploy/compose.yaml: certificates, image, start, wait, and the
# exports that let the host's replikv CLI use it. Run with --help for usage.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMPOSE_FILE="${REPLIKV_COMPOSE_FILE:-$REPO_DIR/deploy/compose.yaml}"
STATE_DIR="${REPLIKV_COMPOSE_DIR:-/tmp/replikv-compose}"
PROJECT="${REPLIKV_COMPOSE_PROJECT:-replikv}"
BASE_PORT="${REPLIKV_COMPOSE_PORT:-7000}"
IMAGE_REF="${REPLIKV_IMAGE:-replikv:latest}"
TIMEOUT="${REPLIKV_COMPOSE_TIMEOUT:-120}"

usage() {
    cat <<EOF
usage: $(basename "$0") COMMAND

Commands:
  up       make the certificates (once), build the image if it is missing, start the
           cluster and wait (at most REPLIKV_COMPOSE_TIMEOUT s) until every server serves
  env      print the exports for the host's replikv CLI:
           eval "\$($(basename "$0") env)" && replikv put k v
  status   every server's view, role and lag (replikv status, run inside a container)
  logs     the last 50 log lines of every server
  down     remove the containers, the network, the data volumes and the certificates

Environment:
  REPLIKV_COMPOSE_DIR      certificates and state (default /tmp/replikv-compose; now $STATE_DIR)
  REPLIKV_COMPOSE_PROJECT  compose project name (default replikv; now $PROJECT)
  REPLIKV_COMPOSE_PORT     host port of replikv-0 on 127.0.0.1, replikv-N gets +N (default 7000)
  REPLIKV_IMAGE            image to run (default replikv:latest; now $IMAGE_REF)
  REPLIKV_BIN_DIR          build a missing image from these binaries instead of a release build
  REPLIKV_COMPOSE_FILE     compose file (default deploy/compose.yaml)
  REPLIKV_COMPOSE_TIMEOUT  seconds 'up' waits for the cluster to serve (default 120)
EOF
}

die() {
    echo "compose.sh: $*" >&2
    exit 1
}

compose() {
    if docker compose version >/dev/null 2>&1; then
        docker compose -p "$PROJECT" -f "$COMPOSE_FILE" "$@"
    elif command -v docker-compose >/dev/null; then
        docker-compose -p "$PROJECT" -f "$COMPOSE_FILE" "$@"
    else
        die "neither 'docker compose' nor 'docker-compose' is installed"
    fi
}

# The servers, in rank order: the compose services named replikv-N.
nodes() {
    compose config --services | grep -E '^replikv-[0-9]+$' | sort -t- -k2 -n
}

# What compose.yaml reads: the certificates, the image, the ports and the peer list.
export_settings() {
    local n=0 node peers=""
    export REPLIKV_CERTS="$STATE_DIR/certs" REPLIKV_IMAGE="$IMAGE_REF"
    # `compose config` needs REPLIKV_CERTS set before the node list can be read.
    for node in $(nodes); do
        [[ "$node" == "replikv-$n" ]] || die "services must be replikv-0, replikv-1, ... in order; found $node"
        export "REPLIKV_PORT_$n=$((BASE_PORT + n))"
        peers+="${peers:+,}$node:7000/7100"
        n=$((n + 1))
    done
    ((n > 0)) || die "$COMPOSE_FILE has no replikv-N services"
    export REPLIKV_PEERS="$peers"
    NODE_COUNT=$n
}

# Runs the replikv CLI of the image as the calling user, with the state directory at /state.
image_cli() {
    docker run --rm --user "$(id -u):$(id -g)" -v "$STATE_DIR:/state" \
        --entrypoint /usr/local/bin/replikv "$IMAGE_REF" "$@"
}

ensure_image() {
    docker image inspect "$IMAGE_REF" >/dev/null 2>&1 && return 0
    local name="${IMAGE_REF%:*}" tag="${IMAGE_REF##*:}"
    [[ "$IMAGE_REF" == *:* ]] || tag=latest
    echo "compose.sh: building $IMAGE_REF" >&2
    BIN_DIR="${REPLIKV_BIN_DIR:-}" IMAGE="$name" "$REPO_DIR/scripts/build-image.sh" "$tag" >&2
}

# The CA, one certificate per server (named by its DNS name on the network and by
# 127.0.0.1, where the host reaches its published port) and the admin client certificate.
# Each server gets a directory of its own holding its key and ca.pem only; ca-key.pem
# stays on the host.
make_certs() {
    local r dir="$STATE_DIR/certs"
    mkdir -p "$dir"
    chmod 0700 "$STATE_DIR"
    [[ -f "$dir/ca.pem" ]] || image_cli cert ca --dir /state/certs --cluster "$PROJECT" >/dev/null
    [[ -f "$dir/client-admin.pem" ]] ||
        image_cli cert client --dir /state/certs --name admin >/dev/null
    for ((r = 0; r < NODE_COUNT; r++)); do
        [[ -f "$dir/node-$r.pem" ]] || image_cli cert node --dir /state/certs --rank "$r" \
            --hosts "replikv-$r,127.0.0.1,localhost" >/dev/null
        mkdir -p "$dir/replikv-$r"
        cp "$dir/ca.pem" "$dir/node-$r.pem" "$dir/node-$r-key.pem" "$dir/replikv-$r/"
        # The server runs as another uid than the files' owner; STATE_DIR (0700) keeps the
        # key from the host's other users.
        chmod 0644 "$dir/replikv-$r/node-$r-key.pem"
    done
    # The admin user's token: replikv-0 forms the cluster with it (--admin-token-file);
    # `env` points the host's CLI at the same file.
    if [[ ! -f "$dir/admin-token" ]]; then
        (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$dir/admin-token")
    fi
    cp "$dir/admin-token" "$dir/replikv-0/admin-token"
    chmod 0644 "$dir/replikv-0/admin-token"
}

# Prints `replikv status` as seen from inside replikv-0.
cluster_status() {
    compose exec -T replikv-0 /usr/local/bin/replikv --servers 127.0.0.1:7000 \
        --ca /certs/ca.pem --user admin --token-file /certs/admin-token --timeout 3s status
}

cmd_up() {
    command -v docker >/dev/null || die "docker is not installed"
    ensure_image
    export_settings
    make_certs
    compose up -d
    local deadline=$((SECONDS + TIMEOUT)) up=0 table=""
    while ((SECONDS < deadline)); do
        table="$(cluster_status 2>/dev/null || true)"
        up="$(awk 'NR > 1 && $3 == "up"' <<<"$table" | wc -l)"
        if ((up == NODE_COUNT)); then
            echo "$table"
            echo "compose.sh: $NODE_COUNT servers serve; eval \"\$($0 env)\" to use them"
            return 0
        fi
        sleep 1
    done
    echo "$table" >&2
    compose logs --tail 20 >&2 || true
    die "only $up of $NODE_COUNT servers serve after ${TIMEOUT}s"
}

cmd_env() {
    [[ -f "$STATE_DIR/certs/ca.pem" ]] || die "no cluster in $STATE_DIR; run: $0 up"
    export_settings
    local r servers=""
    for ((r = 0; r < NODE_COUNT; r++)); do
        servers+="${servers:+,}127.0.0.1:$((BASE_PORT + r))"
    done
    echo "export REPLIKV_SERVERS=$servers"
    echo "export REPLIKV_CA=$STATE_DIR/certs/ca.pem"
    echo "export REPLIKV_CERT=$STATE_DIR/certs/client-admin.pem"
    echo "export REPLIKV_KEY=$STATE_DIR/certs/client-admin-key.pem"
    echo "export REPLIKV_USER=admin"
    echo "export REPLIKV_TOKEN_FILE=$STATE_DIR/certs/admin-token"
}

cmd_status() {
    export_settings
    cluster_status
}

cmd_logs() {
    export_settings
    compose logs --no-color --tail 50
}

cmd_down() {
    export REPLIKV_CERTS="$STATE_DIR/certs"
    compose down --volumes --remove-orphans
    if [[ -d "$STATE_DIR" ]]; then
        # Only remove what looks like this script's state, never an arbitrary path.
        [[ -f "$STATE_DIR/certs/ca.pem" || -z "$(ls -A "$STATE_DIR")" ]] ||
            die "$STATE_DIR does not look like a compose state directory; not deleting it"
        rm -rf "$STATE_DIR"
    fi
}

main() {
    local cmd="${1:-}"
    [[ $# -gt 0 ]] && shift
    [[ $# -eq 0 ]] || die "'$cmd' takes no arguments"
    case "$cmd" in
        up) cmd_up ;;
        env) cmd_env ;;
        status) cmd_status ;;
        logs) cmd_logs ;;
        down) cmd_down ;;
        -h | --help | help) usage ;;
        "") usage >&2; exit 2 ;;
        *) usage >&2; die "unknown command '$cmd'" ;;
    esac
}

main "$@"
