"""Stage 1 (paper App. B.1.3): contrastive NFNet + text tower on image-text pairs.

Batches are `tokenize_pair` batches: the image is images[:, 0, 0]; the text tower reads the tokens
(their constant <BOS>/<image>/<EOC> ids included; pads are masked).
"""
import jax.numpy as jnp

from flamingo_jax.models import contrastive


def model(config):
  return contrastive.from_config(config.model)


def init_inputs(config):
  return (jnp.zeros((1, config.image_size, config.image_size, 3)), jnp.zeros((1, 8), jnp.int32))


def apply(module, params, batch):
  return module.apply({"params": params}, batch["images"][:, 0, 0], batch["tokens"])


def loss(outputs, batch):
  """(two-term contrastive loss over the batch, 1, its metrics)."""
  del batch
  value, metrics = contrastive.contrastive_loss(*outputs)
  return value, jnp.ones(()), metrics


def load_backbones(config, trainable, frozen):
  del config
  return trainable, frozen


def gate_layers(config):
  del config
  return []


def init_from_data(config, model, trainable, frozen, batches):
  del config, model, frozen, batches
  return trainable
