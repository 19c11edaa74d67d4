"""Parameter counts per component from abstract shapes (jax.eval_shape: nothing is allocated).

python -m flamingo_jax.models.param_count --config=flamingo_jax/configs/flamingo_3b.py
"""
import re

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from flamingo_jax.models import flamingo

COMPONENTS = (  # First match wins; the order matters.
    ("xattn", r"^lm/.*xattn/"),
    ("lm_new_tokens", r"^lm/new_(token_embed|lm_head)"),
    ("lm", r"^lm/"),
    ("vision", r"^vision/"),
    ("resampler", r"^resampler/"),
)


def abstract_params(model_cfg, image_size: int, num_media: int = 1, seq_len: int = 8):
  """The Flamingo parameter tree as ShapeDtypeStructs."""
  model = flamingo.from_config(model_cfg)
  images = jax.ShapeDtypeStruct((1, num_media, 1, image_size, image_size, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, tokens, tokens)
  return nn.unbox(variables["params"])


def count(params) -> dict[str, int]:
  """{component: number of parameters} plus 'total'; every parameter falls in one component."""
  counts = {name: 0 for name, _ in COMPONENTS}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    key = "/".join(p.key for p in path)
    name = next(n for n, pattern in COMPONENTS if re.search(pattern, key))
    counts[name] += int(np.prod(leaf.shape))
  counts["total"] = sum(counts.values())
  return counts


def main(argv):
  del argv
  config = flags.FLAGS.config
  counts = count(abstract_params(config.model, config.image_size))
  for name, n in counts.items():
    print(f"{name:>14}: {n / 1e9:8.3f}B ({n:,})")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
  app.run(main)
