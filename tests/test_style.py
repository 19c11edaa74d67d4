"""The tree's shape, checked as CI checks everything else: the import layering (.importlinter: the
core never imports the demo or the configs) and the one lint configuration (ruff.toml)."""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent


def _run(*command: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_import_layers_hold():
  result = _run(str(BIN / "lint-imports"), "--no-cache")
  assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_finds_nothing():
  result = _run(str(BIN / "ruff"), "check", "--output-format=concise", ".")
  assert result.returncode == 0, result.stdout + result.stderr
