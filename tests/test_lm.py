"""The frozen LM: layer layout and xattn placement, KV-cache decoding, GQA, remat, config errors."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import lm
from flamingo_jax.models import xattn as xattn_lib
from tests import model_utils

V, NEW, R, DV = 40, 2, 3, 8


def make_cfg(**kw):
  base = dict(vocab_size=V, num_new_tokens=NEW, dim=32, num_layers=5, num_heads=4, mlp_dim=48,
              max_len=32, num_latents=R)
  return lm.make_config({**base, **kw})


def inputs(length=10, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, V + NEW, (2, length)).astype(np.int32)
  tokens[:, 2] = V  # <image>
  tokens[:, 6] = V
  media_idx = model_utils.media_idx_from_tokens(tokens, V)
  visual = rng.normal(size=(2, 2, R, DV)).astype(np.float32)
  return jnp.asarray(tokens), jnp.asarray(visual), jnp.asarray(media_idx)


def init(cfg, tokens, visual, media_idx, gates=0.0):
  params = model_utils.init(lm.LM(cfg), tokens, visual, media_idx)
  return model_utils.set_gates(params, gates)


@pytest.mark.parametrize("layers,every,expected", [
    (24, 1, list(range(24))),
    (40, 4, list(range(0, 40, 4))),
    (80, 7, list(range(0, 80, 7))),
])
def test_paper_placement(layers, every, expected):
  cfg = make_cfg(num_layers=layers, xattn=dict(every=every))
  assert lm.xattn_layer_indices(cfg) == expected
  assert len(expected) == {1: 24, 4: 10, 7: 12}[every]  # Paper: 24 / 10 / 12 blocks.


@pytest.mark.parametrize("layers,every", [(24, 4), (5, 2), (7, 3), (4, 4)])
def test_open_flamingo_placement(layers, every):
  cfg = make_cfg(num_layers=layers, xattn=dict(every=every, placement="open_flamingo"))
  assert lm.xattn_layer_indices(cfg) == [i for i in range(layers) if (i + 1) % every == 0]


@pytest.mark.parametrize("layers,expected", [(24, 12), (5, 2), (1, 0)])
def test_single_in_middle_placement(layers, expected):
  """Table 3's "single in middle": one block, before layer num_layers // 2; `every` unused."""
  cfg = make_cfg(num_layers=layers, xattn=dict(every=1, placement="middle"))
  assert lm.xattn_layer_indices(cfg) == [expected]


def unstack(tree):
  """The trees along the leading axis of a stacked tree."""
  n = jax.tree_util.tree_leaves(tree)[0].shape[0]
  return [jax.tree_util.tree_map(lambda a, i=i: a[i], tree) for i in range(n)]


def reference_forward(cfg, params, tokens, visual, media_idx):
  """The LM written as a plain Python loop over layers, with blocks where the paper puts them."""
  layer_trees = unstack(lm.to_plain(params)["layers"])
  xattn_trees = ((unstack(params["groups"]["xattn"]) if "groups" in params else [])
                 + ([params["tail"]["xattn"]] if "tail" in params else []))
  table = jnp.concatenate([params["token_embed"], params["new_token_embed"]])
  y = table[tokens]
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  blocks = iter(xattn_trees)
  xc = cfg.xattn
  for i, layer in enumerate(layer_trees):
    if i in lm.xattn_layer_indices(cfg):
      block = xattn_lib.GatedXattnDense(xc, R)
      y = block.apply({"params": next(blocks)}, y, visual, media_idx)
    y, _ = lm.DecoderLayer(cfg).apply({"params": layer}, y, positions)
  y = nn.LayerNorm(epsilon=cfg.norm_eps).apply({"params": params["norm_final"]}, y)
  return y @ table.T


@pytest.mark.parametrize("placement,every", [("paper", 2), ("paper", 1), ("open_flamingo", 2),
                                             ("paper", 5), ("middle", 1)])
def test_scanned_layout_matches_a_plain_layer_loop(placement, every):
  cfg = make_cfg(tied_embeddings=True, xattn=dict(every=every, placement=placement, num_heads=2,
                                                   head_dim=8))
  tokens, visual, media_idx = inputs()
  params = init(cfg, tokens, visual, media_idx, gates=0.7)
  ours = lm.LM(cfg).apply({"params": params}, tokens, visual, media_idx)
  ref = reference_forward(cfg, params, tokens, visual, media_idx)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


VARIANTS = {
    "rotary_rmsnorm_swiglu": dict(norm="rmsnorm", activation="silu", gated_mlp=True,
                                  tied_embeddings=False),
    "gqa": dict(num_kv_heads=2),
    "learned_gelu_bias": dict(position="learned", use_bias=True, activation="gelu_tanh"),
    "alibi": dict(position="alibi", norm_bias=False),
    "partial_rotary_parallel": dict(rotary_pct=0.25, parallel_residual=True, use_bias=True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("with_xattn", [False, True])
def test_kv_cache_decoding_matches_full_forward(variant, with_xattn):
  cfg = make_cfg(**VARIANTS[variant], xattn=dict(every=2) if with_xattn else None)
  tokens, visual, media_idx = inputs(length=10)
  if not with_xattn:
    visual = media_idx = None
  params = init(cfg, tokens, visual, media_idx, gates=0.5)
  # Jitted throughout (one compile per call shape): eager dispatch dominated this test's time.
  full = jax.jit(lm.LM(cfg).apply)({"params": params}, tokens, visual, media_idx)

  decoder = lm.LM(cfg, decode=True)
  max_len = 16
  cache = jax.jit(decoder.init)(
      jax.random.PRNGKey(0), jnp.zeros((2, max_len), jnp.int32), visual,
      None if media_idx is None else jnp.zeros((2, max_len), jnp.int32))["cache"]
  prompt = 7
  mi = lambda a, b: None if media_idx is None else media_idx[:, a:b]
  step = jax.jit(functools.partial(decoder.apply, mutable=["cache"]))
  logits, state = step({"params": params, "cache": cache}, tokens[:, :prompt], visual,
                       mi(0, prompt))
  steps = [logits]
  for t in range(prompt, tokens.shape[1]):
    logits, state = step({"params": params, **state}, tokens[:, t:t + 1], None, mi(t, t + 1))
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_gqa_equals_multi_head_with_repeated_kv():
  tokens, _, _ = inputs()
  gqa_cfg = make_cfg(num_kv_heads=2)
  gqa = init(gqa_cfg, tokens, None, None)
  mha_cfg = make_cfg()
  mha = jax.tree_util.tree_map(lambda a: a, gqa)
  for name in ("key", "value"):
    kernel = gqa["layers"]["attn"][name]["kernel"]  # [L, D, 2, Dh]
    mha["layers"]["attn"][name]["kernel"] = jnp.repeat(kernel, 2, axis=2)
  np.testing.assert_allclose(lm.LM(gqa_cfg).apply({"params": gqa}, tokens),
                             lm.LM(mha_cfg).apply({"params": mha}, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_keeps_values_and_gradients(policy):
  tokens, visual, media_idx = inputs()
  cfg = make_cfg(xattn=dict(every=2))
  params = init(cfg, tokens, visual, media_idx, gates=0.5)

  def loss(p, c):
    return jnp.mean(lm.LM(c).apply({"params": p}, tokens, visual, media_idx) ** 2)

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  want = value_and_grad(params, cfg)
  got = value_and_grad(params, make_cfg(xattn=dict(every=2), remat_policy=policy))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         got, want)


def test_new_token_rows_are_separate_from_the_frozen_table():
  """Changing the trainable new rows changes only positions at or after a new token."""
  cfg = make_cfg()
  tokens = jnp.array([[1, 5, V, 7, V + 1]])
  params = init(cfg, tokens, None, None)
  base = lm.LM(cfg).apply({"params": params}, tokens)
  moved = dict(params, new_token_embed=params["new_token_embed"] + 1.0)
  new_logits = lm.LM(cfg).apply({"params": moved}, tokens)
  # Base-vocabulary logits only: the tied head also scores the new rows at every position.
  changed = np.abs(np.asarray(new_logits - base)[..., :V]).max(-1)[0]
  np.testing.assert_array_equal(changed > 1e-6, [False, False, True, True, True])
  assert base.shape == (1, 5, V + NEW)


@pytest.mark.parametrize("kw,match", [
    (dict(dim=30, num_heads=4), "does not divide"),
    (dict(num_kv_heads=3), "must divide"),
    (dict(position="sinusoid"), "position"),
    (dict(activation="swish2"), "activation"),
    (dict(xattn=dict(every=9)), "every"),
    (dict(xattn=dict(placement="top")), "placement"),
    (dict(bogus=1), "Unknown lm config keys"),
    (dict(xattn=dict(heads=2)), "Unknown lm.xattn config keys"),
])
def test_config_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    make_cfg(**kw)
