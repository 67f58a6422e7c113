#!/usr/bin/env bash
# The test command: sets the machine up (Mosquitto, Prometheus, venv), checks the code with ruff
# (rules in pyproject.toml), then runs the whole suite. Extra arguments go to pytest, e.g. scripts/test.sh -k wire
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
venv="${EDGEQ_VENV:-.venv}"
"$venv/bin/ruff" check .
exec "$venv/bin/python" -m pytest "$@"
