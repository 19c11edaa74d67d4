"""Masked cross-attention and the GATED XATTN-DENSE block (Flamingo paper, Sec. 2.2 and Fig. 4).

Text tokens (queries) attend to the visual tokens produced by the Perceiver Resampler. Which image a
token may see is given by `media_idx` (the paper's φ): the 1-based index of the image the token
attends to, the last `<image>` at or before it, or the next one under M3W's p_next (0 = none;
data/interleave.py). By default a token sees only that image's R tokens (the paper's per-image
masking); `only_attend_immediate=False` is the paper's ablation (all previous images). Tokens with
media_idx 0 get a zero cross-attention output, so they are exactly as the frozen LM computes them.
"""
import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from flamingo_jax.models import layers

Dtype = layers.Dtype


def media_mask(media_idx, num_media: int, num_latents: int, only_attend_immediate: bool):
  """Which visual tokens each text token may attend to.

  media_idx: [B, L] int; visual tokens are laid out image by image, R = num_latents each.
  Returns a bool mask [B, 1, L, N*R].
  """
  key_media = jnp.repeat(jnp.arange(1, num_media + 1), num_latents)  # [N*R]
  q = media_idx[:, :, None]
  allowed = (key_media == q) if only_attend_immediate else (key_media <= q)
  return allowed[:, None]


@dataclasses.dataclass(frozen=True)
class XattnConfig:
  """config.model.lm.xattn. The switches are the paper's ablations (Table 3, §2.3)."""
  every: int = 1  # A block before layer 0 and every n-th layer (Table 3: 1, 2, 4).
  # 'paper' | 'open_flamingo' | 'middle' (one block, before layer num_layers // 2: Table 3's
  # "single in middle"; `every` is then unused).
  placement: str = "paper"
  num_heads: int = 8
  head_dim: int = 128
  ffw_mult: int = 4
  activation: str = "sqrelu"
  only_attend_immediate: bool = True  # Per-image masking; False: all previous images (§2.3).
  norm_kv: bool = True
  gated: bool = True  # tanh gates; False: y += xattn(y, x); y += ffw(y) ("w/o tanh gating").
  # The FFW after the cross-attention; False with gated=False is Table 3's "vanilla xattn", the
  # original Transformer decoder's cross-attention sublayer (y += xattn(y, x) only).
  dense: bool = True

  def __post_init__(self):
    for name in ("only_attend_immediate", "norm_kv", "gated", "dense"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"lm.xattn.{name}={getattr(self, name)!r}; expected True or False.")



class MaskedCrossAttention(nn.Module):
  """Text→visual attention with LayerNorm on queries and (optionally) on keys/values.

  In decode mode the projected visual keys/values are stored in the 'cache' collection (in
  `layers.cache_layout`) on the prompt's call and reused by every later step, which passes
  visual=None.
  """
  num_heads: int
  num_latents: int
  head_dim: int = 128
  only_attend_immediate: bool = True
  norm_kv: bool = True  # The paper normalises keys/values; OpenFlamingo does not.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y, visual, media_idx, decode: bool = False):
    """y [B, L, D]; visual [B, N, R, Dv] or None (decode steps); media_idx [B, L] -> [B, L, D]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = lambda name: layers.dense((self.num_heads, self.head_dim), ("embed", "heads", "kv"),
                                     **kw, name=name)
    if visual is not None:
      b, n, r, dv = visual.shape
      if r != self.num_latents:
        raise ValueError(f"visual tokens per image ({r}) != num_latents ({self.num_latents}).")
      x = visual.reshape(b, n * r, dv)
      if self.norm_kv:
        x = layers.norm("layernorm", **kw, name="norm_kv")(x)
      k, v = proj("key")(x), proj("value")(x)  # [B, N*R, H, Dh]
      if decode:
        k, v = layers.cache_layout(k, v)  # [B, H, Dh, N*R], [B, H, N*R, Dh]
    if decode:
      cached_k = self.variable("cache", "visual_key", lambda: jnp.zeros_like(k))
      cached_v = self.variable("cache", "visual_value", lambda: jnp.zeros_like(v))
      if visual is None:
        k, v = cached_k.value, cached_v.value
      else:
        cached_k.value, cached_v.value = k, v
    elif visual is None:
      raise ValueError("visual features are required outside decode mode.")

    x = layers.norm("layernorm", **kw, name="norm_q")(y)
    q = proj("query")(x)  # [B, L, H, Dh]
    keys = k.shape[-1] if decode else k.shape[1]
    mask = media_mask(media_idx, keys // self.num_latents, self.num_latents,
                      self.only_attend_immediate)
    out = layers.attention(q, k, v, mask=mask, cache_layout=decode)  # [B, L, H, Dh]
    out = jnp.where((media_idx > 0)[:, :, None, None], out, 0)  # No image yet: no visual input.
    return layers.dense(y.shape[-1], ("heads", "kv", "embed"), axis=(-2, -1), **kw,
                        name="out")(out)


class GatedXattnDense(nn.Module):
  """y += tanh(a_attn)·xattn(y, x);  y += tanh(a_ffw)·ffw(y), with scalar gates a initialised at 0.

  At initialisation the block is the identity, so Flamingo starts out equal to the frozen LM.
  `cfg.gated=False` drops the tanh gates and `cfg.dense=False` the FFW (the paper's ablations).
  R = num_latents visual tokens per image come from the resampler.
  """
  cfg: XattnConfig
  num_latents: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y, visual, media_idx, decode: bool = False):
    cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    g_attn = g_ffw = 1.0
    if cfg.gated:
      gate_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ())
      g_attn = jnp.tanh(self.param("attn_gate", gate_init, (), self.param_dtype))
      if cfg.dense:
        g_ffw = jnp.tanh(self.param("ffw_gate", gate_init, (), self.param_dtype))
    attn = MaskedCrossAttention(cfg.num_heads, self.num_latents, cfg.head_dim,
                                cfg.only_attend_immediate, cfg.norm_kv, **kw, name="attn")
    y = y + jnp.asarray(g_attn, y.dtype) * attn(y, visual, media_idx, decode)
    if not cfg.dense:
      return y
    ffw = layers.FeedForward(cfg.ffw_mult, cfg.activation, **kw, name="ffw")
    return y + jnp.asarray(g_ffw, y.dtype) * ffw(y)
