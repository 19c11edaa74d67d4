"""Building blocks shared by the LM, the cross-attention blocks and the resampler.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) that the trainer maps to
mesh axes. The names used across the models:
  'vocab'  token rows            'embed'  model width (LM or resampler)
  'heads'  attention heads       'kv'     per-head key/value size   'kv_heads'  GQA k/v heads
  'mlp'    feed-forward hidden   'layers' / 'groups'  scanned layer stacks (never sharded)
  'positions', 'latents', 'frames'  learned position / latent / time tables
  'vis_embed'  vision-encoder channels feeding the resampler
"""
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
BATCH_AXES = ("data", "fsdp")  # Mesh axes that split activations' batch (train/sharding.py).
NEG_INF = -1e30  # finite, so fully masked rows give uniform weights instead of NaN.

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "sqrelu": lambda x: jnp.square(nn.relu(x)),  # Flamingo's new layers (Primer's squared ReLU).
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"activation={name!r} is unknown; expected one of {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def constrain_batch(x):
  """Shards x's leading (batch) axis over BATCH_AXES when traced under a mesh (else a no-op).

  Under FSDP the partitioner would otherwise let activations follow the weights' 'embed' sharding
  and replicate the batch (train/trainer.py traces the update step under its mesh).
  """
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(BATCH_AXES))


def matrix_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """lax.dot_general of a dense layer as one 2-D matmul: [..., in] x [in, out] -> [..., out].

  The same product, but its weight gradient is then a plain [in, T] x [T, out] matmul. With the
  batch and sequence axes kept apart, XLA:CPU instead transposed the (larger) output gradient in
  a slow fused loop, 8% of the train step's op time (benchmarks/RESULTS.md, "Where the train step's
  time goes"). On TPU merging the leading axes is a free reshape.
  """
  (lhs_contract, rhs_contract), batch = dimension_numbers
  n = len(lhs_contract)
  if (any(batch) or tuple(lhs_contract) != tuple(range(lhs.ndim - n, lhs.ndim))
      or tuple(rhs_contract) != tuple(range(n))):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  lead, out = lhs.shape[:lhs.ndim - n], rhs.shape[n:]
  product = jax.lax.dot_general(
      lhs.reshape(-1, math.prod(lhs.shape[lhs.ndim - n:])),
      rhs.reshape(math.prod(rhs.shape[:n]), -1), (((1,), (0,)), ((), ())),
      precision=precision, preferred_element_type=preferred_element_type)
  return product.reshape(*lead, *out)


def dense(features, axes: Sequence[str | None], *, use_bias=False, dtype=jnp.float32,
          param_dtype=jnp.float32, axis=-1, name=None, init_std=0.02):
  """A DenseGeneral whose kernel (and bias) carry logical axis names `axes` (input axes first)."""
  n_in = 1 if isinstance(axis, int) else len(axis)
  out_axes = tuple(axes[n_in:])
  return nn.DenseGeneral(
      features=features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(init_std), tuple(axes)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), out_axes),
      dot_general=matrix_dot_general, name=name)


def norm(kind: str, *, eps: float = 1e-5, use_bias: bool = True, dtype=jnp.float32,
         param_dtype=jnp.float32, name=None):
  """LayerNorm or RMSNorm over the last axis, computed in float32 for stability."""
  scale_init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
  if kind == "layernorm":
    return nn.LayerNorm(
        epsilon=eps, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=scale_init,
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))
  if kind == "rmsnorm":
    return nn.RMSNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=scale_init)
  raise ValueError(f"norm={kind!r} is unknown; expected 'layernorm' or 'rmsnorm'.")


def attention(q, k, v, mask=None, bias=None, scale=None, cache_layout=False):
  """Multi-head / grouped-query dot-product attention.

  q: [B, L, H, D]; k, v: [B, S, K, D] with H a multiple of K (GQA shares each k/v head among H/K
  query heads); mask: broadcastable to [B, 1, L, S] (True = attend); bias: broadcastable to
  [B, H, L, S]. Softmax runs in float32. Returns [B, L, H, D].

  cache_layout: k is [B, K, D, S] and v [B, K, S, D], the decode caches' layout (`cache_layout`):
  both dot products then read the cache as stored, where [B, S, K, D] is copied into this layout
  at every decoding step.
  """
  b, l, h, d = q.shape
  kh = k.shape[1] if cache_layout else k.shape[2]
  if h % kh:
    raise ValueError(f"num_heads={h} must be a multiple of num_kv_heads={kh}.")
  scale = d ** -0.5 if scale is None else scale
  q = q.reshape(b, l, kh, h // kh, d)
  k_spec, v_spec = ("bkds", "bksd") if cache_layout else ("bskd", "bskd")
  logits = jnp.einsum(f"blkgd,{k_spec}->bkgls", q, k).astype(jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.reshape(bias.shape[0], kh, h // kh, *bias.shape[2:])
  if mask is not None:
    logits = jnp.where(mask[:, :, None], logits, NEG_INF)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum(f"bkgls,{v_spec}->blkgd", weights, v)
  return out.reshape(b, l, h, d)


def cache_layout(k, v):
  """k, v [B, S, K, D] -> k [B, K, D, S], v [B, K, S, D]: `attention(..., cache_layout=True)`'s."""
  return k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)


class FeedForward(nn.Module):
  """LayerNorm → Dense(mult·D) → activation → Dense(D), bias-free: the FFW of the new layers."""
  mult: int = 4
  activation: str = "sqrelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [..., D] -> [..., D]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = norm("layernorm", **kw, name="norm")(x)
    h = dense(self.mult * x.shape[-1], ("embed", "mlp"), **kw, name="wi")(h)
    h = activation(self.activation)(h)
    return dense(x.shape[-1], ("mlp", "embed"), **kw, name="wo")(h)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def remat(module_cls, policy: str, static_argnums=()):
  """Wraps a module class in nn.remat with a named policy ('none' leaves it as is)."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={policy!r} is unknown; expected one of "
                     f"{sorted(REMAT_POLICIES)}.")
  if policy == "none":
    return module_cls
  return nn.remat(module_cls, policy=REMAT_POLICIES[policy], prevent_cse=False,
                  static_argnums=static_argnums)


def scan_unroll(unroll_layers: bool) -> int:
  """nn.scan's `unroll` for a layer stack: 1 is one rolled loop, 0 unrolls every layer. Not
  `unroll=length`: JAX keeps a stack of one (OpenFlamingo's placement makes them) as a one-trip
  loop, and XLA then copies the layer's weights out of their stack at every decoding step
  (speed.py's every=4 points decoded 1.3-1.5x slower)."""
  return 0 if unroll_layers else 1
