"""Checkpoints, resume and their failure modes (flamingo_jax/train/checkpoint.py, trainer.py)."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.train import checkpoint as ckpt_lib
import train_helpers as helpers


def _tree_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_save_and_load_params_round_trip(tmp_path):
  tree = {"lm": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}}
  ckpt_lib.save_params(str(tmp_path / "p"), tree)
  loaded = ckpt_lib.load_params(str(tmp_path / "p"), jax.eval_shape(lambda: tree))
  assert _tree_equal(tree, loaded) and loaded["lm"]["b"].dtype == jnp.bfloat16


def test_load_params_names_every_mismatch(tmp_path):
  ckpt_lib.save_params(str(tmp_path / "p"), {"a": jnp.zeros((2, 3)), "old": jnp.zeros(1)})
  wanted = {"a": jax.ShapeDtypeStruct((2, 4), jnp.float32),
            "new": jax.ShapeDtypeStruct((1,), jnp.float32)}
  with pytest.raises(ckpt_lib.ShapeMismatchError) as e:
    ckpt_lib.load_params(str(tmp_path / "p"), wanted)
  for text in ("a: checkpoint (2, 3) != model (2, 4)", "new: missing", "old: in the checkpoint"):
    assert text in str(e.value)
  with pytest.raises(FileNotFoundError, match="No parameter checkpoint at"):
    ckpt_lib.load_params(str(tmp_path / "nothing"), wanted)


def _host_tree():
  """Numpy leaves of several dtypes and sizes, nested, with a jax array beside them."""
  rng = np.random.default_rng(0)
  return {"lm": {"w": rng.standard_normal((64, 48)).astype(jnp.bfloat16),
                 "head": rng.standard_normal((37, 11), np.float32).T,  # Not contiguous.
                 "layers": {"k": rng.standard_normal((3, 16, 8), np.float32),
                            "n": np.arange(5, dtype=np.int32), "s": np.array(2.5, np.float32)}},
          "vision": {"b": jnp.linspace(0, 1, 7)}}


def test_streamed_save_restores_bit_exact_and_empties_the_tree(tmp_path, monkeypatch):
  monkeypatch.setattr(ckpt_lib, "_CHUNK_BYTES", 256)  # Many chunks, some of odd shapes.
  tree, expected = _host_tree(), _host_tree()
  ckpt_lib.save_params(str(tmp_path / "p"), tree, consume=True)
  assert tree == {"lm": {"layers": {}}, "vision": {"b": tree["vision"]["b"]}}  # Arrays freed.
  loaded = ckpt_lib.load_params(str(tmp_path / "p"), jax.eval_shape(lambda: expected))
  assert _tree_equal(expected, loaded)
  assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(loaded)))


@pytest.mark.parametrize("consume", [False, True])
def test_an_interrupted_save_leaves_no_checkpoint(tmp_path, monkeypatch, consume):
  """A write failing after the first array (a full disk): SaveError naming the path, nothing at
  the path (orbax renames a temporary directory when complete), and a retry succeeds. Numpy
  leaves only: orbax does not stop the writes of other handlers (jax arrays) when one fails."""
  host_tree = lambda: _host_tree()["lm"]
  write = ckpt_lib.ocp.type_handlers.NumpyHandler._background_serialize
  writes = []
  async def failing_write(self, values, infos, args):
    writes.append(infos[0].name)
    if len(writes) == 2:
      raise OSError("No space left on device")
    await write(self, values, infos, args)
  monkeypatch.setattr(ckpt_lib.ocp.type_handlers.NumpyHandler, "_background_serialize",
                      failing_write)
  path = tmp_path / "p"
  with pytest.raises(ckpt_lib.SaveError, match=f"{path} failed.*No space left on device"):
    ckpt_lib.save_params(str(path), host_tree(), consume=consume)
  assert len(writes) == 2 and not path.exists()
  with pytest.raises(FileNotFoundError, match="No parameter checkpoint at"):
    ckpt_lib.load_params(str(path), jax.eval_shape(host_tree))
  monkeypatch.undo()
  ckpt_lib.save_params(str(path), host_tree(), consume=consume)
  assert _tree_equal(host_tree(), ckpt_lib.load_params(str(path), jax.eval_shape(host_tree)))


_SAVE_THEN_HANG = """
import asyncio, pathlib, sys
import numpy as np
from flamingo_jax.train import checkpoint as ckpt_lib
write = ckpt_lib.ocp.type_handlers.NumpyHandler._background_serialize
async def write_then_hang(self, values, infos, args):
  await write(self, values, infos, args)
  pathlib.Path(sys.argv[2]).touch()  # One array is on disk.
  await asyncio.sleep(300)
ckpt_lib.ocp.type_handlers.NumpyHandler._background_serialize = write_then_hang
ckpt_lib.save_params(sys.argv[1], {"a": np.ones(3), "b": np.zeros(4)}, consume=True)
"""


def test_a_save_killed_midway_leaves_no_checkpoint(tmp_path):
  path, marker = tmp_path / "p", tmp_path / "one_written"
  proc = subprocess.Popen([sys.executable, "-c", _SAVE_THEN_HANG, str(path), str(marker)],
                          cwd=helpers.ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  deadline = time.time() + 120
  while not marker.exists():
    assert proc.poll() is None and time.time() < deadline, "the save never wrote an array"
    time.sleep(0.05)
  proc.kill()
  proc.wait()
  assert not path.exists() and any(tmp_path.glob("p?*"))  # Only a temporary directory.
  ckpt_lib.save_params(str(path), _host_tree())
  assert _tree_equal(_host_tree(), ckpt_lib.load_params(str(path), jax.eval_shape(_host_tree)))


def _start_and_signal(workdir, cache, sig, after_steps):
  """Starts the run, sends `sig` after `after_steps` more logged steps; -> (exit code, stderr)."""
  start = len(helpers.metrics(workdir))
  proc = subprocess.Popen(helpers.command(workdir), env=helpers.env(cache), cwd=helpers.ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while len(helpers.metrics(workdir)) < start + after_steps and proc.poll() is None:
    assert time.time() < deadline, "the run made no progress"
    time.sleep(0.05)
  proc.send_signal(sig)
  _, stderr = proc.communicate(timeout=300)
  return proc.returncode, stderr


@pytest.mark.slow
def test_resume_after_sigkill_and_sigterm_is_bit_identical(reference, tmp_path):
  ref_dir, cache = reference
  code, _ = _start_and_signal(tmp_path, cache, signal.SIGKILL, random.randint(1, 3))
  assert code == -signal.SIGKILL
  code, stderr = _start_and_signal(tmp_path, cache, signal.SIGTERM, 1)
  assert code == 0, stderr[-3000:]
  helpers.run(tmp_path, cache_dir=cache)
  assert _tree_equal(helpers.final_state(ref_dir), helpers.final_state(tmp_path))


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_with_a_warning(reference, tmp_path):
  ref_dir, cache = reference
  workdir = tmp_path / "w"
  shutil.copytree(ref_dir, workdir)
  _truncate_arrays(workdir / "checkpoints" / "6")
  result = helpers.run(workdir, cache_dir=cache)
  assert "checkpoints/6 cannot be read" in result.stderr
  assert (workdir / "checkpoints_corrupt" / "6").exists()
  assert _tree_equal(helpers.final_state(ref_dir), helpers.final_state(workdir))


def _truncate_arrays(step_dir):
  for f in (step_dir / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "ocdbt" in str(f):
      f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])


@pytest.mark.slow
def test_no_readable_checkpoint_is_an_error_until_the_user_starts_over(reference, tmp_path):
  """Losing all progress is never a default: every checkpoint unreadable -> an error naming each,
  nothing moved; the explicit flag moves them aside and trains from step 0."""
  ref_dir, cache = reference
  workdir = tmp_path / "w"
  shutil.copytree(ref_dir, workdir)
  steps = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  for step in steps:
    _truncate_arrays(workdir / "checkpoints" / step)
  result = helpers.run(workdir, cache_dir=cache, check=False)
  assert result.returncode != 0
  assert "UnreadableCheckpointsError" in result.stderr
  for step in steps:
    assert f"step {step}: " in result.stderr
  assert "--config.start_over_if_unreadable=True" in result.stderr
  assert not (workdir / "checkpoints_corrupt").exists()
  assert steps == sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  helpers.run(workdir, "--config.start_over_if_unreadable=True", cache_dir=cache)
  assert sorted(p.name for p in (workdir / "checkpoints_corrupt").iterdir()) == steps
  assert _tree_equal(helpers.final_state(ref_dir), helpers.final_state(workdir))


@pytest.mark.slow
def test_checkpoint_of_another_model_shape_is_an_error_and_kept(reference, tmp_path):
  ref_dir, cache = reference
  workdir = tmp_path / "w"
  shutil.copytree(ref_dir, workdir)
  files = sorted(str(p.relative_to(workdir)) for p in (workdir / "checkpoints").rglob("*"))
  config_json = (workdir / "config.json").read_text()
  result = helpers.run(workdir, "--config.model.resampler.num_latents=8", cache_dir=cache,
                       check=False)
  assert result.returncode != 0
  assert "does not match the model" in result.stderr
  assert "params/resampler/latents: checkpoint (4, 32) != model (8, 32)" in result.stderr
  assert files == sorted(str(p.relative_to(workdir)) for p in (workdir / "checkpoints").rglob("*"))
  assert (workdir / "config.json").read_text() == config_json  # Still the checkpoints' config.
