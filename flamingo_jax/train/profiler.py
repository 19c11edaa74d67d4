"""A JAX profiler trace of chosen steps: `--config.profile_steps=A,B` traces steps A..B.

The trace goes to workdir/tensorboard/plugins/profile/, beside the scalars, so one
`tensorboard --logdir=WORKDIR/tensorboard` shows both (its Profile tab needs the `profile` extra:
pip install -e '.[profile]'). JAX's profiler writes local files only, so a gs:// workdir's trace is
written to a local temporary directory and copied over when the last step is done.
"""
import os
import shutil
import tempfile

from absl import logging
from etils import epath
import jax

from flamingo_jax import paths


class StepProfiler:
  """before(step) and after(step, state) around each update step; `step` counts from 1."""

  def __init__(self, steps, workdir: str):
    steps = tuple(steps or ())
    if steps and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
      raise ValueError(f"config.profile_steps={steps}; expected (first, last) with "
                       "1 <= first <= last, e.g. --config.profile_steps=10,12.")
    self._steps = steps
    self._target = f"{workdir}/tensorboard"
    self._local = not paths.is_url(workdir)
    self._dir = None

  def before(self, step: int) -> None:
    if self._steps and step == self._steps[0]:
      self._dir = self._target if self._local else tempfile.mkdtemp(prefix="flamingo_profile_")
      jax.profiler.start_trace(self._dir)

  def after(self, step: int, state) -> None:
    if self._dir is None or step != self._steps[1]:
      return
    jax.block_until_ready(state)  # The traced steps run asynchronously: wait for the last one.
    jax.profiler.stop_trace()
    if not self._local:
      for root, _, files in os.walk(self._dir):
        for name in files:
          src = os.path.join(root, name)
          dst = epath.Path(self._target) / os.path.relpath(src, self._dir)
          dst.parent.mkdir(parents=True, exist_ok=True)
          dst.write_bytes(epath.Path(src).read_bytes())
      shutil.rmtree(self._dir)
    logging.info("Profile of steps %d-%d in %s/plugins/profile (TensorBoard's Profile tab).",
                 *self._steps, self._target)
    self._dir = None
