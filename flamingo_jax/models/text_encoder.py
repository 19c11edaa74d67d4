"""BERT-style text tower of the contrastive pretraining (Flamingo App. B.1.3, following ALIGN).

A bidirectional Transformer encoder over SentencePiece tokens with learned positions; pad tokens are
masked out of attention and of the mean pooling, so padding never changes a text's embedding.
Pre-norm layers and a final LayerNorm (steadier than BERT's post-norm when trained from scratch).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flamingo_jax.models import layers

Dtype = Any


def masked_mean(x, mask):
  """Mean of x [B, L, D] over the positions where mask [B, L] is True -> [B, D] (0 if none)."""
  mask = mask.astype(x.dtype)[..., None]
  return (x * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1)


class EncoderLayer(nn.Module):
  """Pre-norm bidirectional self-attention + GeLU MLP, both residual; biases as in BERT."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):  # x: [B, L, D]; mask: [B, L] (True = token) -> [B, L, D]
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"text.num_heads={self.num_heads} does not divide text.dim={d}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dh = d // self.num_heads
    h = layers.norm("layernorm", **kw, name="attn_norm")(x)
    q, k, v = (layers.dense((self.num_heads, dh), ("embed", "heads", "kv"), use_bias=True, **kw,
                            name=name)(h) for name in ("query", "key", "value"))  # [B, L, H, dh]
    h = layers.attention(q, k, v, mask=mask[:, None, None, :])
    x = x + layers.dense(d, ("heads", "kv", "embed"), axis=(-2, -1), use_bias=True, **kw,
                         name="out")(h)
    h = layers.norm("layernorm", **kw, name="mlp_norm")(x)
    h = layers.dense(self.mlp_dim, ("embed", "mlp"), use_bias=True, **kw, name="wi")(h)
    h = layers.activation("gelu")(h)
    return x + layers.dense(d, ("mlp", "embed"), use_bias=True, **kw, name="wo")(h)


class TextEncoder(nn.Module):
  """tokens [B, L] -> mean-pooled features [B, dim] over the non-pad tokens.

  `vocab_size` must cover every id the tokenizer emits, specials included (its
  `total_vocab_size`); `pad_id` is the tokenizer's.
  """
  vocab_size: int
  dim: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  max_len: int
  pad_id: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    if tokens.ndim != 2:
      raise ValueError(f"tokens: expected [B, L], got shape {tokens.shape}.")
    if tokens.shape[1] > self.max_len:
      raise ValueError(f"tokens: length {tokens.shape[1]} exceeds text.max_len={self.max_len}.")
    init = lambda axes: nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
    table = self.param("token_embed", init(("vocab", "embed")), (self.vocab_size, self.dim),
                       self.param_dtype)
    pos = self.param("pos_embed", init(("positions", "embed")), (self.max_len, self.dim),
                     self.param_dtype)
    mask = tokens != self.pad_id  # [B, L]
    x = (jnp.take(table, tokens, axis=0) + pos[:tokens.shape[1]]).astype(self.dtype)  # [B, L, D]
    for i in range(self.num_layers):
      x = EncoderLayer(self.num_heads, self.mlp_dim, self.dtype, self.param_dtype,
                       name=f"layer_{i}")(x, mask)
    x = layers.norm("layernorm", dtype=self.dtype, param_dtype=self.param_dtype,
                    name="final_norm")(x)
    return masked_mean(x.astype(jnp.float32), mask)  # [B, D]
