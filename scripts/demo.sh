#!/usr/bin/env bash
# The main job: sets the machine up, then runs `edgeq demo` (arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh demo
exec "${EDGEQ_VENV:-.venv}/bin/edgeq" demo "$@"
