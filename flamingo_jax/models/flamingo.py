"""Flamingo: frozen NFNet → Perceiver Resampler → frozen LM with gated xattn blocks (paper Fig. 3).

The vision encoder is the paper's NFNet or, for OpenFlamingo's weights, an OpenCLIP ViT
(model.vision.kind='open_clip_vit'); both give [.., C] features the resampler flattens per frame.

Submodules live under stable names that parameter regexes select (checkpoints and configs depend
on them): `vision/…` (frozen), `resampler/…` (trainable; the Perceiver Resampler, or the MLP or
Transformer of the paper's ablations, model.resampler.kind), `lm/…` (frozen),
`lm/{groups,tail}/xattn/…` and `lm/new_token_embed` (trainable).

Inputs (see flamingo_jax/data/interleave.py): images [B, N, T, H, W, 3], tokens [B, L],
media_idx [B, L] (1-based index of the image each token attends to, the paper's φ; 0 = none).
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flamingo_jax.models import layers
from flamingo_jax.models import lm as lm_lib
from flamingo_jax.models import nfnet
from flamingo_jax.models import perceiver
from flamingo_jax.models import vit


def lm_config(model_cfg: Any) -> lm_lib.LMConfig:
  """The LM config of a Flamingo model config, with the resampler's R and the model's dtypes."""
  lm_cfg = dict(model_cfg.lm)
  lm_cfg.setdefault("num_latents", model_cfg.resampler.num_latents)
  for key in ("dtype", "param_dtype", "remat_policy", "unroll_layers"):
    if key in model_cfg:
      lm_cfg.setdefault(key, model_cfg[key])
  return lm_lib.make_config(lm_cfg)


class Flamingo(nn.Module):
  """Build with `from_config(config.model)`; every field is a frozen config, so the module is
  hashable (a static jit argument).

  `decode=True` gives the incremental-decoding model: call it once on the prompt (images given) to
  fill the LM's KV cache and every xattn block's visual keys/values, then once per new token with
  images=None (see flamingo_jax/eval/decode.py).
  """
  vision: nfnet.NFNetConfig | vit.ViTConfig
  connector: perceiver.ConnectorConfig
  lm: lm_lib.LMConfig
  dtype: str = "float32"
  param_dtype: str = "float32"
  decode: bool = False

  def setup(self):
    dt = dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))
    if isinstance(self.vision, vit.ViTConfig):
      self.vision_encoder = vit.VisionTransformer(self.vision, **dt, name="vision")
    else:
      self.vision_encoder = nfnet.NFNet(dataclasses.replace(self.vision, **dt), name="vision")
    self.visual_connector = perceiver.connector(self.connector, self.lm.unroll_layers, **dt,
                                                name="resampler")
    self.language_model = lm_lib.LM(self.lm, decode=self.decode, name="lm")

  def vision_features(self, images):
    """images [B, N, T, H, W, 3] -> the vision encoder's features [B, N, T, S, C].

    No stop_gradient: the trainer differentiates only the trainable subtree, so a frozen encoder
    (config.schedule) gets no backward pass, and an unfrozen one (config.unfreeze) trains.
    """
    if images.ndim != 6 or images.shape[-1] != 3:
      raise ValueError(f"images must be [B, N, T, H, W, 3]; got shape {images.shape}.")
    b, n, t, h, w, _ = images.shape
    # NFNet: a grid [BNT, h, w, C]; ViT: patch tokens [BNT, S, C].
    feats = self.vision_encoder(images.reshape(b * n * t, h, w, 3), train=False)
    feats = layers.constrain_batch(feats)
    return feats.reshape(b, n, t, -1, feats.shape[-1])

  def encode_images(self, images):
    """images [B, N, T, H, W, 3] -> visual tokens [B, N, R, D]."""
    return self.visual_connector(self.vision_features(images))

  def __call__(self, images, tokens, media_idx, features=None):
    """-> logits [B, L, V + n_new] (float32).

    images may be None in decode steps after the prompt. `features` [B, N, T, S, C] replaces the
    vision encoder with precomputed features, e.g. from a CLIP ViT for OpenFlamingo.
    """
    if features is not None:
      visual = self.visual_connector(features)
    else:
      visual = None if images is None else self.encode_images(images)
    return self.language_model(tokens, visual, media_idx)


def vision_config(vision_cfg: Any) -> nfnet.NFNetConfig | vit.ViTConfig:
  """The vision encoder's config from `config.model.vision` (see `from_config`)."""
  vision = dict(vision_cfg)
  kind = vision.pop("kind", "nfnet")
  if kind == "nfnet":
    return nfnet.nfnet_config(vision.pop("variant", "F0"), **vision)
  if kind == "open_clip_vit":  # name: one of vit.NAMES; without it, a custom ViT's fields.
    return vit.vit_config(vision.pop("name", None), **vision)
  raise ValueError(f"model.vision.kind={kind!r}: expected 'nfnet' or 'open_clip_vit'.")


def from_config(model_cfg: Any, decode: bool = False) -> Flamingo:
  """A Flamingo module from `config.model` (vision, resampler, lm, dtype, param_dtype,
  remat_policy). vision.kind: 'nfnet' (default; `variant` F0..F7 and NFNetConfig overrides) or
  'open_clip_vit' (`name`, e.g. 'ViT-L-14', and ViTConfig overrides, or no name and every field
  of a custom ViT)."""
  return Flamingo(
      vision=vision_config(model_cfg.vision),
      connector=perceiver.connector_config(model_cfg.resampler),
      lm=lm_config(model_cfg), dtype=model_cfg.get("dtype", "float32"),
      param_dtype=model_cfg.get("param_dtype", "float32"), decode=decode)
