"""python -m flamingo_jax.demo --workdir=workdir [--short]: see run.py."""
from absl import app

from flamingo_jax.demo import run

if __name__ == "__main__":
  app.run(run.main)
