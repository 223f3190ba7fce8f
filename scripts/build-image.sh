#!/usr/bin/env bash
# Builds the container image replikv:<tag> FROM scratch: replikv-server and the replikv
# CLI, the dynamic loader and the shared libraries `ldd` lists for them, and the few files
# name resolution reads. Nothing is pulled, so it builds on a machine with no registry.
# Run with --help for usage.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${IMAGE:-replikv}"
# The uid and gid the servers run as; /data and /tmp belong to them.
RUN_UID=10001

usage() {
    cat <<EOF
usage: $(basename "$0") [TAG]

Builds the image $IMAGE:TAG (TAG defaults to latest) from scratch and prints its size.

Environment:
  BIN_DIR   take replikv-server and replikv from this directory (e.g. target/debug)
            instead of running 'cargo build --release'
  IMAGE     image name (default replikv)
  STRIP=0   keep the binaries' debug information (default: stripped in the image only)

The image runs replikv-server as uid $RUN_UID with /data (a volume) as its working
directory; the CLI is /usr/local/bin/replikv. It has no shell.
EOF
}

die() {
    echo "build-image.sh: $*" >&2
    exit 1
}

case "${1:-}" in
    -h | --help | help)
        usage
        exit 0
        ;;
esac
[[ $# -le 1 ]] || {
    usage >&2
    exit 2
}
TAG="${1:-latest}"
[[ "$TAG" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "'$TAG' is not a valid image tag"

command -v docker >/dev/null || die "docker is not installed"

if [[ -z "${BIN_DIR:-}" ]]; then
    (cd "$REPO_DIR" && cargo build --release -p replikv-server -p replikv-client) ||
        die "cargo build failed"
    BIN_DIR="$(cd "$REPO_DIR" && cargo metadata --format-version 1 --no-deps |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release"
fi
for bin in replikv-server replikv; do
    [[ -x "$BIN_DIR/$bin" ]] || die "$BIN_DIR/$bin is missing; build it or set BIN_DIR"
done

CONTEXT="$(mktemp -d "${TMPDIR:-/tmp}/replikv-image.XXXXXX")"
trap 'rm -rf "$CONTEXT"' EXIT
ROOT="$CONTEXT/rootfs"
mkdir -p "$ROOT/usr/local/bin" "$ROOT/etc" "$CONTEXT/owned/data" "$CONTEXT/owned/tmp"

for bin in replikv-server replikv; do
    cp "$BIN_DIR/$bin" "$ROOT/usr/local/bin/$bin"
    if [[ "${STRIP:-1}" != 0 ]] && command -v strip >/dev/null; then
        strip --strip-debug "$ROOT/usr/local/bin/$bin"
    fi
done

# Every library the binaries load, and the loader itself, at the path the binaries name,
# with symlinks resolved (a scratch image has none of them).
libs="$(for bin in replikv-server replikv; do ldd "$BIN_DIR/$bin"; done |
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)"
[[ -n "$libs" ]] || die "ldd lists no libraries for $BIN_DIR/replikv-server (a static build?)"
for lib in $libs; do
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L "$lib" "$ROOT$lib"
done

# Peers are named by DNS name (docs/design.md §10 "Peer plane"): glibc asks /etc/hosts,
# then the DNS servers of /etc/resolv.conf (which the container runtime provides).
echo "hosts: files dns" >"$ROOT/etc/nsswitch.conf"
echo "replikv:x:$RUN_UID:$RUN_UID:replikv:/data:/nonexistent" >"$ROOT/etc/passwd"
echo "replikv:x:$RUN_UID:" >"$ROOT/etc/group"
chmod 0755 "$CONTEXT/owned/data"
chmod 1777 "$CONTEXT/owned/tmp"

cat >"$CONTEXT/Dockerfile" <<EOF
FROM scratch
COPY rootfs/ /
COPY --chown=$RUN_UID:$RUN_UID owned/ /
USER $RUN_UID:$RUN_UID
WORKDIR /data
VOLUME /data
EXPOSE 7000 7100
ENTRYPOINT ["/usr/local/bin/replikv-server"]
EOF

revision="$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)"
# The classic builder needs no buildx plugin and no base image: FROM scratch pulls nothing.
DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}" docker build --quiet \
    --label "org.opencontainers.image.title=replikv" \
    --label "org.opencontainers.image.revision=$revision" \
    --tag "$IMAGE:$TAG" "$CONTEXT" >/dev/null || die "docker build failed"

size="$(docker image inspect --format '{{.Size}}' "$IMAGE:$TAG")"
echo "built $IMAGE:$TAG from $BIN_DIR: $((size / 1024 / 1024)) MiB ($size bytes)"
