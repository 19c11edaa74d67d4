"""launch.py: flags, config overrides, multi-process and TPU pod modes."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flamingo_jax import tpu_pod
import train_helpers as helpers


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return helpers.compilation_cache(tmp_path_factory)


@pytest.mark.slow  # Two launch.py trainings, the first compiling cold: 1-3 minutes on 2 cores.
def test_relative_workdir_trains_saves_the_last_step_and_resumes(tmp_path, cache):
  """From a directory outside the checkout (the installed package, no PYTHONPATH), `--workdir=wd`
  is wd under the current directory; a total that ckpt_every=2 does not divide still ends with its
  last step saved, and the re-run continues from it."""
  result = helpers.run("wd", "--config.total_steps=3", "--config.profile_steps=2,3",
                       cache_dir=cache, cwd=tmp_path, pythonpath=False)
  assert {"2", "3"} <= {p.name for p in (tmp_path / "wd" / "checkpoints").iterdir()}
  # Quiet: our lines only (orbax alone logs ~40 per save), and a profile of steps 2-3.
  ours = ("launch.py", "trainer.py", "metrics.py", "checkpoint.py", "flamingo.py", "profiler.py")
  lines = result.stderr.strip().splitlines()
  assert all(any(f" {name}:" in line for name in ours) for line in lines), result.stderr
  assert len(lines) < 20, result.stderr
  assert list((tmp_path / "wd" / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert all(0 <= m["input_wait_fraction"] <= 1 for m in helpers.metrics(tmp_path / "wd"))
  helpers.run("wd", "--config.total_steps=5", cache_dir=cache, cwd=tmp_path,
              pythonpath=False)
  assert [m["step"] for m in helpers.metrics(tmp_path / "wd")] == [1, 2, 3, 4, 5]
  assert (tmp_path / "wd" / "checkpoints" / "5").is_dir()


@pytest.mark.parametrize("override, message", [
    ("--config.no_such_key=1", "no_such_key"),
    ("--config.total_steps=many", "total_steps"),
])
def test_bad_config_override_names_the_key(tmp_path, cache, override, message):
  result = helpers.run(tmp_path, override, cache_dir=cache, check=False)
  assert result.returncode != 0
  assert message in result.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_no_tpu_warnings_on_a_cpu_host(tmp_path):
  """libtpu (the test extra) prints TPU_ACCELERATOR_TYPE warnings when JAX probes for TPUs; on a
  host with none, console.setup() points JAX at the CPU first."""
  env = {k: v for k, v in helpers.env(tmp_path).items() if k != "JAX_PLATFORMS"}
  code = ("from absl import flags; flags.FLAGS(['x']); from flamingo_jax import console; "
          "console.setup(); import jax; print(jax.devices()[0].platform)")
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, check=True)
  assert result.stdout.strip() == "cpu"
  assert "TPU" not in result.stderr, result.stderr


def test_tpu_pod_dry_run_prints_the_gcloud_commands(tmp_path, cache):
  pod = ["--mode=tpu_pod", "--tpu=my-pod", "--zone=us-central2-b", "--dry_run"]
  lines = helpers.run(tmp_path, *pod, cache_dir=cache).stdout.strip().splitlines()
  assert len(lines) == 5
  assert lines[0].startswith("tar czf") and "files: git ls-files>" in lines[0]
  assert lines[1].startswith("gcloud compute tpus tpu-vm scp") and "--worker=all" in lines[1]
  assert "--recurse" not in lines[1]  # The tarball of git's files, not the directory.
  assert "--worker=all" in lines[2] and "jax[tpu]" in lines[2]
  run = lines[3]
  assert "nohup" in run and "launch.py" in run and "flamingo_jax/configs/tiny.py" in run
  assert "> ~/flamingo_run.log 2>&1" in run and "echo $! > ~/flamingo_run.pid" in run
  assert "--multihost" in run and "--mode" not in run and "--dry_run" not in run
  assert "--pod_action=logs" in lines[4]
  logs = helpers.run(tmp_path, *pod, "--pod_action=logs", cache_dir=cache).stdout
  assert "tail -n 50 ~/flamingo_run.log" in logs and "--worker=all" in logs
  stop = helpers.run(tmp_path, *pod, "--pod_action=stop", cache_dir=cache).stdout
  assert "kill -TERM $(cat ~/flamingo_run.pid)" in stop


def test_tpu_pod_copies_the_code_not_the_venv_or_workdirs(tmp_path):
  """git's files only: tracked and untracked-but-not-ignored, never .venv, .git or a workdir."""
  subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
  (tmp_path / ".gitignore").write_text(".venv/\nworkdir/\n")
  for name in ("launch.py", "flamingo_jax/x.py", ".venv/lib/big.so", "workdir/checkpoints/1/a"):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text("x")
  assert tpu_pod.code_files(str(tmp_path)) == [".gitignore", "flamingo_jax/x.py", "launch.py"]


TWO = ["--mode=local_multiprocess", "--num_processes=2", "--config.total_steps=12",
       "--heartbeat_timeout_s=10"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, cache):
  """An uninterrupted run of two processes (4 devices each), 12 steps."""
  workdir = tmp_path_factory.mktemp("two")
  helpers.run(workdir, *TWO, cache_dir=cache)
  return workdir


@pytest.mark.slow
def test_two_processes_give_the_same_loss_as_one(reference, two_processes):
  """Every step of the session's one-process run (train_helpers.TINY, 6 steps; measured within
  1e-7): the tiny config's learning rate (warmup, then constant) does not depend on total_steps."""
  losses = lambda w: [m["loss"] for m in helpers.metrics(w)]
  assert len(losses(two_processes)) == 12 and len(losses(reference[0])) == 6
  np.testing.assert_allclose(losses(two_processes)[:6], losses(reference[0]), rtol=2e-5)


def _start_two_and_signal(workdir, cache, sig, after_steps: int, *overrides):
  """Starts the two-process run, sends `sig` to process 1 once `after_steps` steps are logged.
  -> (the launcher's Popen, seconds since the signal when it ended, its stderr)."""
  proc = subprocess.Popen(helpers.command(workdir, *TWO, *overrides), env=helpers.env(cache),
                          cwd=helpers.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 400
  while len(helpers.metrics(workdir)) < after_steps:
    assert proc.poll() is None and time.time() < deadline, "the run made no progress"
    time.sleep(0.05)
  children = pathlib.Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
  assert len(children) == 2
  os.kill(int(children[1]), sig)
  signalled = time.time()
  _, stderr = proc.communicate(timeout=300)
  return proc, time.time() - signalled, stderr


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_sigterm_to_one_process_saves_the_same_step_on_both_and_resumes(tmp_path, cache,
                                                                         two_processes):
  """JAX's preemption service spreads the notice: both processes save one agreed step, exit 0."""
  proc, _, stderr = _start_two_and_signal(tmp_path, cache, signal.SIGTERM, 2,
                                          "--config.ckpt_every=100")
  assert proc.returncode == 0, stderr[-3000:]
  *_, stopped = _steps(tmp_path)  # The agreed step (and the first: orbax always saves it).
  assert stopped < 12 and _steps(tmp_path) in ([stopped], [1, stopped])
  assert helpers.metrics(tmp_path)[-1]["step"] == stopped
  helpers.run(tmp_path, *TWO, cache_dir=cache)
  np.testing.assert_array_equal(helpers.metrics(tmp_path)[-1]["loss"],
                                helpers.metrics(two_processes)[-1]["loss"])
  _assert_same_state(helpers.final_state(two_processes, 12), helpers.final_state(tmp_path, 12))


@pytest.mark.slow
def test_sigkill_of_one_process_ends_the_other_quickly_and_the_rerun_resumes(tmp_path, cache,
                                                                            two_processes):
  proc, seconds, stderr = _start_two_and_signal(tmp_path, cache, signal.SIGKILL, 3)
  assert proc.returncode != 0
  assert seconds < 30, f"the survivor took {seconds:.0f} s to stop"
  assert "local_multiprocess: exit codes" in stderr
  helpers.run(tmp_path, *TWO, cache_dir=cache)
  _assert_same_state(helpers.final_state(two_processes, 12), helpers.final_state(tmp_path, 12))


def _assert_same_state(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
