"""launch.py: flags, config overrides, multi-process and TPU pod modes."""
import numpy as np
import pytest

import train_helpers as helpers


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return helpers.shared_dir(tmp_path_factory, "jax_cache")


def test_relative_workdir_trains_saves_the_last_step_and_resumes(tmp_path, cache):
  """From a directory outside the checkout (the installed package, no PYTHONPATH), `--workdir=wd`
  is wd under the current directory; a total that ckpt_every=2 does not divide still ends with its
  last step saved, and the re-run continues from it."""
  helpers.run("wd", "--config.total_steps=3", cache_dir=cache, cwd=tmp_path,
              pythonpath=False)
  assert {"2", "3"} <= {p.name for p in (tmp_path / "wd" / "checkpoints").iterdir()}
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


def test_tpu_pod_dry_run_prints_the_gcloud_commands(tmp_path, cache):
  result = helpers.run(tmp_path, "--mode=tpu_pod", "--tpu=my-pod", "--zone=us-central2-b",
                       "--dry_run", cache_dir=cache)
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 3
  assert lines[0].startswith("gcloud compute tpus tpu-vm scp --recurse")
  assert "--worker=all" in lines[1] and "jax[tpu]" in lines[1]
  assert "launch.py" in lines[2] and "flamingo_jax/configs/tiny.py" in lines[2]
  assert "--multihost" in lines[2] and "--mode" not in lines[2] and "--dry_run" not in lines[2]


@pytest.mark.slow
def test_two_processes_give_the_same_loss_as_one(tmp_path_factory, cache):
  one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
  helpers.run(one, "--config.total_steps=2", cache_dir=cache)
  helpers.run(two, "--config.total_steps=2", "--mode=local_multiprocess", "--num_processes=2",
              cache_dir=cache)
  losses = lambda w: [m["loss"] for m in helpers.metrics(w)]
  assert len(losses(two)) == 2
  np.testing.assert_allclose(losses(two), losses(one), rtol=2e-5)
