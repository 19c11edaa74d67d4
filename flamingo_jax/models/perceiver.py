"""Perceiver Resampler (Flamingo paper, Sec. 2.1 and Fig. 5).

Maps a variable number of visual features per image/video [B, N, T, S, C] to R visual tokens each,
[B, N, R, D]. A learned time embedding is added per frame (no spatial position encoding) and,
optionally (max_media > 0), one per media index n (OpenFlamingo's `media_time_embs`; the paper has
none: its images are resampled independently). Optionally (center_features), a fixed per-position
mean of the frozen encoder's features is subtracted first (`feature_mean`, below; not the paper's).
The frames are flattened into one set of T·S features x_f, and R learned latents x attend to
concat(x_f, x):
  x += attn(q=x, kv=concat(x_f, x));  x += ffw(x)
for L layers, then a final LayerNorm. Features are linearly projected to D first when C != D.

`connector` builds the module under `resampler/` from config.model.resampler: this resampler
(kind='perceiver', the paper's; configs/flamingo_*.py), `MlpConnector` (kind='mlp') or
`TransformerConnector` (kind='transformer'), the "Resampler: MLP / Transformer" ablations of the
paper's Table 3.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from flamingo_jax.models import layers

Dtype = layers.Dtype


def time_embedding(table, num_frames: int):
  """The learned [T_max, C] table at num_frames rows; linearly interpolated when T > T_max.

  Interpolation lets a model trained on 8 frames run on longer clips at inference (the paper
  evaluates on 30 frames after training on 8).
  """
  t_max = table.shape[0]
  if num_frames <= t_max:
    return table[:num_frames]
  return jax.image.resize(table, (num_frames, table.shape[1]), method="linear")


class PerceiverAttention(nn.Module):
  """Latents attend to the features and to themselves, as OpenFlamingo's PerceiverAttention."""
  num_heads: int
  head_dim: int
  kernel_std: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_f, x):  # x_f: [B, F, D]; x: [B, R, D] -> [B, R, D]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dense_kw = dict(kw, init_std=self.kernel_std)
    proj = lambda name: layers.dense((self.num_heads, self.head_dim), ("embed", "heads", "kv"),
                                     **dense_kw, name=name)
    x_f = layers.norm("layernorm", **kw, name="norm_media")(x_f)
    x = layers.norm("layernorm", **kw, name="norm_latents")(x)
    kv_in = jnp.concatenate([x_f, x], axis=1)
    out = layers.attention(proj("query")(x), proj("key")(kv_in), proj("value")(kv_in))
    return layers.dense(x.shape[-1], ("heads", "kv", "embed"), axis=(-2, -1), **dense_kw,
                        name="out")(out)


class ResamplerLayer(nn.Module):
  num_heads: int
  head_dim: int
  ffw_mult: int
  activation: str
  kernel_std: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, x_f):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + PerceiverAttention(self.num_heads, self.head_dim, self.kernel_std, **kw,
                               name="attn")(x_f, x)
    x = x + layers.FeedForward(self.ffw_mult, self.activation, **kw, name="ffw")(x)
    return x, None


class PerceiverResampler(nn.Module):
  """[B, N, T, S, C] visual features -> [B, N, R, D] visual tokens."""
  dim: int = 1536
  num_layers: int = 6
  num_heads: int = 16
  head_dim: int = 128
  num_latents: int = 64
  max_frames: int = 8
  max_media: int = 0  # > 0: a learned [max_media, C] embedding per media index (OpenFlamingo's).
  ffw_mult: int = 4
  activation: str = "sqrelu"
  latent_std: float = 1.0  # The latents' init std (OpenFlamingo's: N(0, 1)).
  # The init std of the input and attention projections' kernels. 0.02 is the LM's; torch's
  # default Linear init (OpenFlamingo's) is ~1/sqrt(3 fan_in). Why the demo sets 1/sqrt(dim):
  # configs/demo.py.
  kernel_std: float = 0.02
  center_features: bool = False  # Subtract `feature_mean` [S, C] from the features first.
  unroll_layers: bool = False  # As LMConfig.unroll_layers.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features):
    if features.ndim != 5:
      raise ValueError(f"resampler input must be [B, N, T, S, C]; got shape {features.shape}.")
    b, n, t, s, c = features.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    init = lambda axes, std=0.02: nn.with_logical_partitioning(nn.initializers.normal(std), axes)
    if self.center_features:
      # Where a small grid is mostly background (the demo's 4x4), every image's features are
      # nearly the same at each position: after the LayerNorm the latents pool the same tokens
      # for every image, and in-context naming can fail to start (docs/DEMO_RESULTS.md). The
      # per-position mean over images removes that shared part. A statistic of the frozen
      # encoder, not a weight: set from data before step 1 (train/kinds/flamingo.py:
      # init_from_data), kept in the trainable tree so checkpoints carry it, never trained (no
      # gradient; lr 0 in configs/common.py:FLAMINGO_SCHEDULE).
      mean = self.param("feature_mean", nn.with_logical_partitioning(
          nn.initializers.zeros_init(), ("positions", "vis_embed")), (s, c), self.param_dtype)
      features = features - jax.lax.stop_gradient(mean).astype(features.dtype)
    time_table = self.param("time_embed", init(("frames", "vis_embed")), (self.max_frames, c),
                            self.param_dtype)
    x_f = features + time_embedding(time_table, t)[:, None].astype(features.dtype)
    if self.max_media:
      if n > self.max_media:  # Not interpolated: media indices are positions, not a time axis.
        raise ValueError(f"{n} media per sample, but the resampler's media embedding has "
                         f"max_media={self.max_media} rows.")
      media_table = self.param("media_embed", init(("frames", "vis_embed")),
                               (self.max_media, c), self.param_dtype)
      x_f = x_f + media_table[:n, None, None].astype(features.dtype)
    x_f = x_f.reshape(b * n, t * s, c).astype(self.dtype)  # Frames flattened into one set.
    if c != self.dim:
      x_f = layers.dense(self.dim, ("vis_embed", "embed"), **kw, init_std=self.kernel_std,
                         name="input_proj")(x_f)
    latents = self.param("latents", init(("latents", "embed"), self.latent_std),
                         (self.num_latents, self.dim), self.param_dtype)
    x = layers.constrain_batch(
        jnp.broadcast_to(latents.astype(self.dtype), (b * n, self.num_latents, self.dim)))
    x, _ = nn.scan(ResamplerLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=nn.broadcast, length=self.num_layers,
                   unroll=layers.scan_unroll(self.unroll_layers),
                   metadata_params={nn.PARTITION_NAME: "layers"})(
                       self.num_heads, self.head_dim, self.ffw_mult, self.activation,
                       self.kernel_std, **kw, name="layers")(x, x_f)
    x = layers.norm("layernorm", **kw, name="norm")(x)
    return x.reshape(b, n, self.num_latents, self.dim)


class MlpConnector(nn.Module):
  """The ablation's connector: no latents, no attention, one visual token per spatial feature.

  [B, N, T, S, C] -> [B, N, S, D]: frames are averaged (an MLP cannot map a variable number of
  frames to a fixed number of tokens), then Dense(D) → residual FFW → LayerNorm on each feature.
  The xattn blocks need a fixed R per image, so num_latents must equal S.
  """
  dim: int = 1536
  num_latents: int = 64
  ffw_mult: int = 4
  activation: str = "sqrelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _per_feature(features.astype(self.dtype), self.num_latents, "mlp")  # [B, N, S, C]
    x = layers.dense(self.dim, ("vis_embed", "embed"), **kw, name="input_proj")(x)
    x = x + layers.FeedForward(self.ffw_mult, self.activation, **kw, name="ffw")(x)
    return layers.norm("layernorm", **kw, name="norm")(x)


class SelfAttentionLayer(nn.Module):
  """Pre-norm x += attn(x); x += ffw(x) over one image's visual tokens."""
  num_heads: int
  head_dim: int
  ffw_mult: int
  activation: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, _):  # [B, S, D] -> [B, S, D]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = lambda name: layers.dense((self.num_heads, self.head_dim), ("embed", "heads", "kv"),
                                     **kw, name=name)
    h = layers.norm("layernorm", **kw, name="norm")(x)
    out = layers.attention(proj("query")(h), proj("key")(h), proj("value")(h))
    x = x + layers.dense(x.shape[-1], ("heads", "kv", "embed"), axis=(-2, -1), **kw,
                         name="out")(out)
    x = x + layers.FeedForward(self.ffw_mult, self.activation, **kw, name="ffw")(x)
    return x, None


class TransformerConnector(nn.Module):
  """The ablation's Transformer: self-attention over each image's features, no latents.

  [B, N, T, S, C] -> [B, N, S, D]: frames averaged as in `MlpConnector` (one token per spatial
  feature, so num_latents must equal S), Dense(D), L self-attention layers, LayerNorm.
  """
  dim: int = 1536
  num_layers: int = 6
  num_heads: int = 16
  head_dim: int = 128
  num_latents: int = 64
  ffw_mult: int = 4
  activation: str = "sqrelu"
  unroll_layers: bool = False  # As LMConfig.unroll_layers.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _per_feature(features, self.num_latents, "transformer").astype(self.dtype)
    b, n, s, _ = x.shape
    x = layers.dense(self.dim, ("vis_embed", "embed"), **kw, name="input_proj")(x)
    x, _ = nn.scan(SelfAttentionLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=nn.broadcast, length=self.num_layers,
                   unroll=layers.scan_unroll(self.unroll_layers),
                   metadata_params={nn.PARTITION_NAME: "layers"})(
                       self.num_heads, self.head_dim, self.ffw_mult, self.activation, **kw,
                       name="layers")(x.reshape(b * n, s, self.dim), None)
    return layers.norm("layernorm", **kw, name="norm")(x).reshape(b, n, s, self.dim)


def _per_feature(features, num_latents: int, kind: str):
  """[B, N, T, S, C] -> [B, N, S, C], frames averaged, for connectors with a token per feature."""
  if features.ndim != 5:
    raise ValueError(f"resampler input must be [B, N, T, S, C]; got shape {features.shape}.")
  if features.shape[3] != num_latents:
    raise ValueError(f"resampler.kind={kind!r} gives one visual token per spatial feature: set "
                     f"model.resampler.num_latents={features.shape[3]} (S), not {num_latents}.")
  return features.mean(axis=2)


KINDS = ("perceiver", "mlp", "transformer")


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
  """config.model.resampler: what maps visual features to the LM's visual tokens. `kind` is
  'perceiver' (the paper's), 'mlp' or 'transformer' (its ablations, which use no time or media
  embedding; the MLP no attention sizes either)."""
  kind: str = "perceiver"
  dim: int = 1536
  num_layers: int = 6
  num_heads: int = 16
  head_dim: int = 128
  num_latents: int = 64
  max_frames: int = 8
  max_media: int = 0
  ffw_mult: int = 4
  activation: str = "sqrelu"
  latent_std: float = 1.0  # Perceiver only.
  kernel_std: float = 0.02  # Perceiver only.
  center_features: bool = False  # Perceiver only.

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"model.resampler.kind={self.kind!r}; expected one of {KINDS}.")
    if self.center_features and self.kind != "perceiver":
      raise ValueError(f"model.resampler.center_features=True is for kind='perceiver', not "
                       f"{self.kind!r}.")
    if self.max_media < 0:
      raise ValueError(f"model.resampler.max_media={self.max_media}; expected >= 0 (0: none).")


def connector_config(cfg) -> ConnectorConfig:
  """A ConnectorConfig from a dict / ConfigDict, with an error that names any unknown key."""
  cfg = dict(cfg)
  unknown = set(cfg) - {f.name for f in dataclasses.fields(ConnectorConfig)}
  if unknown:
    raise ValueError(f"Unknown model.resampler keys {sorted(unknown)}; expected a subset of "
                     f"{sorted(f.name for f in dataclasses.fields(ConnectorConfig))}.")
  return ConnectorConfig(**cfg)


def connector(cfg: ConnectorConfig, unroll_layers: bool = False, **kwargs) -> nn.Module:
  """The module of `cfg` (kwargs: dtype, param_dtype, name); unroll_layers as the LM's."""
  fields = dataclasses.asdict(cfg)
  del fields["kind"]
  if cfg.kind == "mlp":
    return MlpConnector(**{k: fields[k] for k in ("dim", "num_latents", "ffw_mult", "activation")},
                        **kwargs)
  if cfg.kind == "transformer":
    del fields["max_frames"], fields["max_media"], fields["latent_std"], fields["kernel_std"]
    del fields["center_features"]
    return TransformerConnector(**fields, unroll_layers=unroll_layers, **kwargs)
  return PerceiverResampler(**fields, unroll_layers=unroll_layers, **kwargs)
