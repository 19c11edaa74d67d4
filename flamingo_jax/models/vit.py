"""OpenCLIP's VisionTransformer (Radford et al., 2021), the frozen image tower of OpenFlamingo.

Matches `open_clip.model.VisionTransformer` in its default form (learned class token and position
table, optional ln_pre, pre-norm blocks of torch MultiheadAttention and a GELU or QuickGELU MLP,
ln_post, `proj`), so `convert/open_clip_vit.py` loads OpenCLIP and OpenAI CLIP weights. The output
is what OpenFlamingo feeds its resampler: `visual.output_tokens = True; visual(x)[1]`, the patch
tokens after ln_post (OpenCLIP normalises every token, then drops the class token).

Logical axis names of the parameters (stacked blocks add a leading 'layers' axis):
  patch kernel ('conv_h', 'conv_w', 'conv_in', 'embed'); class token ('embed',);
  position table ('positions', 'embed'); LayerNorms ('embed',); q/k/v ('embed', 'heads', 'kv');
  attention out ('heads', 'kv', 'embed'); MLP ('embed', 'mlp') and ('mlp', 'embed');
  proj ('embed', None).
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flamingo_jax.models import layers

# OpenAI CLIP's pixel statistics, which OpenCLIP uses by default (open_clip/constants.py).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

ACTIVATIONS = {
    "gelu": layers.activation("gelu"),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),  # OpenAI CLIP's (open_clip QuickGELU).
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """The ViT's hyper-parameters (defaults: ViT-B-16; `vit_config` gives OpenCLIP's by name).

  mean/std: per-channel pixel statistics the weights were trained with (the input pipeline's
    `normalize` pp op takes them); they belong to the weights.
  """
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_ratio: float = 4.0
  activation: str = "gelu"
  norm_eps: float = 1e-5
  ln_pre: bool = True
  output_dim: int = 512
  mean: tuple[float, float, float] = OPENAI_MEAN
  std: tuple[float, float, float] = OPENAI_STD

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r} is unknown; expected one of "
                       f"{sorted(ACTIVATIONS)}.")
    if self.width % self.heads:
      raise ValueError(f"heads={self.heads} must divide width={self.width}.")
    if self.image_size % self.patch_size:
      raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}.")
    for field in ("mean", "std"):
      value = getattr(self, field)
      if not isinstance(value, tuple) or len(value) != 3:
        raise ValueError(f"{field}: expected a tuple of 3 per-channel floats, got {value!r}.")

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


# OpenCLIP's model_configs/*.json (vision_cfg; heads = width / head_width 64; output_dim = the
# model's embed_dim). '-quickgelu' names set quick_gelu: OpenAI's own weights ('openai' tag) were
# trained with QuickGELU, so they need those names.
_MODELS = {
    "ViT-B-32": dict(patch_size=32, width=768, layers=12, heads=12, output_dim=512),
    "ViT-B-16": dict(patch_size=16, width=768, layers=12, heads=12, output_dim=512),
    "ViT-L-14": dict(patch_size=14, width=1024, layers=24, heads=16, output_dim=768),
}
NAMES = tuple(sorted([*_MODELS, *(f"{n}-quickgelu" for n in _MODELS)]))


def vit_config(name: str | None, **overrides) -> ViTConfig:
  """The ViTConfig of OpenCLIP model `name` (e.g. 'ViT-L-14'), with `overrides` applied on top;
  name None: ViTConfig's defaults under the overrides (a custom ViT, every size given)."""
  base = None if name is None else name.removesuffix("-quickgelu")
  if base is not None and base not in _MODELS:
    raise ValueError(f"name: {name!r} is not a supported OpenCLIP ViT; expected one of {NAMES}.")
  unknown = set(overrides) - {f.name for f in dataclasses.fields(ViTConfig)}
  if unknown:
    raise ValueError(f"overrides: unknown ViTConfig fields {sorted(unknown)}.")
  for field in ("mean", "std"):  # Configs may hold lists; the config must stay hashable.
    if field in overrides:
      overrides[field] = tuple(overrides[field])
  if base is None:
    return ViTConfig(**overrides)
  activation = "quick_gelu" if name.endswith("-quickgelu") else "gelu"
  return ViTConfig(**{**_MODELS[base], "activation": activation, **overrides})


def _init(std, axes):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


class ResidualBlock(nn.Module):
  """x + attn(ln_1(x)), then x + mlp(ln_2(x)), with biases everywhere (open_clip
  ResidualAttentionBlock). Returns (x, None) to be scanned."""
  config: ViTConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, L, C] -> [B, L, C]
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
    norm = lambda name: layers.norm("layernorm", eps=cfg.norm_eps, dtype=self.dtype,
                                    param_dtype=self.param_dtype, name=name)
    std = cfg.width ** -0.5
    h = norm("ln_1")(x)
    qkv = [layers.dense((cfg.heads, cfg.width // cfg.heads), ("embed", "heads", "kv"), **kw,
                        init_std=std, name=name)(h) for name in ("query", "key", "value")]
    h = layers.attention(*qkv)  # [B, L, H, D]
    x = x + layers.dense(cfg.width, ("heads", "kv", "embed"), axis=(-2, -1), **kw, init_std=std,
                         name="out")(h)
    h = norm("ln_2")(x)
    h = layers.dense(int(cfg.width * cfg.mlp_ratio), ("embed", "mlp"), **kw, init_std=std,
                     name="c_fc")(h)
    h = ACTIVATIONS[cfg.activation](h)
    x = x + layers.dense(cfg.width, ("mlp", "embed"), **kw, init_std=std, name="c_proj")(h)
    return x, None


class VisionTransformer(nn.Module):
  """OpenCLIP ViT of `config`. `__call__(images [B, S, S, 3] normalised (see `preprocess`))` gives
  the patch tokens [B, (S/patch)², width] OpenFlamingo uses; `embed` gives CLIP's image
  embedding [B, output_dim]. Blocks are one `nn.scan` (compile time independent of depth).
  """
  config: ViTConfig = ViTConfig()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    std = cfg.width ** -0.5
    self.patch_embed = nn.Conv(
        cfg.width, (cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2, padding="VALID",
        use_bias=False, kernel_init=_init(std, ("conv_h", "conv_w", "conv_in", "embed")), **kw)
    self.class_embed = self.param("class_embed", _init(std, ("embed",)), (cfg.width,),
                                  self.param_dtype)
    self.pos_embed = self.param("pos_embed", _init(std, ("positions", "embed")),
                                (cfg.grid ** 2 + 1, cfg.width), self.param_dtype)
    norm = lambda name: layers.norm("layernorm", eps=cfg.norm_eps, **kw, name=name)
    self.ln_pre = norm("ln_pre") if cfg.ln_pre else None
    self.blocks = nn.scan(
        ResidualBlock, variable_axes={"params": 0}, split_rngs={"params": True},
        length=cfg.layers, metadata_params={nn.PARTITION_NAME: "layers"})(cfg, **kw)
    self.ln_post = norm("ln_post")
    self.proj = self.param("proj", _init(std, ("embed", None)), (cfg.width, cfg.output_dim),
                           self.param_dtype)

  def _tokens(self, images):
    """-> every token after ln_post, class token first: [B, 1 + grid², width]."""
    cfg = self.config
    if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"images: expected [B, {cfg.image_size}, {cfg.image_size}, 3] (the "
                       f"config's image_size), got shape {images.shape}.")
    x = self.patch_embed(images.astype(self.dtype))  # [B, grid, grid, C]
    x = x.reshape(x.shape[0], -1, cfg.width)  # Row-major patches, as open_clip's flatten.
    cls = jnp.broadcast_to(self.class_embed.astype(x.dtype), (x.shape[0], 1, cfg.width))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed.astype(x.dtype)
    if self.ln_pre is not None:
      x = self.ln_pre(x)
    x, _ = self.blocks(x)
    return self.ln_post(x)

  def __call__(self, images, train: bool = False):
    """-> patch tokens [B, grid², width]. `train` is NFNet's signature; the ViT has no dropout."""
    del train
    return self._tokens(images)[:, 1:]

  def embed(self, images):
    """-> CLIP's image embedding [B, output_dim]: the class token through `proj`."""
    return self._tokens(images)[:, 0] @ self.proj.astype(self.dtype)
