"""Test setup: 8 virtual CPU devices for sharding tests, offline peers, torchvision beside CPU
torch."""
import os

import jax
import pytest

from tests import peers
import train_helpers as helpers

# Must happen before jax initialises its backends.
# Fast compiles: tests run many small programs once each, so XLA's expensive passes cost more
# than they save (about 3x on the tiny models).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


peers.patch_torchvision_ops()


def pytest_configure(config):
  """JAX's persistent compilation cache, kept across runs in pytest's cache directory
  (.pytest_cache/d/jax_compilation; `pytest --cache-clear` empties it), for this process and,
  through train_helpers.env, the tests' subprocesses: most of a test's time on CPU is compiling
  small programs, and a re-run then loads them (tests/test_lm.py and test_flamingo.py: 140 -> 51 s).
  A fresh clone (CI) starts with an empty one."""
  if getattr(config, "cache", None) is None:  # -p no:cacheprovider: a cache per session only.
    return
  for name, value in helpers.cache_options(config.cache.mkdir("jax_compilation")).items():
    jax.config.update(name, value)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
  """An uninterrupted run of the tiny config (train_helpers.TINY); its final checkpoint is the
  target of every resume test. -> (workdir, compilation cache)."""
  cache = helpers.compilation_cache(tmp_path_factory)
  workdir = tmp_path_factory.mktemp("reference")
  helpers.run(workdir, cache_dir=cache)
  return workdir, cache
