#!/usr/bin/env bash
# The README's test command: set up the venv with the test extra, then run the whole suite
# (slow end-to-end tests included) on two worker processes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh test  # Sets VENV.
exec "$VENV/bin/python" -m pytest -n 2 --durations=15 tests "$@"
