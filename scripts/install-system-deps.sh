#!/usr/bin/env bash
# Installs the Debian packages that the local stack, the demo and the tests
# need, when they are missing; the one place that lists them (make demo,
# make test and .ci/run all call this first).
#
#   scripts/install-system-deps.sh           install what is missing (root on Debian),
#                                            else print the exact apt-get command, exit 1
#   scripts/install-system-deps.sh --check   only report; exit 1 if anything is missing
#
# Then stops the Debian-packaged redis-server / prometheus services if they
# run (Debian starts them on install; the stack runs its own on their ports).
# FBP_SKIP_SYSTEM_DEPS=1 skips everything (e.g. a non-Debian machine that has
# the programs some other way).
set -euo pipefail

if [ "${FBP_SKIP_SYSTEM_DEPS:-0}" = 1 ]; then
  exit 0
fi
check_only=0
[ "${1:-}" = "--check" ] && check_only=1

# program on PATH -> Debian package that provides it
need=()
want() { command -v "$1" >/dev/null 2>&1 || need+=("$2"); }
want make          make
want redis-server  redis-server     # the stack's Redis and the Redis Cluster nodes
want redis-cli     redis-tools      # redis-cli --cluster create
want prometheus    prometheus
want promtool      prometheus       # tests/test_compose.py, rule tests
want java          openjdk-17-jre-headless   # the Kafka broker (jars come from Maven Central)
want mvn           maven
want kcat          kcat             # tests/test_kcat.py: a non-Python producer
want openssl       openssl          # deploy/security/make_certs.py
want ss            iproute2         # "port taken by ..." messages
want chromium      chromium         # tests/test_live_page.py renders the live page
want docker-compose docker-compose  # tests/test_compose.py validates docker-compose.yml
want dockerd       docker.io        # tests/test_docker.py: a real engine (make test-docker)
want debootstrap   debootstrap      # tests/docker/base-image.sh: the local Debian base image
# The venv: Debian splits ensurepip out of python3.11.
py=$(command -v python3.11 || command -v python3 || true)
if [ -z "$py" ]; then
  need+=(python3.11 python3.11-venv)
elif ! "$py" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  need+=("$(basename "$py")-venv")
fi
# De-duplicate, keep order.
mapfile -t need < <(printf '%s\n' "${need[@]+"${need[@]}"}" | awk 'NF && !seen[$0]++')

stop_packaged_services() {
  # Only the Debian services (their pid files under /run): never the stack's own.
  local svc pidfile
  for svc in redis-server:/run/redis/redis-server.pid prometheus:/run/prometheus/prometheus.pid \
             prometheus-node-exporter:/run/prometheus/prometheus-node-exporter.pid; do
    pidfile=${svc#*:}; svc=${svc%%:*}
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
      echo "stopping the packaged $svc service (the stack runs its own)"
      systemctl stop "$svc" || true
      systemctl disable "$svc" >/dev/null 2>&1 || true
    elif [ -e "$pidfile" ]; then
      echo "stopping the packaged $svc service (the stack runs its own)"
      service "$svc" stop >/dev/null 2>&1 || true
    fi
  done
}

if [ "${#need[@]}" -eq 0 ]; then
  stop_packaged_services
  exit 0
fi
cmd="apt-get install -y --no-install-recommends ${need[*]}"
if [ "$check_only" = 1 ]; then
  echo "missing system packages: ${need[*]}" >&2
  echo "install them with: sudo apt-get update && sudo $cmd" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || [ ! -e /etc/debian_version ]; then
  echo "missing system packages: ${need[*]}" >&2
  if command -v apt-get >/dev/null 2>&1; then
    echo "run as root: sudo apt-get update && sudo $cmd" >&2
    echo "(or: sudo $0)" >&2
  else
    echo "not a Debian/apt system: install the equivalents of: ${need[*]}" >&2
  fi
  exit 1
fi
echo "installing: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${need[@]}"
stop_packaged_services
