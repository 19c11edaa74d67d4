"""Flamingo (paper §3): next-token NLL over the target tokens of interleaved sequences.

The frozen vision encoder and LM come from their own checkpoints (`config.vision_init`, a
`{'vision': ...}` tree, and `config.lm_init`, `{'lm': ...}` with the LM's frozen parameters in this
model's layer layout) and are never in the train state.
"""
from absl import logging
from etils import epath
import jax
import jax.numpy as jnp

from flamingo_jax.models import flamingo
from flamingo_jax.models import lm as lm_lib
from flamingo_jax.train import checkpoint as ckpt_lib
from flamingo_jax.train import state as state_lib

BACKBONES = (("vision_init", "vision/"), ("lm_init", "lm/"))  # Frozen parts with their own ckpts.


def model(config):
  for field, _ in BACKBONES:
    if config.get(field) and not epath.Path(config[field]).exists():
      raise FileNotFoundError(f"config.{field}={config[field]!r}: no checkpoint there.")
  return flamingo.from_config(config.model)


def init_inputs(config):
  return (jnp.zeros((1, 1, 1, config.image_size, config.image_size, 3)),
          jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32))


def apply(module, params, batch):
  return module.apply({"params": params}, batch["images"], batch["tokens"], batch["media_idx"])


def next_token_nll(logits, tokens, loss_mask):
  """Sum of -log p(tokens[:, t] | logits[:, t-1]) weighted by loss_mask[:, t]. [B, L, V] -> []."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, L-1]
  return jnp.sum(nll * loss_mask[:, 1:])


def loss(logits, batch):
  """(NLL sum, number of target tokens, {})."""
  return (next_token_nll(logits, batch["tokens"], batch["loss_mask"]),
          jnp.sum(batch["loss_mask"][:, 1:]), {})


def load_backbones(config, trainable, frozen):
  """Frozen parts from their checkpoints. Trainable leaves that a backbone checkpoint also holds
  (stage 2's `lm/new_token_embed` rows for <image> and <EOC>) start from it, so that with gates at
  0 the model is exactly the LM that was trained, new tokens included."""
  for field, prefix in BACKBONES:
    if not config.get(field):
      logging.warning("config.%s is not set: %s* is randomly initialised.", field, prefix)
      continue
    stored = ckpt_lib.stored_leaves(config[field])
    carried = {p: x for p, x in state_lib.flat(trainable).items()
               if p.startswith(prefix) and p in stored}
    part = state_lib.merge(state_lib.subtree(frozen, [prefix]), state_lib.unflat(carried))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            part)
    loaded_trainable, loaded_frozen = state_lib.split(
        ckpt_lib.load_params(config[field], abstract), lambda p: p in carried)
    frozen = state_lib.merge(frozen, loaded_frozen)
    trainable = state_lib.merge(trainable, loaded_trainable)
  return trainable, frozen


def gate_layers(config):
  return lm_lib.xattn_layer_indices(flamingo.lm_config(config.model))
