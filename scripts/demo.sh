#!/usr/bin/env bash
# The README's main job: sets up .venv, then runs the demo (tokenizer, three training stages,
# few-shot evaluation) into $WORKDIR (default workdir) and writes $WORKDIR/report.md.
# Re-running resumes from the stages' checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh  # Sets VENV.
exec "$VENV/bin/python" -m flamingo_jax.demo --workdir="${WORKDIR:-workdir}" "$@"
