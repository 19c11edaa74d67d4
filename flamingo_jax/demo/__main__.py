"""python -m flamingo_jax.demo --workdir=workdir [--short]: the demo's stages (run.py)."""
import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
import jax

from flamingo_jax.demo import run

_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Everything the demo writes goes here "
                               "(relative: to the current directory); re-running resumes.")
_SHORT = flags.DEFINE_bool("short", False, "The shortened run of the end-to-end test.")


class _OwnLogs(std_logging.Filter):
  """Keeps the progress readable: INFO lines from flamingo_jax only (orbax logs every save)."""

  def filter(self, record):
    return (record.levelno >= std_logging.WARNING
            or f"{os.sep}flamingo_jax{os.sep}" in record.pathname)


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_OwnLogs())
  logging.info("JAX devices: %s", jax.devices())
  print(run.run(_WORKDIR.value, _SHORT.value))


if __name__ == "__main__":
  app.run(main)
