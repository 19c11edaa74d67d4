"""Small shared helpers for the model tests: tiny models, random inputs, gate setting."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.configs import tiny
from flamingo_jax.models import flamingo


def tiny_model(decode=False, **overrides):
  """The tiny Flamingo with `overrides` applied to config.model (dotted keys allowed)."""
  cfg = tiny.get_model_config()
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return flamingo.from_config(cfg, decode=decode), cfg


def media_idx_from_tokens(tokens, image_id):
  """1-based index of the last <image> at or before each token (0 = none)."""
  return np.cumsum(np.asarray(tokens) == image_id, axis=1).astype(np.int32)


def random_inputs(seed, batch=2, num_media=2, frames=1, size=32, length=12, vocab=64):
  """Images [B, N, T, H, W, 3], tokens with <image> (id vocab) at positions 3 and 7, media_idx."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, num_media, frames, size, size, 3)).astype(np.float32)
  tokens = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
  tokens[:, 3] = vocab
  if num_media > 1:
    tokens[:, 7] = vocab
  return jnp.asarray(images), jnp.asarray(tokens), jnp.asarray(media_idx_from_tokens(tokens, vocab))


def init(model, *args):
  return nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), *args)["params"])


def set_gates(params, value):
  """Every xattn tanh gate parameter set to `value`."""
  def fn(path, leaf):
    name = path[-1].key
    return jnp.full_like(leaf, value) if name in ("attn_gate", "ffw_gate") else leaf
  return jax.tree_util.tree_map_with_path(fn, params)
