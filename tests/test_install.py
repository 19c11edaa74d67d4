"""The package as installed, used from a directory outside the checkout (no PYTHONPATH): the demo's
entry point, the converters' CLI and the configs import, as a notebook would use them."""
import os
import subprocess
import sys

import pytest


def _run(cwd, *args: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300)


@pytest.mark.parametrize("module, flag", [("flamingo_jax.demo", "--workdir"),
                                          ("flamingo_jax.convert", "hf")])
def test_entry_points_answer_help_from_anywhere(tmp_path, module, flag):
  result = _run(tmp_path, "-m", module, "--help")
  # absl's --help exits 1 after printing the usage; argparse's exits 0.
  assert result.returncode in (0, 1) and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert flag in result.stdout


def test_configs_import_from_anywhere(tmp_path):
  code = ("import flamingo_jax; from flamingo_jax.configs import flamingo_3b, tiny; "
          "print(flamingo_3b.get_config().model.lm.num_layers, tiny.get_config().total_steps)")
  result = _run(tmp_path, "-c", code)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["24", "20"]


def test_the_demo_starts_without_torch_and_leaves_it_importable(tmp_path):
  """train/metrics.py imports tensorboardX without torch (3.6 s of each process's start when the
  peers' extra is installed); a later `import torch` still works, and event files are written."""
  pytest.importorskip("torch")
  code = ("import os, sys; import flamingo_jax.demo.run; from flamingo_jax.train import metrics; "
          "assert 'torch' not in sys.modules, 'torch imported'; "
          "w = metrics.summary_writer('tb'); w.add_scalar('a', 1.0, 1); w.close(); "
          "import torch; print(torch.ones(2).sum().item(), len(os.listdir('tb')))")
  result = _run(tmp_path, "-c", code)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["2.0", "1"]
