#!/usr/bin/env bash
# The test command: sets the machine up (Mosquitto, Prometheus, venv), then runs the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k wire
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
exec "${EDGEQ_VENV:-.venv}/bin/python" -m pytest "$@"
