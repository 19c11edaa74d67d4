"""The fault matrix: each bad input or failure ends in a clear message naming the file or field, and
no earlier checkpoint is lost. (Resume after SIGKILL/SIGTERM, truncated and foreign checkpoints,
unreadable ones and bad mesh/batch/model sizes are in test_checkpoint.py and test_trainer.py;
the gs:// workdir in test_gcs_workdir.py.)"""
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from tokenizers import models
from tokenizers import pre_tokenizers
import tokenizers

from flamingo_jax.configs import flamingo_3b
from flamingo_jax.configs import tiny
from flamingo_jax.eval import evaluate
from flamingo_jax.train import trainer
from flamingo_jax.train import workdir_lock
import train_helpers as helpers


def _equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


# ------------------------------------------------------------------------ the workdir


def test_a_workdir_that_is_a_file_is_named(tmp_path):
  (tmp_path / "run").write_text("not a directory")
  with pytest.raises(NotADirectoryError, match=r"--workdir=.*/run is a file"):
    trainer.train(tiny.get_config(), str(tmp_path / "run"))


def test_a_second_run_on_a_held_workdir_is_refused_naming_the_holder(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path)):  # flock: held per open file, even in-process.
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=rf"in use by another run \(host {socket.gethostname()}, "
                             rf"pid {os.getpid()}, started .*\)"):
      trainer.train(tiny.get_config(), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()  # Nothing interleaved.


def _read_only_directory(tmp_path) -> str:
  if os.geteuid():
    tmp_path.chmod(0o555)
    return str(tmp_path)
  return "/sys/kernel"  # Root writes anywhere a mode allows; sysfs refuses new files to root too.


def test_a_read_only_workdir_is_named(tmp_path):
  workdir = _read_only_directory(tmp_path)
  with pytest.raises(OSError, match=rf"Cannot write the lock file {workdir}/lock \(is the workdir "
                                    r"writable\?\)"):
    trainer.train(tiny.get_config(), workdir)
  tmp_path.chmod(0o755)


def test_the_lock_of_a_dead_run_is_taken_over(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  (tmp_path / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                             "started": "earlier", "command": "killed run"}))
  with workdir_lock.WorkdirLock(str(tmp_path)):
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("record, alive", [
    (dict(host=socket.gethostname(), pid=os.getpid(), heartbeat_age=1), True),
    (dict(host="another-host", pid=1, heartbeat_age=1), True),  # Cannot check it: trust the beat.
    (dict(host="another-host", pid=1, heartbeat_age=700), False),  # Stale heartbeat.
    (dict(host=socket.gethostname(), pid=2 ** 22 + 7, heartbeat_age=1), False),  # No such pid.
])
def test_an_object_store_lock_is_alive_while_its_heartbeat_is_fresh(tmp_path, record, alive):
  """gs:// has no flock: liveness is the heartbeat, or the pid when the holder was on this host."""
  lock = workdir_lock.WorkdirLock("gs://bucket/run", stale_after_s=600)
  text = json.dumps({**record, "heartbeat": time.time() - record["heartbeat_age"],
                     "started": "", "command": ""})
  assert lock._holder_is_alive(text) == alive  # pylint: disable=protected-access


def test_eval_of_an_empty_workdir_says_so_and_creates_nothing(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"No checkpoint in .*/checkpoints: train first"):
    evaluate.evaluate(tiny.get_config(), str(tmp_path))
  assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------ config fields


def _tfds_config(tmp_path, tokenizer=None):
  """The 3B config's input (TFDS, tokenizer) on the tiny model."""
  config = flamingo_3b.get_config()
  config.model = tiny.get_model_config()
  config.mesh = (-1, 1, 1)
  config.input.tokenizer = tokenizer or str(tmp_path / "tokenizer.json")
  for dataset in config.input.datasets.values():
    dataset.tfds_name, dataset.batch_size = "no_such_dataset_xyz", 8
  hf = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, "[UNK]"))
  hf.pre_tokenizer = pre_tokenizers.Whitespace()
  hf.save(str(tmp_path / "tokenizer.json"))
  return config


@pytest.mark.parametrize("tokenizer, message", [
    ("missing.model", r"config.input.tokenizer='.*missing.model' cannot be loaded: "
                      r"FileNotFoundError"),
    ("corrupt.model", r"config.input.tokenizer='.*corrupt.model' cannot be loaded"),
])
def test_a_bad_tokenizer_names_its_field_and_file(tmp_path, tokenizer, message):
  (tmp_path / "corrupt.model").write_bytes(b"\0garbage" * 10)
  with pytest.raises(ValueError, match=message):
    trainer.train(_tfds_config(tmp_path, str(tmp_path / tokenizer)), str(tmp_path / "w"))
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_dataset_that_does_not_exist_names_its_field(tmp_path):
  with pytest.raises(ValueError, match=r"config.input.datasets.\w+.tfds_name='no_such_dataset_xyz'"
                                       r": no such TFDS dataset"):
    trainer.train(_tfds_config(tmp_path), str(tmp_path / "w"))
  assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.parametrize("field, value, message", [
    ("init_from", "/nonexistent/params", r"config.init_from='/nonexistent/params': no parameter "
                                         r"checkpoint there"),
    ("profile_steps", (3, 2), r"config.profile_steps=\(3, 2\); expected \(first, last\)"),
])
def test_a_bad_path_or_setting_is_named(tmp_path, field, value, message):
  config = tiny.get_config()
  config[field] = value
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    trainer.train(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("content, message", [
    ("def get_config(:\n  pass\n", "SyntaxError"),
    (None, "No such file"),
])
def test_a_bad_config_file_is_named_before_anything_is_written(tmp_path, content, message):
  config = tmp_path / "my_config.py"
  if content is not None:
    config.write_text(content)
  result = subprocess.run([sys.executable, str(helpers.ROOT / "launch.py"), f"--config={config}",
                           f"--workdir={tmp_path / 'w'}"], capture_output=True, text=True,
                          env=helpers.env(tmp_path), timeout=120)
  assert result.returncode != 0
  assert "my_config.py" in result.stderr and message in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / "w").exists()


def test_a_converter_refuses_a_pickle_that_runs_code(tmp_path):
  torch = pytest.importorskip("torch")
  from flamingo_jax.convert import state_dict  # pylint: disable=g-import-not-at-top
  marker = tmp_path / "code_ran"

  class Payload:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  torch.save({"w": torch.zeros(2), "payload": Payload()}, tmp_path / "checkpoint.pt")
  with pytest.raises(ValueError, match=r"checkpoint.pt' cannot be read safely"):
    state_dict.read(str(tmp_path / "checkpoint.pt"))
  assert not marker.exists()


# ------------------------------------------------------------------------ failures while training


@pytest.mark.slow
def test_a_checkpoint_of_zero_byte_files_falls_back_to_the_previous(reference, tmp_path):
  ref_dir, cache = reference
  workdir = tmp_path / "w"
  shutil.copytree(ref_dir, workdir)
  for f in (workdir / "checkpoints" / "6").rglob("*"):
    if f.is_file():
      f.write_bytes(b"")
  result = helpers.run(workdir, cache_dir=cache)
  assert "checkpoints/6 cannot be read" in result.stderr
  assert "checkpoints/6/state/_METADATA has 0 bytes" in result.stderr  # Says which file, and why.
  assert "Resuming from" in result.stderr and "checkpoints/4." in result.stderr
  assert (workdir / "checkpoints_corrupt" / "6").exists()
  assert _equal(helpers.final_state(ref_dir), helpers.final_state(workdir))


def _no_file_over(size: int):
  def limit():  # In the child: writes past `size` bytes fail with EFBIG instead of a signal.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
  return limit


@pytest.mark.slow
def test_a_full_disk_during_a_save_stops_the_run_and_keeps_the_last_checkpoint(reference,
                                                                              tmp_path):
  """RLIMIT_FSIZE stands in for a full disk or quota: the save of step 6 fails, the run exits
  non-zero at once (no hang) with the error last, step 4 stays readable and the re-run ends
  where an uninterrupted run does."""
  ref_dir, cache = reference
  workdir = tmp_path / "w"
  helpers.run(workdir, "--config.total_steps=4", cache_dir=cache)
  env = helpers.env(tmp_path / "no_cache")  # Its files would hit the limit too.
  start = time.time()
  result = subprocess.run(helpers.command(workdir), env=env, cwd=helpers.ROOT, text=True,
                          capture_output=True, timeout=600, preexec_fn=_no_file_over(30_000))
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert "Writing a checkpoint under" in last and "File too large" in last, last
  assert "steps [4]" in last or "steps [2, 4]" in last, last
  assert time.time() - start < 300
  helpers.run(workdir, cache_dir=cache)
  assert _equal(helpers.final_state(ref_dir), helpers.final_state(workdir))


@pytest.mark.slow
def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, reference):
  _, cache = reference
  result = helpers.run(tmp_path, "--config.lr=1e30", "--config.optim.grad_clip=0",
                       "--config.total_steps=30", cache_dir=cache, check=False)
  assert result.returncode != 0
  error = [line for line in result.stderr.splitlines() if "FloatingPointError" in line][-1]
  step = int(error.split(" at step ")[1].split()[0])
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and max(saved) < step  # The NaN step is never saved...
  helpers.final_state(tmp_path, max(saved))  # ...and the last one before it reads.
