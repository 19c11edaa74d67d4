"""The decoder-only language model that Flamingo keeps frozen, with GATED XATTN-DENSE blocks.

One configurable pre-norm Transformer covers the paper's Chinchilla-style LM and the common open
LMs (GPT-2, LLaMA, Mistral, Qwen2, Gemma, GPT-NeoX, MPT, OPT): LayerNorm or RMSNorm, rotary /
learned / ALiBi positions, GELU or gated (SwiGLU, GeGLU) MLPs, multi-head or grouped-query
attention, full or sliding-window causal masks, tied or untied embeddings (optionally scaled by
sqrt(dim)), biases on or off (or on q/k/v only), sequential or parallel residuals.

Layer layout. Gated xattn blocks sit *before* LM layers. The paper places them before layer 0 and
every n-th layer after it (3B: n=1, 24 blocks; 9B: n=4, 10; 80B: n=7 over 80 layers, 12);
OpenFlamingo places them before layer i when (i+1) % n == 0. Both are expressed as
  layers: `prefix` plain layers  → groups: G × (xattn block + n layers)  → tail: xattn + r layers
with prefix = 0 (paper) or n-1 (OpenFlamingo) and G, r = divmod(num_layers - prefix, n). Layers and
groups are `nn.scan`-ned (optionally rematerialised), so compile time does not grow with depth, and
the placement is exact when n does not divide the depth. A plain LM (xattn=None) is all `layers`.
Checkpoints hold the frozen LM once, in the plain layout, which serves every placement: `to_layout`
regroups it for a model's, and `to_plain` reads any layout back (older checkpoints are grouped).

Token embeddings: the frozen table `token_embed` [V, D] plus a small trainable table
`new_token_embed` [n_new, D] for ids V..V+n_new-1 (`<image>`, `<EOC>`, ...), so the new rows learn
while the pretrained ones stay frozen; untied heads get a matching `new_lm_head`.
"""
import dataclasses
import math
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models import layers
from flamingo_jax.models import xattn as xattn_lib


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Hyper-parameters of the LM. Sizes follow the usual names; see the module docstring."""
  vocab_size: int
  dim: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  num_new_tokens: int = 2
  num_kv_heads: int | None = None  # None: multi-head attention.
  head_dim: int | None = None  # None: dim // num_heads.
  norm: str = "layernorm"
  norm_eps: float = 1e-5
  norm_bias: bool = True
  position: str = "rotary"  # 'rotary' | 'learned' | 'alibi' | 'none'
  rotary_pct: float = 1.0  # Fraction of each head rotated (GPT-NeoX uses 0.25).
  rope_theta: float = 10000.0
  alibi_bias_max: float = 8.0
  max_len: int = 2048
  activation: str = "gelu"
  gated_mlp: bool = False  # True with activation='silu' is SwiGLU.
  parallel_residual: bool = False
  tied_embeddings: bool = True
  scale_embeddings: bool = False  # Token embeddings x sqrt(dim), rounded to `dtype` (Gemma).
  use_bias: bool = False
  qkv_bias: bool = False  # Biases on query/key/value only (Qwen2); use_bias puts them everywhere.
  sliding_window: int | None = None  # Each query sees its last `sliding_window` keys (Mistral).
  final_norm: bool = True
  xattn: xattn_lib.XattnConfig | None = None
  num_latents: int = 64  # Visual tokens per image, from the resampler.
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat_policy: str = "none"
  # Unroll the scanned layer stacks (same parameters, same checkpoints): on CPU a step is faster
  # (no per-layer slicing of stacked weights and residuals) and a decoding step reads each weight
  # where it lies (eval/decode.py), but compile time grows with depth; False, one rolled loop, is
  # the TPU default.
  unroll_layers: bool = False

  def __post_init__(self):
    if self.head_dim is None and self.dim % self.num_heads:
      raise ValueError(f"lm.num_heads={self.num_heads} does not divide lm.dim={self.dim}; set "
                       "lm.head_dim or choose a divisor.")
    if self.num_heads % self.kv_heads:
      raise ValueError(f"lm.num_kv_heads={self.num_kv_heads} must divide lm.num_heads="
                       f"{self.num_heads}.")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"lm.sliding_window={self.sliding_window} must be >= 1 (or None: no "
                       "window).")
    if self.position not in ("rotary", "learned", "alibi", "none"):
      raise ValueError(f"lm.position={self.position!r}; expected rotary|learned|alibi|none.")
    layers.activation(self.activation)
    if self.xattn is not None:
      xattn_layout(self.num_layers, self.xattn.every, self.xattn.placement)

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_size(self) -> int:
    return self.head_dim or self.dim // self.num_heads


def make_config(cfg: Any) -> LMConfig:
  """An LMConfig from a dict / ConfigDict, with an error that names any unknown key."""
  cfg = dict(cfg)
  xcfg = cfg.pop("xattn", None)
  for name, cls, given in (("lm", LMConfig, cfg),
                           ("lm.xattn", xattn_lib.XattnConfig, dict(xcfg or {}))):
    unknown = set(given) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"Unknown {name} config keys {sorted(unknown)}; expected a subset of "
                       f"{sorted(f.name for f in dataclasses.fields(cls))}.")
  return LMConfig(**cfg, xattn=None if xcfg is None else xattn_lib.XattnConfig(**dict(xcfg)))


def xattn_layout(num_layers: int, every: int, placement: str) -> tuple[int, int, int]:
  """(prefix plain layers, groups of xattn + `every` layers, layers in the tail group)."""
  if placement not in ("paper", "open_flamingo", "middle"):
    raise ValueError(f"xattn.placement={placement!r}; expected 'paper', 'open_flamingo' or "
                     "'middle'.")
  if placement == "middle":  # One block, in the tail group: before layer num_layers // 2.
    return num_layers // 2, 0, num_layers - num_layers // 2
  if not 1 <= every <= num_layers:
    raise ValueError(f"xattn.every={every} must be in [1, num_layers={num_layers}].")
  prefix = 0 if placement == "paper" else every - 1
  groups, tail = divmod(num_layers - prefix, every)
  return prefix, groups, tail


# LMConfig fields that leave what the LM computes unchanged: its xattn blocks and their inputs,
# precision, memory, and the context length (a learned position table's size is a shape).
_NOT_THE_FUNCTION = ("xattn", "num_latents", "max_len", "dtype", "param_dtype", "remat_policy",
                     "unroll_layers")
# Fields that act only with one value of another: field -> (other field, value).
_ONLY_WITH = {"norm_bias": ("norm", "layernorm"), "qkv_bias": ("use_bias", False),
              "rotary_pct": ("position", "rotary"),
              "rope_theta": ("position", "rotary"), "alibi_bias_max": ("position", "alibi")}


def forward_fields(cfg: LMConfig) -> dict[str, Any]:
  """The fields that set what the LM computes, defaults resolved and inactive options left out:
  configs with equal forward_fields give equal logits from equal parameters."""
  out = {}
  for f in dataclasses.fields(cfg):
    other, value = _ONLY_WITH.get(f.name, (None, None))
    if f.name not in _NOT_THE_FUNCTION and (other is None or getattr(cfg, other) == value):
      out[f.name] = getattr(cfg, f.name)
  return out | {"num_kv_heads": cfg.kv_heads, "head_dim": cfg.head_size}


def xattn_layer_indices(cfg: LMConfig) -> list[int]:
  """0-based indices of the LM layers that a gated xattn block precedes."""
  if cfg.xattn is None:
    return []
  prefix, groups, tail = xattn_layout(cfg.num_layers, cfg.xattn.every, cfg.xattn.placement)
  return [prefix + g * cfg.xattn.every for g in range(groups + (tail > 0))]


def rotary(x, positions, rotary_dim: int, theta: float):
  """Rotary embedding (rotate-half layout, as HF LLaMA/GPT-NeoX) of the first rotary_dim dims.

  x: [B, L, H, D]; positions: [B, L].
  """
  inv_freq = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim)
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, L, rd/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None]
  xr, xp = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
  x1, x2 = jnp.split(xr, 2, axis=-1)
  xr = xr * cos + jnp.concatenate([-x2, x1], -1) * sin
  return jnp.concatenate([xr.astype(x.dtype), xp], -1)


def alibi_slopes(num_heads: int, bias_max: float) -> np.ndarray:
  """ALiBi head slopes, as MPT computes them (also for head counts that are not powers of 2)."""
  n = 2 ** math.ceil(math.log2(num_heads))
  slopes = 1.0 / 2 ** (np.arange(1, n + 1) * (bias_max / n))
  if n != num_heads:
    slopes = np.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
  return slopes.astype(np.float32)


class SelfAttention(nn.Module):
  """Causal self-attention; in decode mode keys/values go to a fixed-size cache in 'cache'.

  key_mask [B, S] (True = a real token; S = L, or the cache length in decode mode) hides padding
  keys, e.g. the left padding of batched prompts of different lengths (eval/decode.py).
  """
  cfg: LMConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, key_mask=None):  # x: [B, L, D]; positions: [B, L]
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
              use_bias=cfg.use_bias)
    dh = cfg.head_size
    qkv = kw | dict(use_bias=cfg.use_bias or cfg.qkv_bias)
    q = layers.dense((cfg.num_heads, dh), ("embed", "heads", "kv"), **qkv, name="query")(x)
    k = layers.dense((cfg.kv_heads, dh), ("embed", "kv_heads", "kv"), **qkv, name="key")(x)
    v = layers.dense((cfg.kv_heads, dh), ("embed", "kv_heads", "kv"), **qkv, name="value")(x)
    if cfg.position == "rotary":
      rd = int(dh * cfg.rotary_pct)
      q, k = (rotary(t, positions, rd, cfg.rope_theta) for t in (q, k))

    b, l = x.shape[:2]
    q_slot = jnp.arange(l)  # Where each query sits in the key sequence.
    cached = False  # Whether k, v are the whole cache, in `layers.cache_layout`.
    if self.decode:
      k_new, v_new = layers.cache_layout(k, v)  # [B, K, D, L], [B, K, L, D]
      initialised = self.has_variable("cache", "cached_key")
      ck = self.variable("cache", "cached_key", jnp.zeros, k_new.shape, k.dtype)
      cv = self.variable("cache", "cached_value", jnp.zeros, v_new.shape, v.dtype)
      ci = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      if initialised:  # Write this chunk at the cache index; attend over the whole cache.
        idx = ci.value
        ck.value = jax.lax.dynamic_update_slice(ck.value, k_new, (0, 0, 0, idx))
        cv.value = jax.lax.dynamic_update_slice(cv.value, v_new, (0, 0, idx, 0))
        ci.value = idx + l
        k, v, q_slot, cached = ck.value, cv.value, idx + q_slot, True
    k_slot = jnp.arange(k.shape[-1] if cached else k.shape[1])
    mask = k_slot[None, :] <= q_slot[:, None]  # [L, S]
    if cfg.sliding_window is not None:  # Slot distances are position distances (pads sit left).
      mask = mask & (k_slot[None, :] > q_slot[:, None] - cfg.sliding_window)
    mask = mask[None, None]  # [1, 1, L, S]
    if key_mask is not None:
      mask = mask & key_mask[:, None, None, :]  # [B, 1, L, S]
    bias = None
    if cfg.position == "alibi":
      slopes = jnp.asarray(alibi_slopes(cfg.num_heads, cfg.alibi_bias_max))
      bias = -slopes[None, :, None, None] * (q_slot[:, None] - k_slot[None, :])[None, None]
    out = layers.attention(q, k, v, mask=mask, bias=bias, cache_layout=cached)
    return layers.dense(cfg.dim, ("heads", "kv", "embed"), axis=(-2, -1), **kw, name="out")(out)


class Mlp(nn.Module):
  cfg: LMConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
              use_bias=cfg.use_bias)
    h = layers.activation(cfg.activation)(
        layers.dense(cfg.mlp_dim, ("embed", "mlp"), **kw, name="wi")(x))
    if cfg.gated_mlp:
      h = h * layers.dense(cfg.mlp_dim, ("embed", "mlp"), **kw, name="wi_up")(x)
    return layers.dense(cfg.dim, ("mlp", "embed"), **kw, name="wo")(h)


class DecoderLayer(nn.Module):
  """Pre-norm block: x += attn(norm(x)); x += mlp(norm(x)) (or both from x when parallel)."""
  cfg: LMConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, key_mask=None):
    cfg = self.cfg
    x = layers.constrain_batch(x)
    nkw = dict(eps=cfg.norm_eps, use_bias=cfg.norm_bias, dtype=jnp.dtype(cfg.dtype),
               param_dtype=jnp.dtype(cfg.param_dtype))
    a = SelfAttention(cfg, self.decode, name="attn")(
        layers.norm(cfg.norm, **nkw, name="norm_attn")(x), positions, key_mask)
    if cfg.parallel_residual:
      x = x + a + Mlp(cfg, name="mlp")(layers.norm(cfg.norm, **nkw, name="norm_mlp")(x))
    else:
      x = x + a
      x = x + Mlp(cfg, name="mlp")(layers.norm(cfg.norm, **nkw, name="norm_mlp")(x))
    return x, None


def _layer_stack(cfg: LMConfig, length: int, decode: bool, name: str):
  """`length` DecoderLayers scanned, with stacked parameters on a leading 'layers' axis."""
  return nn.scan(
      layers.remat(DecoderLayer, cfg.remat_policy),
      variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
      in_axes=nn.broadcast, length=length, unroll=layers.scan_unroll(cfg.unroll_layers),
      metadata_params={nn.PARTITION_NAME: "layers"},
  )(cfg, decode, name=name)


class XattnGroup(nn.Module):
  """A gated xattn block followed by `length` frozen LM layers."""
  cfg: LMConfig
  length: int
  decode: bool = False

  @nn.compact
  def __call__(self, x, visual, media_idx, positions, key_mask=None):
    cfg, xc = self.cfg, self.cfg.xattn
    x = layers.constrain_batch(x)
    block = layers.remat(xattn_lib.GatedXattnDense, cfg.remat_policy, static_argnums=(4,))
    x = block(xc, cfg.num_latents, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype),
              name="xattn")(x, visual, media_idx, self.decode)
    x, _ = _layer_stack(cfg, self.length, self.decode, "layers")(x, positions, key_mask)
    return x, None


class LM(nn.Module):
  """tokens [B, L] (+ visual [B, N, R, Dv], media_idx [B, L]) -> logits [B, L, V + n_new] float32.

  `decode=True` runs incrementally: the first call (on the prompt, visual given) fills the KV cache
  and the visual keys/values; later calls pass the new tokens and visual=None. Batched prompts of
  different lengths are left-padded and pass per-row `positions` and a `key_mask` over the cache.
  """
  cfg: LMConfig
  decode: bool = False

  def embed(self, tokens):
    cfg = self.cfg
    init = lambda axes: nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
    pdt = jnp.dtype(cfg.param_dtype)
    table = self.param("token_embed", init(("vocab", "embed")), (cfg.vocab_size, cfg.dim), pdt)
    x = jnp.take(table, jnp.clip(tokens, 0, cfg.vocab_size - 1), axis=0)
    new_table = None
    if cfg.num_new_tokens:
      new_table = self.param("new_token_embed", init((None, "embed")),
                             (cfg.num_new_tokens, cfg.dim), pdt)
      new_ids = jnp.clip(tokens - cfg.vocab_size, 0, cfg.num_new_tokens - 1)
      x = jnp.where((tokens >= cfg.vocab_size)[..., None], jnp.take(new_table, new_ids, 0), x)
    x = x.astype(jnp.dtype(cfg.dtype))
    if cfg.scale_embeddings:  # The factor rounded to the compute dtype first, as Gemma does.
      x = x * jnp.asarray(math.sqrt(cfg.dim), x.dtype)
    return x, table, new_table

  def head(self, x, table, new_table):
    cfg = self.cfg
    if cfg.tied_embeddings:
      tables = [table] + ([new_table] if new_table is not None else [])
      return jnp.concatenate(
          [jnp.einsum("bld,vd->blv", x, t.astype(x.dtype)) for t in tables], -1)
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), use_bias=False)
    logits = [layers.dense(cfg.vocab_size, ("embed", "vocab"), **kw, name="lm_head")(x)]
    if cfg.num_new_tokens:
      logits.append(layers.dense(cfg.num_new_tokens, ("embed", None), **kw,
                                 name="new_lm_head")(x))
    return jnp.concatenate(logits, -1)

  @nn.compact
  def __call__(self, tokens, visual=None, media_idx=None, positions=None, key_mask=None,
               last_only=False):
    """last_only: the logits of the last position only, [B, 1, V + n_new]: a decoding prompt's
    call needs no others, and at a large vocabulary the head over every position (V x D each)
    would be its largest matmul."""
    cfg = self.cfg
    x, table, new_table = self.embed(tokens)  # [B, L, D]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
      if self.decode:
        index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
        if self.is_initializing():
          index.value = jnp.array(0, jnp.int32)
        else:
          positions = positions + index.value
          index.value = index.value + tokens.shape[1]
    if cfg.position == "learned":
      pos_table = self.param(
          "pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.01),
                                                    ("positions", "embed")),
          (cfg.max_len, cfg.dim), jnp.dtype(cfg.param_dtype))
      x = x + jnp.take(pos_table, positions, axis=0).astype(x.dtype)

    if cfg.xattn is not None and media_idx is None:
      raise ValueError("media_idx is required when the LM has xattn blocks.")
    prefix, groups, tail = layer_layout(cfg)
    if prefix:
      x, _ = _layer_stack(cfg, prefix, self.decode, "layers")(x, positions, key_mask)
    if groups:
      x, _ = nn.scan(
          XattnGroup, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
          in_axes=nn.broadcast, length=groups, unroll=layers.scan_unroll(cfg.unroll_layers),
          metadata_params={nn.PARTITION_NAME: "groups"},
      )(cfg, cfg.xattn.every, self.decode, name="groups")(x, visual, media_idx, positions,
                                                          key_mask)
    if tail:
      x, _ = XattnGroup(cfg, tail, self.decode, name="tail")(x, visual, media_idx, positions,
                                                             key_mask)
    if last_only:
      x = x[:, -1:]
    if cfg.final_norm:
      x = layers.norm(cfg.norm, eps=cfg.norm_eps, use_bias=cfg.norm_bias, dtype=x.dtype,
                      param_dtype=jnp.dtype(cfg.param_dtype), name="norm_final")(x)
    return self.head(x, table, new_table).astype(jnp.float32)


def layer_layout(cfg: LMConfig) -> tuple[int, int, int]:
  """`xattn_layout` of cfg's placement; a plain LM (xattn=None) is all prefix."""
  if cfg.xattn is None:
    return cfg.num_layers, 0, 0
  return xattn_layout(cfg.num_layers, cfg.xattn.every, cfg.xattn.placement)


# The layer stacks of an LM tree in layer order, with their leading axes. A plain LM has only the
# first; the xattn blocks beside `groups/layers` and `tail/layers` are not part of the frozen LM.
_STACKS = (("layers/", 1), ("groups/layers/", 2), ("tail/layers/", 1))
_XATTN = ("groups/xattn/", "tail/xattn/")


def _stack(path: str) -> int | None:
  """Index in _STACKS of the layer stack that holds the parameter at `path`, if any."""
  return next((i for i, (stack, _) in enumerate(_STACKS) if path.startswith(stack)), None)


def stack_axes(path: str) -> int:
  """Leading layer axes of the array at a '/'-joined path of an LM tree, parameters or decode
  cache: one per `nn.scan` around it (`groups/layers` 2, the other stacks and `groups/xattn` 1,
  unstacked 0)."""
  i = _stack(path)
  if i is not None:
    return _STACKS[i][1]
  return int(path.startswith("groups/"))


def plain_path(path: str) -> tuple[str | None, int]:
  """(path in the plain LM, leading layer axes) of a '/'-joined parameter path in an LM tree of
  any layout; the path is None for an xattn block's parameters."""
  i = _stack(path)
  if i is not None:
    stack, axes = _STACKS[i]
    return "layers/" + path[len(stack):], axes
  return (None if path.startswith(_XATTN) else path), 0


def to_plain(params: dict) -> dict:
  """The plain LM's tree (`layers` [L, ...]) of an LM tree in any xattn layout.

  The layout comes from the tree's keys and leading dims (`layers` [P, ...], `groups/layers`
  [G, n, ...], `tail/layers` [r, ...]), so a checkpoint written for any placement reads back. The
  xattn blocks are dropped: they belong to one placement, and they train.
  """
  stacks, out, unknown = {}, {}, []  # stacks: plain path -> {stack index: array}.
  for path, x in traverse_util.flatten_dict(params, sep="/").items():
    if path.startswith(_XATTN):
      continue
    i = _stack(path)
    if i is not None:
      stacks.setdefault(plain_path(path)[0], {})[i] = x
    elif path.startswith(("groups/", "tail/")):
      unknown.append(path)
    else:
      out[path] = x
  if unknown or not stacks:
    raise ValueError(
        "Not an LM tree: expected the plain LM's 'layers' [L, ...] or the layers grouped for an "
        "xattn placement, 'layers' [P, ...], 'groups' {'layers': [G, n, ...]} and 'tail' "
        f"{{'layers': [r, ...]}}; got {sorted(unknown) if unknown else sorted(params)}.")
  layouts = {plain: tuple((_STACKS[i][0], x.shape[:_STACKS[i][1]]) for i, x in sorted(s.items()))
             for plain, s in stacks.items()}
  if len(set(layouts.values())) > 1:
    raise ValueError("The LM's layer stacks disagree on the layout: " + "; ".join(
        f"{plain} {layout}" for plain, layout in sorted(layouts.items())))
  for plain, s in stacks.items():
    arrays = [x.reshape(-1, *x.shape[_STACKS[i][1]:]) for i, x in sorted(s.items())]
    out[plain] = arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays)
  return traverse_util.unflatten_dict(out, sep="/")


def to_layout(params: dict, cfg: LMConfig) -> dict:
  """An LM tree in any layout (`to_plain`) stacked for cfg's xattn placement: the frozen LM part
  of `LM(cfg)`'s parameters (everything but the xattn blocks)."""
  prefix, groups, tail = layer_layout(cfg)
  grouped = cfg.num_layers - tail  # Layers in the prefix and the groups.
  out = {}
  for path, x in traverse_util.flatten_dict(to_plain(params), sep="/").items():
    if not path.startswith("layers/"):
      out[path] = x
      continue
    if x.shape[0] != cfg.num_layers:
      raise ValueError(f"{path} stacks {x.shape[0]} layers; lm.num_layers={cfg.num_layers}.")
    leaf = path[len("layers/"):]
    if prefix:
      out[f"layers/{leaf}"] = x[:prefix]
    if groups:
      out[f"groups/layers/{leaf}"] = x[prefix:grouped].reshape(groups, -1, *x.shape[1:])
    if tail:
      out[f"tail/layers/{leaf}"] = x[grouped:]
  return traverse_util.unflatten_dict(out, sep="/")
