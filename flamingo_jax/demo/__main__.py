"""python -m flamingo_jax.demo --workdir=W [--short] [--mlp] [--seeds=N]: run.py."""
from absl import app
from absl import flags
from absl import logging
import jax

from flamingo_jax import console
from flamingo_jax import host_memory
from flamingo_jax.demo import run

_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Everything the demo writes goes here "
                               "(relative: to the current directory); re-running resumes.")
_SHORT = flags.DEFINE_bool("short", False, "The shortened run of the end-to-end test.")
_MLP = flags.DEFINE_bool("mlp", False, "Stage 3 with the paper's 'Resampler: MLP' ablation over "
                         "one feature per image (configs/demo.py:mlp), not the Perceiver.")

_SEEDS = flags.DEFINE_integer("seeds", 1, "N > 1: stage 1 with N seeds and stage 3 with N seeds on "
                              "each (workdir/seeds/); the report shows the spread over the N x N.")


def main(argv):
  del argv
  console.setup()
  logging.info("XLA:CPU step buffers reused: %s", host_memory.reuse_cpu_step_buffers())
  logging.info("JAX devices: %s", jax.devices())
  print(run.run(_WORKDIR.value, _SHORT.value, _MLP.value, _SEEDS.value))


if __name__ == "__main__":
  app.run(main)
