#!/usr/bin/env bash
# Creates (or reuses) the virtualenv at $VENV (default .venv; absolute, or relative to the
# repository root) and installs flamingo_jax into it.
# Usage: bash scripts/setup_env.sh [test]   # "test" adds the peers used by parity tests.
# demo.sh and test.sh source it and use $VENV, made absolute here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade uv
# uv does not read pip's configuration: pass on its local wheel folder (it holds the CPU torch build).
FIND_LINKS=$("$VENV/bin/python" -m pip config get global.find-links 2>/dev/null || true)
UV_ARGS=()
[ -n "$FIND_LINKS" ] && UV_ARGS+=(--find-links "$FIND_LINKS")
export VIRTUAL_ENV="$VENV"
if [ "${1:-}" = "test" ]; then
  # --compile-bytecode writes the installed packages' .pyc once: where PYTHONDONTWRITEBYTECODE is
  # set, each of the suite's many processes would otherwise compile its imports again (3.4 s of
  # a 7.7 s `import flamingo_jax.train.trainer, tensorflow_datasets, orbax.checkpoint`).
  "$VENV/bin/uv" pip install -q "${UV_ARGS[@]}" --compile-bytecode -e ".[test]"
  # open-flamingo pins torch==2.0.1; its code runs with the torch above, so install it without deps.
  "$VENV/bin/uv" pip install -q "${UV_ARGS[@]}" --no-deps --compile-bytecode "open-flamingo==2.0.1"
else
  "$VENV/bin/uv" pip install -q "${UV_ARGS[@]}" -e .
fi
