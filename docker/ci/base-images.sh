#!/usr/bin/env bash
# Stand-ins for the two public base images, made from Debian's own packages, for an engine that reaches no
# image registry (CI here):
#   bp-ci/python:3.11-bookworm     debootstrap --variant=minbase bookworm + python3 (3.11) + python3-venv, with
#                                  a `python` link: what docker/Dockerfile needs of python:3.11.x-slim-bookworm
#   bp-ci/postgres:15-bookworm     that base + Debian's postgresql-15, started like the official postgres image
#                                  (POSTGRES_USER/PASSWORD/DB, PGDATA, docker-entrypoint.sh): docker/ci/Dockerfile.postgres
# The Dockerfiles stay pinned to the official images; these are passed as build arguments / BP_POSTGRES_IMAGE.
# Each image carries a hash of its recipe (label bp.recipe) and is rebuilt only when the recipe changes.
# Needs root (debootstrap) and a running engine; prints the two tags.
#
#   docker/ci/base-images.sh [PYTHON_TAG [POSTGRES_TAG]]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PYTHON_TAG="${1:-bp-ci/python:3.11-bookworm}"
POSTGRES_TAG="${2:-bp-ci/postgres:15-bookworm}"
SUITE=bookworm

log() { echo "base-images: $*" >&2; }

# The mirror this machine's apt uses (deb.debian.org unless its sources say otherwise), and the same sources
# and Acquire settings inside the image, so that apt-get in a build (tini, postgresql) behaves as on the host.
MIRROR="${DEBIAN_MIRROR:-}"
if [ -z "$MIRROR" ] && [ -f /etc/apt/sources.list.d/debian.sources ]; then
    MIRROR="$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
fi
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
APT_ACQUIRE="$(apt-config dump 2>/dev/null | grep -E '^Acquire::Check-(Valid-Until|Date) ' || true)"

recipe_of() { cat "$@" | { cat; echo "$MIRROR"; echo "$APT_ACQUIRE"; } | sha256sum | cut -c1-16; }
has_recipe() {  # image tag, recipe hash
    [ "$(docker image inspect -f '{{index .Config.Labels "bp.recipe"}}' "$1" 2>/dev/null || true)" = "$2" ]
}

# --------------------------------------------------------------------------- python
py_recipe="$(recipe_of "$0")"
if has_recipe "$PYTHON_TAG" "$py_recipe"; then
    log "$PYTHON_TAG is up to date"
else
    command -v debootstrap >/dev/null || { log "needs debootstrap (apt-get install debootstrap)"; exit 1; }
    [ "$(id -u)" = 0 ] || { log "debootstrap needs root"; exit 1; }
    rootfs="$(mktemp -d /tmp/bp-ci-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    log "debootstrap --variant=minbase $SUITE from $MIRROR"
    started=$SECONDS
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$rootfs" "$MIRROR" > "$rootfs.log" 2>&1 || { tail -n 30 "$rootfs.log" >&2; exit 1; }
    rm -f "$rootfs.log"
    # apt sources as in the official image (main, updates, security), on this machine's mirror
    rm -f "$rootfs/etc/apt/sources.list"
    cat > "$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    [ -z "$APT_ACQUIRE" ] || echo "$APT_ACQUIRE" > "$rootfs/etc/apt/apt.conf.d/99bp-ci-host"
    ln -s python3 "$rootfs/usr/bin/python"  # the official image has `python`; docker/Dockerfile uses it
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar --numeric-owner -C "$rootfs" -c . | docker import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        --change "LABEL bp.recipe=$py_recipe" \
        --message "debootstrap --variant=minbase $SUITE + python3 python3-venv ($MIRROR)" \
        - "$PYTHON_TAG" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    log "$PYTHON_TAG made in $((SECONDS - started)) s: $(docker run --rm --network none "$PYTHON_TAG" python --version)"
fi

# --------------------------------------------------------------------------- postgres
pg_recipe="$(recipe_of "$0" "$here/Dockerfile.postgres" "$here/postgres-entrypoint.sh")"
if has_recipe "$POSTGRES_TAG" "$pg_recipe"; then
    log "$POSTGRES_TAG is up to date"
else
    log "building $POSTGRES_TAG from $PYTHON_TAG"
    started=$SECONDS
    # the classic builder: BuildKit would fetch the docker/dockerfile frontend image from a registry
    DOCKER_BUILDKIT=0 docker build --quiet --network host --build-arg "BASE=$PYTHON_TAG" \
        --label "bp.recipe=$pg_recipe" -f "$here/Dockerfile.postgres" -t "$POSTGRES_TAG" "$here" >/dev/null
    log "$POSTGRES_TAG made in $((SECONDS - started)) s"
fi
echo "$PYTHON_TAG"
echo "$POSTGRES_TAG"
