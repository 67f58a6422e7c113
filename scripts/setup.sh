#!/usr/bin/env bash
# Set up a machine for edgeq: system packages (apt) and a virtual environment.
# Usage: scripts/setup.sh [demo|test]   (test also installs Prometheus and the test extras)
# Idempotent: re-running skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-demo}"
venv="${EDGEQ_VENV:-.venv}"
python="${PYTHON:-python3}"

log() { printf '[setup] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root for: $*  (install sudo or run as root)"; exit 1; fi
}

# --- system packages -------------------------------------------------------
need=()
have_cmd() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
have_cmd mosquitto || need+=(mosquitto)
have_cmd mosquitto_pub || need+=(mosquitto-clients)
have_cmd openssl || need+=(openssl)  # TLS certificates for the production broker (infra/security.py)
# A C compiler and Python's headers build the Q-CNN native kernels (without them edgeq warns and uses numba).
have_cmd gcc || need+=(gcc libc6-dev)
"$python" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  2>/dev/null || need+=(python3-dev)
if [ "$mode" = test ]; then
  have_cmd prometheus || need+=(prometheus)
fi
"$python" -m venv --help >/dev/null 2>&1 && "$python" -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  log "installing with apt-get: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- Python environment ----------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  log "creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
extras="server,bench"
[ "$mode" = test ] && extras="server,bench,dev,train"
stamp="$venv/.edgeq-setup-$extras"
# Reinstall when the build inputs changed: the metadata, or the Q-CNN native kernels' C sources and build
# hook (the editable install compiles edge_workers/qcnn/_fastscan*.so in place; no compiler = numba kernels).
stale() {
  [ -n "$(find pyproject.toml setup.py edge_workers/qcnn/native -newer "$stamp" -print -quit 2>/dev/null)" ] ||
    { have_cmd "${CC:-cc}" && ! compgen -G "edge_workers/qcnn/_fastscan*.so" >/dev/null; }  # compiler, no build yet
}
if [ ! -f "$stamp" ] || stale; then
  log "installing edgeq[$extras] into $venv (torch is pinned to the CPU build 2.13.0)"
  "$venv/bin/python" -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi
log "ready: $venv/bin/edgeq"
