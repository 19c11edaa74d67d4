"""Runs launch.py on the tiny config in a subprocess (8 CPU devices, fast-compiling XLA)."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Short runs that checkpoint and log often; every run of a test uses the same ones.
TINY = [f"--config={ROOT / 'flamingo_jax' / 'configs' / 'tiny.py'}", "--config.total_steps=6",
        "--config.ckpt_every=2", "--config.log_every=1", "--config.lr_schedule.warmup_steps=2"]


def cache_options(cache_dir) -> dict[str, str | int]:
  """JAX's compilation-cache options for the tests by jax.config name (the environment variable
  is the name in upper case): every program cached, least recently used ones dropped past 1 GiB
  (the not-slow tier writes ~60 MB in 4,400 programs)."""
  return {"jax_compilation_cache_dir": str(cache_dir),
          "jax_persistent_cache_min_compile_time_secs": 0,
          "jax_compilation_cache_max_size": 2 ** 30}


def env(cache_dir: str, pythonpath: bool = True, extra_env=None) -> dict[str, str]:
  """8 CPU devices, LLVM at -O0 (compiles 3x faster) and a compilation cache shared by runs;
  without `pythonpath`, flamingo_jax is imported as installed, not from the checkout."""
  base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return dict(base, **(extra_env or {}), JAX_PLATFORMS="cpu",
              **{name.upper(): str(value) for name, value in cache_options(cache_dir).items()},
              **({"PYTHONPATH": str(ROOT)} if pythonpath else {}),
              XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                        "--xla_backend_optimization_level=0 "
                        "--xla_llvm_disable_expensive_passes=true")


def command(workdir, *overrides: str) -> list[str]:
  return [sys.executable, str(ROOT / "launch.py"), f"--workdir={workdir}", *TINY, *overrides]


def run(workdir, *overrides: str, cache_dir, check: bool = True, cwd=ROOT,
        pythonpath: bool = True, extra_env=None) -> subprocess.CompletedProcess:
  result = subprocess.run(command(workdir, *overrides), env=env(cache_dir, pythonpath, extra_env),
                          cwd=cwd, capture_output=True, text=True, timeout=600)
  if check and result.returncode:
    raise AssertionError(f"launch.py failed ({result.returncode}):\n{result.stderr[-5000:]}")
  return result


def metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def final_state(workdir, step: int = 6) -> dict:
  """The saved train state (trainable params, optimizer state, step, rng) at `step`, as numpy
  (whatever devices or processes wrote it)."""
  return as_numpy(pathlib.Path(workdir) / "checkpoints" / str(step) / "state")


def as_numpy(path) -> dict:
  """The orbax checkpoint (a state or a params checkpoint) at `path`, as numpy."""
  tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      restore_args=as_numpy))


def compilation_cache(tmp_path_factory) -> pathlib.Path:
  """The JAX compilation cache for the tests' subprocesses: the one conftest gives this process
  (kept across runs), else a directory shared by the pytest-xdist workers of one session."""
  if jax.config.jax_compilation_cache_dir:
    return pathlib.Path(jax.config.jax_compilation_cache_dir)
  base = tmp_path_factory.getbasetemp()
  base = base.parent if base.name.startswith("popen-gw") else base
  path = base / "jax_cache"
  path.mkdir(exist_ok=True)
  return path
