#!/usr/bin/env bash
# The container checks (`make docker-check`; .ci/run calls this at its end): build docker/Dockerfile for real
# and run it as users do: bp-train / bp-predict / bp-explain on a named volume as the non-root user, `docker
# stop` mid-run (143, a KILLED run, a last.ckpt that a second container resumes), and the compose stack
# (PostgreSQL, the MLflow server, train, predict) on the host's network. Any failure fails the script.
#
# Engine: the one `docker info` reaches (DOCKER_HOST), else, as root, a private dockerd started here with no
# bridge network and no iptables rules (containers use the host's network only, and bind 127.0.0.1), its own
# data root (/var/lib/bp-service-ci, kept: layers are reused by the next run) and socket; stopped on exit.
# Packages it installs when missing (root, apt): docker.io, docker-compose (Debian has no compose v2),
# debootstrap.
# Base images: PYTHON_IMAGE / POSTGRES_IMAGE when set (e.g. the official python:3.11.13-slim-bookworm and
# postgres:16.10-bookworm on an engine that can pull), else stand-ins made from Debian's packages by
# docker/ci/base-images.sh (no registry needed).
# The image builds offline, from docker/wheelhouse/ (`make wheelhouse`), with the classic builder.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
PY="${PY:-$REPO/.venv/bin/python}"
IMAGE="${BP_CHECK_IMAGE:-bp-service:check}"
STATE="${BP_CHECK_STATE:-/var/lib/bp-service-ci}"  # the private engine's data root, its log, a wheelhouse cache
RUNDIR=/run/bp-service-ci
started_all=$SECONDS
phase_start=$SECONDS
timings=()
phase() {  # name of the phase that just ended
    timings+=("$(printf '%-34s %4d s' "$1" $((SECONDS - phase_start)))")
    phase_start=$SECONDS
}
say() { echo "docker-check: $*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {  # packages
    say "installing $* (apt)"
    if [ -z "${APT_UPDATED:-}" ]; then as_root apt-get update -qq; APT_UPDATED=1; fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --------------------------------------------------------------------------- engine
DOCKERD_PID=""  # dockerd's own pid (from its pidfile: `sudo` or a subshell may stand between)
stop_engine() {
    if [ -n "$DOCKERD_PID" ] && as_root kill -0 "$DOCKERD_PID" 2>/dev/null; then
        say "stopping the dockerd started here (pid $DOCKERD_PID)"
        # containers a failed test left behind go first, so that dockerd stops within its own timeout
        docker ps -q | xargs -r docker rm -f >/dev/null 2>&1 || true
        as_root kill -TERM "$DOCKERD_PID"
        for _ in $(seq 60); do as_root kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        if as_root kill -0 "$DOCKERD_PID" 2>/dev/null; then as_root kill -KILL "$DOCKERD_PID"; fi
        # dockerd stops the containerd it started; say so if one outlived it
        if pgrep -f "containerd --config $RUNDIR/exec/" >/dev/null; then say "containerd of $RUNDIR still runs"; fi
    fi
}
trap stop_engine EXIT

command -v docker >/dev/null || apt_install docker.io
if [ -z "${BP_CHECK_PRIVATE_ENGINE:-}" ] && docker info >/dev/null 2>&1; then
    say "using the running engine ($(docker info -f '{{.ServerVersion}}'))"
else
    command -v dockerd >/dev/null || apt_install docker.io
    as_root mkdir -p "$STATE" "$RUNDIR"
    export DOCKER_HOST="unix://$RUNDIR/docker.sock"
    if [ -f "$RUNDIR/dockerd.pid" ] && kill -0 "$(cat "$RUNDIR/dockerd.pid")" 2>/dev/null; then
        say "a dockerd of an earlier check still runs (pid $(cat "$RUNDIR/dockerd.pid")): not started again"
        exit 1
    fi
    as_root rm -f "$RUNDIR/dockerd.pid"
    as_root dockerd --bridge=none --iptables=false --ip6tables=false --ip-masq=false \
        --data-root "$STATE/docker" --exec-root "$RUNDIR/exec" --pidfile "$RUNDIR/dockerd.pid" \
        -H "$DOCKER_HOST" > "$STATE/dockerd.log" 2>&1 &
    for _ in $(seq 120); do
        [ -n "$DOCKERD_PID" ] || DOCKERD_PID="$(cat "$RUNDIR/dockerd.pid" 2>/dev/null || true)"
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    DOCKERD_PID="$(cat "$RUNDIR/dockerd.pid" 2>/dev/null || true)"
    docker info >/dev/null 2>&1 || { tail -n 30 "$STATE/dockerd.log"; say "dockerd did not start"; exit 1; }
    say "dockerd $(docker info -f '{{.ServerVersion}}') started (pid $DOCKERD_PID), networks:" \
        "$(docker network ls --format '{{.Name}}' | sort | tr '\n' ' ')"
    # the point of --bridge=none: no network through which a container could reach beyond the host's
    if docker network ls --format '{{.Driver}}' | grep -qx bridge; then say "a bridge network exists"; exit 1; fi
fi
export DOCKER_BUILDKIT=0  # the classic builder: BuildKit fetches its Dockerfile frontend from a registry
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
    apt_install docker-compose
fi
phase "engine"

# --------------------------------------------------------------------------- base images
if [ -n "${PYTHON_IMAGE:-}" ] && [ -n "${POSTGRES_IMAGE:-}" ]; then
    say "base images as given: $PYTHON_IMAGE, $POSTGRES_IMAGE"
else
    command -v debootstrap >/dev/null || apt_install debootstrap
    mapfile -t bases < <(as_root env DOCKER_HOST="${DOCKER_HOST:-}" bash docker/ci/base-images.sh)
    PYTHON_IMAGE="${PYTHON_IMAGE:-${bases[0]}}"
    POSTGRES_IMAGE="${POSTGRES_IMAGE:-${bases[1]}}"
fi
phase "base images"

# --------------------------------------------------------------------------- the image, offline
# A wheelhouse made for this very lock by an earlier check (kept beside the engine's data) is reused, hard-linked:
# `make wheelhouse` spends most of its time asking the index about 108 files it already has.
lock_hash="$(sha256sum requirements.lock docker/wheelhouse.sh | sha256sum | cut -c1-16)"
cache="$STATE/wheelhouse-$lock_hash"
if [ -f "$cache/.complete" ] && cp -al "$cache"/*.whl docker/wheelhouse/ 2>/dev/null; then
    say "wheelhouse for this lock reused from $cache ($(ls "$cache"/*.whl | wc -l) wheels)"
else
    make --no-print-directory wheelhouse
    if [ -w "$STATE" ] || { [ ! -e "$STATE" ] && [ -w "$(dirname "$STATE")" ]; }; then
        rm -rf "$STATE"/wheelhouse-*
        mkdir -p "$cache" && cp -al docker/wheelhouse/*.whl "$cache"/ && touch "$cache/.complete"
    fi
fi
phase "make wheelhouse"
say "docker build -f docker/Dockerfile --build-arg OFFLINE=1 (base $PYTHON_IMAGE) -t $IMAGE"
# host network: the runtime stage's apt-get (tini) reaches Debian's mirror as the host does; pip needs none.
# The build stage is tagged too, so that pruning what no tag uses keeps its layers for the next run's cache
# and the engine's data root does not grow run after run.
logs="$STATE"; [ -w "$STATE" ] || logs="$(mktemp -d)"
for target in build runtime; do
    tag="$IMAGE"; [ "$target" = runtime ] || tag="$IMAGE-$target"
    build_log="$logs/build-$target.log"
    docker build --network host --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" --build-arg OFFLINE=1 \
        --target "$target" -f docker/Dockerfile -t "$tag" . > "$build_log" 2>&1 \
        || { tail -n 60 "$build_log"; say "docker build failed (log: $build_log)"; exit 1; }
done
say "built $IMAGE: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')," \
    "$(grep -c 'Using cache' "$build_log" || true) steps from cache"
if [ -n "$DOCKERD_PID" ]; then  # our own engine: what no tag needs any more goes
    docker image prune -f > /dev/null
fi
phase "docker build (offline)"

# --------------------------------------------------------------------------- run it
BP_TEST_DOCKER_IMAGE="$IMAGE" BP_TEST_POSTGRES_IMAGE="$POSTGRES_IMAGE" \
    "$PY" -m pytest tests/test_docker.py -m slow -p no:cacheprovider -rs -v
phase "tests/test_docker.py -m slow"

say "timings"
printf '  %s\n' "${timings[@]}"
say "all container checks passed in $((SECONDS - started_all)) s"
