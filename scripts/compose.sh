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
  add      add a server: its certificate, 'replikv member add', and a container
           replikv-R (R the rank the cluster gives it) that joins with --join and is
           published on 127.0.0.1 at the base port + R; waits until it serves
  remove R remove the server of rank R: 'replikv member remove R', then its container
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
        node_cert "$r"
    done
    # The admin user's token: replikv-0 forms the cluster with it (--admin-token-file);
    # `env` points the host's CLI at the same file.
    if [[ ! -f "$dir/admin-token" ]]; then
        (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$dir/admin-token")
    fi
    cp "$dir/admin-token" "$dir/replikv-0/admin-token"
    chmod 0644 "$dir/replikv-0/admin-token"
}

# Ranks of the servers added by `add` (containers outside compose.yaml), one per line.
added_ranks() {
    docker ps -a --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=replikv.added" --format '{{.Label "replikv.rank"}}' | sort -n
}

# The replikv CLI of the image as the admin user, on the cluster's network, given every
# server by its DNS name.
cluster_cli() {
    local r servers=""
    for r in $(seq 0 $((NODE_COUNT - 1))) $(added_ranks); do
        servers+="${servers:+,}replikv-$r:7000"
    done
    docker run --rm --user "$(id -u):$(id -g)" --network "${PROJECT}_replikv" \
        -v "$STATE_DIR/certs:/state/certs:ro" \
        --entrypoint /usr/local/bin/replikv "$IMAGE_REF" --servers "$servers" \
        --ca /state/certs/ca.pem --user admin --token-file /state/certs/admin-token "$@"
}

# Prints `replikv status` as seen from the cluster's network.
cluster_status() {
    cluster_cli --timeout 3s status
}

# A node certificate for rank $1 (DNS name replikv-$1, and 127.0.0.1 for the published
# port) in a directory of its own, as make_certs does for the servers of compose.yaml.
node_cert() {
    local r="$1" dir="$STATE_DIR/certs"
    [[ -f "$dir/node-$r.pem" ]] || image_cli cert node --dir /state/certs --rank "$r" \
        --hosts "replikv-$r,127.0.0.1,localhost" >/dev/null
    mkdir -p "$dir/replikv-$r"
    cp "$dir/ca.pem" "$dir/node-$r.pem" "$dir/node-$r-key.pem" "$dir/replikv-$r/"
    # The server runs as another uid than the files' owner; STATE_DIR (0700) keeps the
    # key from the host's other users.
    chmod 0644 "$dir/replikv-$r/node-$r-key.pem"
}

cmd_up() {
    command -v docker >/dev/null || die "docker is not installed"
    ensure_image
    export_settings
    make_certs
    compose up -d
    if wait_up "$NODE_COUNT"; then
        echo "compose.sh: $NODE_COUNT servers serve; eval \"\$($0 env)\" to use them"
        return 0
    fi
    compose logs --tail 20 >&2 || true
    die "not all $NODE_COUNT servers serve after ${TIMEOUT}s"
}

cmd_env() {
    [[ -f "$STATE_DIR/certs/ca.pem" ]] || die "no cluster in $STATE_DIR; run: $0 up"
    export_settings
    local r servers=""
    for r in $(seq 0 $((NODE_COUNT - 1))) $(added_ranks); do
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
    local r
    for r in $(added_ranks); do
        echo "--- replikv-$r ---"
        docker logs --tail 50 "${PROJECT}-replikv-$r" 2>&1
    done
}

# Waits (at most TIMEOUT s) until `replikv status` shows $1 servers up.
wait_up() {
    local want="$1" deadline=$((SECONDS + TIMEOUT)) up=0 table=""
    while ((SECONDS < deadline)); do
        table="$(cluster_status 2>/dev/null || true)"
        up="$(awk 'NR > 1 && $3 == "up"' <<<"$table" | wc -l)"
        if ((up == want)); then
            echo "$table"
            return 0
        fi
        sleep 1
    done
    echo "$table" >&2
    return 1
}

cmd_add() {
    export_settings
    [[ -f "$STATE_DIR/certs/ca.pem" ]] || die "no cluster in $STATE_DIR; run: $0 up"
    local list next join rank members
    list="$(cluster_cli member list)" || die "the cluster does not answer 'member list'"
    next="$(awk '$1 == "next" && $2 == "rank" {print $3}' <<<"$list")"
    [[ -n "$next" ]] || die "no next rank in: $list"
    # Any member's client address serves --join.
    join="$(awk -F'\t' '$3 == "primary" || $3 == "member" {split($2, a, "/"); print a[1]; exit}' <<<"$list")"
    [[ -n "$join" ]] || die "no member to join in: $list"
    members="$(awk -F'\t' '$3 == "primary" || $3 == "member"' <<<"$list" | wc -l)"
    node_cert "$next"
    rank="$(cluster_cli member add "replikv-$next:7000/7100")" || die "member add refused"
    [[ "$rank" == "$next" ]] || die "the cluster gave rank $rank, not $next; remove it: $0 remove $rank"
    docker run --detach --name "${PROJECT}-replikv-$rank" --hostname "replikv-$rank" \
        --network "${PROJECT}_replikv" --network-alias "replikv-$rank" \
        --label "com.docker.compose.project=$PROJECT" --label replikv.added=true \
        --label "replikv.rank=$rank" --restart unless-stopped \
        -v "$STATE_DIR/certs/replikv-$rank:/certs:ro" -v /data \
        -p "127.0.0.1:$((BASE_PORT + rank)):7000" \
        -e REPLIKV_LISTEN=0.0.0.0:7000 -e REPLIKV_PEER_LISTEN=0.0.0.0:7100 \
        -e REPLIKV_DATA_DIR=/data -e REPLIKV_TLS_DIR=/certs -e "RUST_LOG=${RUST_LOG:-info}" \
        -e REPLIKV_HEALTH_LISTEN=0.0.0.0:7200 -e REPLIKV_METRICS_LISTEN=0.0.0.0:9100 \
        "$IMAGE_REF" --rank-from-hostname --join "$join" >/dev/null
    wait_up $((members + 1)) ||
        die "replikv-$rank does not serve after ${TIMEOUT}s; see: docker logs ${PROJECT}-replikv-$rank"
    echo "compose.sh: replikv-$rank (rank $rank) serves on 127.0.0.1:$((BASE_PORT + rank))"
}

cmd_remove() {
    local rank="$1" id
    [[ "$rank" =~ ^[0-9]+$ ]] || die "remove takes a rank, e.g.: $0 remove 2"
    export_settings
    cluster_cli member remove "$rank" >/dev/null || die "member remove $rank refused"
    id="$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=replikv.rank=$rank")"
    if [[ -n "$id" ]]; then
        docker rm --force --volumes "$id" >/dev/null
    elif ((rank < NODE_COUNT)); then
        # A server of compose.yaml: its volume stays until `down`.
        compose rm --stop --force "replikv-$rank" >/dev/null
    fi
    echo "compose.sh: removed rank $rank and its container"
}

cmd_down() {
    export REPLIKV_CERTS="$STATE_DIR/certs"
    local added
    added="$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=replikv.added")"
    [[ -z "$added" ]] || docker rm --force --volumes $added >/dev/null
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
    if [[ "$cmd" == remove ]]; then
        [[ $# -eq 1 ]] || die "usage: $0 remove RANK"
        cmd_remove "$1"
        return
    fi
    [[ $# -eq 0 ]] || die "'$cmd' takes no arguments"
    case "$cmd" in
        add) cmd_add ;;
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
