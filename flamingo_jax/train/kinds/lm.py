"""Stage 2 of the demo: next-token pretraining of the plain decoder (`models/lm.py`, xattn=None).

Batches are the interleave format (`<image>` tokens included, which the plain LM embeds with its
new rows and never predicts); images and media_idx are ignored.
"""
import jax.numpy as jnp

from flamingo_jax.models import lm as lm_lib
from flamingo_jax.train.kinds import flamingo as flamingo_kind


def model(config):
  if config.model.get("xattn") is not None:
    raise ValueError("model_name='lm' trains the plain decoder: set config.model.xattn=None.")
  return lm_lib.LM(lm_lib.make_config(config.model))


def init_inputs(config):
  del config
  return (jnp.zeros((1, 8), jnp.int32),)


def apply(module, params, batch):
  return module.apply({"params": params}, batch["tokens"])


loss = flamingo_kind.loss


def load_backbones(config, trainable, frozen):
  del config
  return trainable, frozen


def gate_layers(config):
  del config
  return []


def init_from_data(config, model, trainable, frozen, batches):
  del config, model, frozen, batches
  return trainable
