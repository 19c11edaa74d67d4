"""python -m flamingo_jax.demo --workdir=workdir [--short] [--perceiver]: the demo (run.py)."""
from absl import app
from absl import flags
from absl import logging
import jax

from flamingo_jax import console
from flamingo_jax.demo import run

_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Everything the demo writes goes here "
                               "(relative: to the current directory); re-running resumes.")
_SHORT = flags.DEFINE_bool("short", False, "The shortened run of the end-to-end test.")
_PERCEIVER = flags.DEFINE_bool("perceiver", False, "Stage 3 with the Perceiver Resampler over a "
                               "4x4 feature grid (configs/demo.py:perceiver), not the MLP.")


def main(argv):
  del argv
  console.setup()
  logging.info("JAX devices: %s", jax.devices())
  print(run.run(_WORKDIR.value, _SHORT.value, _PERCEIVER.value))


if __name__ == "__main__":
  app.run(main)
