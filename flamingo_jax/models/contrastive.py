"""Contrastive image-text pretraining of the vision encoder (Flamingo App. B.1.3, ALIGN/CLIP-style).

NFNet image tower and BERT-style text tower, both mean-pooled, linearly projected to a joint
space (paper: 1376 dims) and L2-normalised; a two-term softmax cross-entropy over the batch with
label smoothing and a learnable, log-parameterised inverse temperature. The image tower lives under
`vision/…` with exactly the parameter tree of `flamingo.Flamingo`'s `vision/…` for the same NFNet
config, so stage 3 loads it unchanged as the frozen encoder.

The joint-space axis of the projections is replicated (logical name None): the matrices are small.
"""
import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flamingo_jax.models import layers
from flamingo_jax.models import nfnet
from flamingo_jax.models import text_encoder


def _l2_normalize(x, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class ContrastiveModel(nn.Module):
  """Build with `from_config(config.model)`; `vision` are NFNet fields, `text` TextEncoder fields.

  `__call__(images [B, H, W, 3], tokens [B, L], train)` -> (img_emb [B, E], txt_emb [B, E],
  temperature []): unit-norm float32 embeddings and the inverse temperature that scales their
  cosine similarities, clipped at `max_temperature` (CLIP's 100).
  """
  vision: nfnet.NFNetConfig
  text: dict
  embed_dim: int = 1376
  temperature_init: float = 1 / 0.07
  max_temperature: float = 100.0
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, images, tokens, train: bool = False):
    dt = dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))
    grid = nfnet.NFNet(dataclasses.replace(self.vision, **dt), name="vision")(
        images, train)  # [B, h, w, C]
    img = layers.dense(self.embed_dim, ("vis_embed", None), **dt, name="img_proj")(
        grid.mean(axis=(1, 2)))  # [B, E]
    txt = text_encoder.TextEncoder(**{**dt, **self.text}, name="text")(tokens)  # [B, D]
    txt = layers.dense(self.embed_dim, ("embed", None), **dt, name="txt_proj")(txt)  # [B, E]
    log_temperature = self.param(
        "log_temperature",
        nn.with_logical_partitioning(nn.initializers.constant(math.log(self.temperature_init)), ()),
        (), jnp.float32)
    temperature = jnp.minimum(jnp.exp(log_temperature), self.max_temperature)
    return (_l2_normalize(img.astype(jnp.float32)), _l2_normalize(txt.astype(jnp.float32)),
            temperature)


def contrastive_loss(img_emb, txt_emb, temperature, label_smoothing=0.1):
  """Two-term loss: image→text plus text→image softmax cross-entropy over the batch, summed (ALIGN).

  Row i of each is the positive pair; every other row in the (global) batch is a negative. Targets
  are label-smoothed one-hots, (1 - s)·onehot + s/B. Returns (loss, metrics).
  """
  if img_emb.shape != txt_emb.shape or img_emb.ndim != 2:
    raise ValueError(f"img_emb {img_emb.shape} and txt_emb {txt_emb.shape}: expected both [B, E].")
  logits = temperature * jnp.einsum("ie,te->it", img_emb, txt_emb)  # [B_img, B_txt]
  labels = optax.smooth_labels(jnp.eye(logits.shape[0]), label_smoothing)
  i2t = optax.softmax_cross_entropy(logits, labels).mean()
  t2i = optax.softmax_cross_entropy(logits.T, labels).mean()
  target = jnp.arange(logits.shape[0])
  metrics = dict(
      loss_i2t=i2t, loss_t2i=t2i, temperature=temperature,
      accuracy_i2t=(logits.argmax(axis=1) == target).mean(),
      accuracy_t2i=(logits.argmax(axis=0) == target).mean())
  return i2t + t2i, metrics


def retrieval_recall(img_emb, txt_emb, ks: Sequence[int] = (1, 5)) -> dict[str, jax.Array]:
  """Zero-shot retrieval recall@k both ways, for an eval split of B pairs (pair i = row i).

  A pair's rank counts the other candidates scoring at least as high, so ties count against it
  (collapsed embeddings get recall@1 = 0, not 1).
  """
  sims = jnp.einsum("ie,te->it", img_emb, txt_emb)  # [B_img, B_txt]
  pos = jnp.diag(sims)
  off_diag = ~jnp.eye(sims.shape[0], dtype=bool)
  ranks = dict(i2t=((sims >= pos[:, None]) & off_diag).sum(axis=1),
               t2i=((sims >= pos[None, :]) & off_diag).sum(axis=0))
  return {f"{way}_recall@{k}": (rank < k).mean() for way, rank in ranks.items() for k in ks}


def from_config(model_cfg: Any) -> ContrastiveModel:
  """A ContrastiveModel from `config.model`: vision (variant + NFNet overrides), text (TextEncoder
  fields), embed_dim, and optionally temperature_init, max_temperature, dtype, param_dtype."""
  vision = dict(model_cfg["vision"])
  variant = vision.pop("variant", "F0")
  vision = nfnet.nfnet_config(variant, **vision)
  if vision.num_classes:
    raise ValueError("vision.num_classes: expected 0 (no head), so the `vision` tree loads into "
                     "Flamingo unchanged.")
  text = dict(model_cfg["text"])
  fields = set(text_encoder.TextEncoder.__dataclass_fields__) - {"parent", "name"}
  if set(text) - fields:
    raise ValueError(f"text: unknown TextEncoder fields {sorted(set(text) - fields)}; expected a "
                     f"subset of {sorted(fields)}.")
  optional = {k: model_cfg[k] for k in ("temperature_init", "max_temperature", "dtype",
                                        "param_dtype") if k in model_cfg}
  return ContrastiveModel(vision=vision, text=text, embed_dim=model_cfg["embed_dim"], **optional)
