"""NFNet-F0..F7 vision encoder (Brock et al., 2021), Flamingo's frozen image tower (F6).

Matches timm's `dm_nfnet_f*` (DeepMind-weight-compatible) exactly, so `convert/timm_nfnet.py`
loads those checkpoints: deep 'quad' stem, bottleneck blocks with grouped 3x3 convs, scaled
weight-standardised convs with TF "SAME" padding, gamma-scaled GELU, squeeze-excite, SkipInit,
alpha/beta signal-propagation bookkeeping, stochastic depth, and a final 1x1 conv to 2x the last
stage width.

Logical axis names of the parameters:
  conv kernels             ('conv_h', 'conv_w', 'conv_in', 'conv_out')
  conv gains and biases    ('conv_out',)
  squeeze-excite kernels   ('conv_in', 'conv_out'); biases ('conv_out',)
  SkipInit gains           ()  (scalars)
  classification head      kernel ('vis_embed', 'classes'); bias ('classes',)
"""
import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Makes gelu(x) unit-variance for x ~ N(0, 1) (deepmind-research/nfnets; timm's `_nonlin_gamma`).
_GELU_GAMMA = 1.7015043497085571
# SE output gain that restores the signal variance the sigmoid gate halves (timm `NfCfg.attn_gain`).
_SE_GAIN = 2.0
# Stage depths of F0; F_n repeats every stage (n + 1) times.
_F0_DEPTHS = (1, 2, 6, 3)
# ImageNet's pixel statistics, which DeepMind's NFNets (deepmind-research/nfnets) and timm's
# dm_nfnet_* weights were trained with: they bring inputs to mean 0, variance 1 per channel.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_fan_in_normal = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def _gelu(x):
  """GELU (exact erf form, as timm) scaled by gamma to preserve variance."""
  return jax.nn.gelu(x, approximate=False) * _GELU_GAMMA


def _make_divisible(v, divisor=8, round_limit=0.9):
  """timm's channel rounding: nearest multiple of `divisor`, never below `round_limit * v`."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < round_limit * v else new_v


@dataclasses.dataclass(frozen=True)
class NFNetConfig:
  """The NFNet's hyper-parameters (defaults: F0; `nfnet_config` gives F0..F7), one hashable value
  that modules hold and derive with `dataclasses.replace`, as the flax lm1b example does.

  mean/std: per-channel pixel statistics the weights were trained with (the input pipeline's
    `normalize` pp op takes them); they belong to the weights, e.g. (0.5,) * 3 for weights trained
    on value_range(-1, 1) pixels.
  """
  depths: Sequence[int] = _F0_DEPTHS
  channels: Sequence[int] = (256, 512, 1536, 1536)
  # Each stage's stride (its first block's): the grid is H / (4 * prod(strides)). A smaller one
  # gives a finer grid from the same weights (the demo's 4x4 at 32 px: (1, 2, 1, 1)).
  strides: Sequence[int] = (1, 2, 2, 2)
  stem_chs: int = 128
  group_size: int = 128
  bottle_ratio: float = 0.5
  se_ratio: float = 0.5
  num_features: int = 3072
  alpha: float = 0.2
  drop_path_rate: float = 0.0
  std_conv_eps: float = 1e-5
  num_classes: int = 0
  scan_blocks: bool = True
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    for field in ("mean", "std"):
      value = getattr(self, field)
      if not isinstance(value, tuple) or len(value) != 3:
        raise ValueError(f"{field}: expected a tuple of 3 per-channel floats, got {value!r}.")


def nfnet_config(variant: str, **overrides) -> NFNetConfig:
  """NFNet fields for variant 'F0'..'F7' (case-insensitive), with `overrides` applied on top."""
  name = variant.upper()
  if len(name) != 2 or name[0] != "F" or name[1] not in "01234567":
    raise ValueError(f"variant: expected one of F0..F7, got {variant!r}.")
  unknown = set(overrides) - {f.name for f in dataclasses.fields(NFNetConfig)}
  if unknown:
    raise ValueError(f"overrides: unknown NFNet fields {sorted(unknown)}.")
  for field in ("mean", "std", "strides"):  # Configs may hold lists; it must stay hashable.
    if field in overrides:
      overrides[field] = tuple(overrides[field])
  # F_n differs from F0 (NFNetConfig's defaults) only in its depths.
  depths = tuple((int(name[1]) + 1) * d for d in _F0_DEPTHS)
  return NFNetConfig(**{"depths": depths, **overrides})


class StdConv(nn.Module):
  """Conv with scaled weight standardisation and a learnable gain (timm `ScaledStdConv2dSame`).

  The kernel is standardised per output channel and scaled by 1/sqrt(fan_in) in param_dtype, so
  activations keep unit variance without normalisation layers.
  """
  features: int
  kernel_size: int = 1
  strides: int = 1
  groups: int = 1
  eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, C_in] -> [B, H', W', features]
    k, in_chs = self.kernel_size, x.shape[-1]
    if in_chs % self.groups:
      raise ValueError(f"groups: {self.groups} does not divide the {in_chs} input channels.")
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(_fan_in_normal, ("conv_h", "conv_w", "conv_in", "conv_out")),
        (k, k, in_chs // self.groups, self.features), self.param_dtype)
    gain = self.param("gain", nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
                      (self.features,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                      (self.features,), self.param_dtype)
    mean = kernel.mean(axis=(0, 1, 2))
    var = kernel.var(axis=(0, 1, 2))
    fan_in = k * k * in_chs // self.groups
    kernel = (kernel - mean) * jax.lax.rsqrt(var + self.eps) * (gain * fan_in**-0.5)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.conv_general_dilated(
        x, kernel, (self.strides, self.strides), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)
    return y + bias


class SqueezeExcite(nn.Module):
  """Channel gating from globally pooled features (ReLU hidden layer, sigmoid gate)."""
  hidden: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] -> [B, H, W, C]
    dense = lambda n, name: nn.Dense(
        n, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(_fan_in_normal, ("conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))
    s = x.mean(axis=(1, 2))  # [B, C]
    s = dense(x.shape[-1], "fc2")(nn.relu(dense(self.hidden, "fc1")(s)))
    return x * nn.sigmoid(s)[:, None, None, :]


class NFBlock(nn.Module):
  """Pre-activation bottleneck block: 1x1 -> grouped 3x3 -> grouped 3x3 -> 1x1 -> SE, SkipInit.

  `beta` = 1/sqrt(expected input variance) rescales the pre-activation; `alpha` scales the residual.
  """
  features: int
  strides: int = 1
  beta: float = 1.0
  alpha: float = 0.2
  group_size: int = 128
  bottle_ratio: float = 0.5
  se_ratio: float = 0.5
  drop_path_rate: float = 0.0
  eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):  # [B, H, W, C_in] -> [B, H/s, W/s, features]
    mid = _make_divisible(self.features * self.bottle_ratio)
    groups = mid // self.group_size
    if self.group_size % 8 == 0:
      mid = self.group_size * groups  # timm rounds the bottleneck to whole groups.
    if groups == 0 or mid % self.group_size:
      raise ValueError(f"group_size: {self.group_size} must divide the bottleneck width {mid} "
                       f"(features {self.features} x bottle_ratio {self.bottle_ratio}).")
    conv = lambda n, name, k=1, s=1, g=1: StdConv(
        n, k, s, g, self.eps, self.dtype, self.param_dtype, name=name)

    out = _gelu(x) * self.beta
    shortcut = x
    if x.shape[-1] != self.features or self.strides != 1:
      if self.strides != 1:
        s = (self.strides, self.strides)
        out_pooled = nn.avg_pool(out, s, s, padding="SAME", count_include_pad=False)
      else:
        out_pooled = out
      shortcut = conv(self.features, "downsample")(out_pooled)

    out = conv(mid, "conv1")(out)
    out = conv(mid, "conv2", 3, self.strides, groups)(_gelu(out))
    out = conv(mid, "conv2b", 3, 1, groups)(_gelu(out))
    out = conv(self.features, "conv3")(_gelu(out))
    hidden = _make_divisible(self.features * self.se_ratio, round_limit=0.0)
    out = _SE_GAIN * SqueezeExcite(hidden, self.dtype, self.param_dtype, name="se")(out)

    if train and self.drop_path_rate > 0:
      keep = 1.0 - self.drop_path_rate
      mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (out.shape[0], 1, 1, 1))
      out = jnp.where(mask, out / keep, 0).astype(out.dtype)
    skipinit_gain = self.param(
        "skipinit_gain", nn.with_logical_partitioning(nn.initializers.zeros, ()), (),
        self.param_dtype)
    return out * skipinit_gain.astype(out.dtype) * self.alpha + shortcut


class NFNet(nn.Module):
  """Normaliser-free ResNet (NFNet-F) of `config` (default F0; `nfnet_config` for F0..F7).

  `__call__(images [B, H, W, 3], train)` returns the feature grid [B, H/32, W/32, num_features]
  (after the final conv and activation, before pooling); with `num_classes` > 0 it returns
  (grid, logits [B, num_classes]) from a mean-pooled linear head. Stochastic depth is active only
  with `train=True` and needs the 'dropout' rng; its rate grows linearly over blocks to
  `drop_path_rate`, as in timm. `scan_blocks` compiles each stage's same-shape blocks as one scan.
  """
  config: NFNetConfig = NFNetConfig()

  def _same_shape_blocks(self, blocks, x, train):
    """Blocks 1.. of a stage, which share their shapes.

    With `scan_blocks`, one lax.scan over their stacked parameters: XLA then compiles one block
    body per stage instead of all 84 blocks of F6 (two thirds of a Flamingo update step's HLO
    ops; benchmarks/AOT.md). Parameters keep their per-block names (checkpoints, converters and
    AGC see plain conv kernels); initialisation and stochastic depth run the blocks one by one.
    """
    cfg = self.config
    if not blocks or not cfg.scan_blocks or self.is_initializing() or (
        train and cfg.drop_path_rate > 0):
      for block in blocks:
        x = block(x, train)
      return x
    params = jax.tree.map(lambda *p: jnp.stack(p),
                          *(self.variables["params"][block.name] for block in blocks))
    betas = jnp.asarray([block.beta for block in blocks], x.dtype)
    body = lambda x, p_beta: (blocks[0].clone(parent=None, beta=p_beta[1]).apply(
        {"params": p_beta[0]}, x), None)
    return jax.lax.scan(body, x, (params, betas))[0]

  @nn.compact
  def __call__(self, images, train: bool = False):
    cfg = self.config
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images: expected [B, H, W, 3], got shape {images.shape}.")
    if not len(cfg.depths) == len(cfg.channels) == len(cfg.strides):
      raise ValueError(f"depths {cfg.depths}, channels {cfg.channels} and strides {cfg.strides} "
                       "differ in length.")
    for field, value in (("stem_chs", cfg.stem_chs), ("num_features", cfg.num_features),
                         *(("channels", c) for c in cfg.channels)):
      if value <= 0 or value % 8:
        raise ValueError(f"{field}: expected a positive multiple of 8, got {value}.")
    conv = lambda n, name, k=1, s=1: StdConv(
        n, k, s, 1, cfg.std_conv_eps, cfg.dtype, cfg.param_dtype, name=name)

    # Stem: four 3x3 convs, stride 4 in total.
    x = images.astype(cfg.dtype)  # [B, H, W, 3]
    for i, (div, stride) in enumerate(zip((8, 4, 2, 1), (2, 1, 1, 2))):
      if i:
        x = _gelu(x)
      x = conv(cfg.stem_chs // div, f"stem_conv{i + 1}", 3, stride)(x)  # [B, H/4, W/4, stem_chs]

    num_blocks = sum(cfg.depths)
    block_idx = 0
    expected_var = 1.0
    for stage, (depth, features, stride) in enumerate(zip(cfg.depths, cfg.channels, cfg.strides)):
      blocks = []
      for b in range(depth):
        blocks.append(NFBlock(
            features, strides=1 if b else stride, beta=expected_var**-0.5,
            alpha=cfg.alpha, group_size=cfg.group_size, bottle_ratio=cfg.bottle_ratio,
            se_ratio=cfg.se_ratio,
            drop_path_rate=cfg.drop_path_rate * block_idx / max(num_blocks - 1, 1),
            eps=cfg.std_conv_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            name=f"stages_{stage}_block_{b}"))
        # Each block adds alpha^2 to the variance; a stage's first block resets it (fresh shortcut).
        expected_var = (1.0 if b == 0 else expected_var) + cfg.alpha**2
        block_idx += 1
      x = self._same_shape_blocks(blocks[1:], blocks[0](x, train), train)

    grid = _gelu(conv(cfg.num_features, "final_conv")(x))  # [B, H/32, W/32, num_features]
    if not cfg.num_classes:
      return grid
    head_init = nn.initializers.normal(0.01)
    logits = nn.Dense(
        cfg.num_classes, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="head",
        kernel_init=nn.with_logical_partitioning(head_init, ("vis_embed", "classes")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)),
    )(grid.mean(axis=(1, 2)))  # [B, num_classes]
    return grid, logits
