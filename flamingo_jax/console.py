"""What a run prints: flamingo_jax's own lines, not the libraries' chatter.

At the default `--verbosity=0` a run shows its progress (one line per log step), one line per
checkpoint, and every warning of ours; libraries (orbax logs ~40 INFO lines per save, etils,
tensorstore, gcsfs) show only errors. `--verbosity=1` shows everything. On a host with no TPU and
no NVIDIA GPU, JAX is pointed at the CPU before it looks for accelerators: with libtpu installed
(the test extra) it would otherwise print TPU_ACCELERATOR_TYPE/TPU_WORKER_HOSTNAMES warnings.
"""
import logging as std_logging
import os

from absl import logging

_OURS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # The checkout (or site dir).


class _OwnLogs(std_logging.Filter):
  """Below ERROR, keeps records of flamingo_jax (and this checkout's scripts) only."""

  def filter(self, record):
    if record.levelno >= std_logging.ERROR or logging.get_verbosity() >= 1:
      return True
    path = os.path.abspath(record.pathname)
    if f"{os.sep}flamingo_jax{os.sep}" in path:
      return True
    return path.startswith(_OURS) and "site-packages" not in path  # launch.py, experiments/


def _use_cpu_without_accelerators() -> None:
  if "JAX_PLATFORMS" in os.environ:
    return
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  if not hardware_utils.num_available_tpu_chips_and_device_id()[0] and (
      not hardware_utils.has_visible_nvidia_gpu()):
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_platforms", "cpu")


def setup() -> None:
  """Call first in a CLI's main (after absl parsed --verbosity, before JAX touches a device)."""
  _use_cpu_without_accelerators()
  logging.get_absl_handler().addFilter(_OwnLogs())  # Python loggers (gcsfs...) propagate to it.
