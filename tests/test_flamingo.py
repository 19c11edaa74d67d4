"""The composed Flamingo model: the paper's claims at the level of the whole model."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flamingo_jax.configs import tiny
from flamingo_jax.models import flamingo
from flamingo_jax.models import lm
from flamingo_jax.models import xattn
from tests import model_utils


@pytest.fixture(scope="module")
def setup():
  model, cfg = model_utils.tiny_model()
  images, tokens, media_idx = model_utils.random_inputs(0)
  params = model_utils.init(model, images, tokens, media_idx)
  # As after training: open gates and a time embedding of the features' scale.
  params = model_utils.set_gates(params, 0.8)
  forward = jax.jit(lambda p, i, t, m: model.apply({"params": p}, i, t, m))
  return model, cfg, params, forward, (images, tokens, media_idx)


def test_closed_gates_give_exactly_the_frozen_lm(setup):
  model, _, params, forward, (images, tokens, media_idx) = setup
  closed = model_utils.set_gates(params, 0.0)
  plain_cfg = lm.make_config({**model.lm.__dict__, "xattn": None})
  want = lm.LM(plain_cfg).apply({"params": lm.to_plain(closed["lm"])}, tokens)
  for seed in (1, 2):  # Any images. (Equal up to XLA's float reassociation across programs.)
    other_images = model_utils.random_inputs(seed)[0]
    np.testing.assert_allclose(forward(closed, other_images, tokens, media_idx), want, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("image", [0, 1])
def test_changing_an_image_never_reaches_earlier_tokens(setup, image):
  _, _, params, forward, (images, tokens, media_idx) = setup
  base = forward(params, images, tokens, media_idx)
  noise = jax.random.normal(jax.random.PRNGKey(3), images.shape[2:])
  changed = forward(params, images.at[:, image].add(noise), tokens, media_idx)
  moved = np.abs(np.asarray(changed - base)).max(-1) > 1e-5  # [B, L]
  mi = np.asarray(media_idx)
  assert not moved[mi < image + 1].any()  # Tokens before image j (incl. media_idx 0) never move.
  assert moved[mi == image + 1].all()  # Tokens that attend to image j do.


def test_video_frame_order_matters():
  model, _ = model_utils.tiny_model()
  images, tokens, media_idx = model_utils.random_inputs(0, frames=4)
  params = model_utils.set_gates(model_utils.init(model, images, tokens, media_idx), 0.8)
  table = params["resampler"]["time_embed"]
  params["resampler"]["time_embed"] = jax.random.normal(jax.random.PRNGKey(1), table.shape)
  forward = jax.jit(lambda i: model.apply({"params": params}, i, tokens, media_idx))
  shuffled = images[:, :, jnp.array([3, 1, 0, 2])]
  np.testing.assert_array_equal(forward(images), forward(images))  # Deterministic: diffs are real.
  assert np.abs(np.asarray(forward(shuffled) - forward(images))).max() > 1e-6


def test_bf16_compute_with_fp32_params():
  model, _ = model_utils.tiny_model(dtype="bfloat16")
  images, tokens, media_idx = model_utils.random_inputs(0)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, tokens, media_idx)
  assert {x.dtype for x in jax.tree_util.tree_leaves(nn.unbox(variables))} == {jnp.dtype("float32")}
  visual = jax.jit(lambda v: model.apply(v, images, method=model.encode_images))(variables)
  assert visual.dtype == jnp.bfloat16 and visual.shape == (2, 2, 4, 32)
  logits = jax.jit(model.apply)(variables, images, tokens, media_idx)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 12, 66)


def test_jit_forward_sharded_over_8_devices(setup):
  model, _, params, forward, _ = setup
  assert jax.device_count() == 8, "tests/conftest.py sets 8 virtual CPU devices"
  images, tokens, media_idx = model_utils.random_inputs(4, batch=8)
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
  sharded = jax.jit(lambda p, i, t, m: model.apply({"params": p}, i, t, m),
                    out_shardings=NamedSharding(mesh, P("data")))
  got = sharded(params, shard(images), shard(tokens), shard(media_idx))
  assert got.sharding.spec == P("data")
  np.testing.assert_allclose(got, forward(params, images, tokens, media_idx), rtol=1e-5,
                             atol=1e-5)


def test_incremental_decoding_matches_full_forward(setup):
  _, cfg, params, forward, (images, tokens, media_idx) = setup
  decoder, _ = model_utils.tiny_model(decode=True)
  max_len = 16
  zeros = jnp.zeros((2, max_len), jnp.int32)
  cache = jax.jit(decoder.init)(jax.random.PRNGKey(0), images, zeros, zeros)["cache"]
  prompt = 8
  step = jax.jit(lambda p, c, i, t, m: decoder.apply({"params": p, "cache": c}, i, t, m,
                                                     mutable=["cache"]))
  logits, state = step(params, cache, images, tokens[:, :prompt], media_idx[:, :prompt])
  outs = [logits]
  for t in range(prompt, tokens.shape[1]):
    logits, state = step(params, state["cache"], None, tokens[:, t:t + 1], media_idx[:, t:t + 1])
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), forward(params, images, tokens, media_idx),
                             rtol=1e-4, atol=1e-4)


def test_bad_image_rank_is_an_error(setup):
  model, _, params, _, (_, tokens, media_idx) = setup
  with pytest.raises(ValueError, match=r"\[B, N, T, H, W, 3\]"):
    model.apply({"params": params}, jnp.zeros((2, 32, 32, 3)), tokens, media_idx)


@pytest.mark.parametrize("field", ["gated", "only_attend_immediate"])
def test_xattn_ablation_switches_reach_every_block(field):
  """model.lm.xattn.<field>=False (paper Table 3 / §2.3 ablations) is what every block runs with."""
  model, _ = model_utils.tiny_model(**{f"lm.xattn.{field}": False})
  inputs = model_utils.random_inputs(0)
  # Shapes only (eval_shape traces the same module calls without compiling or computing): the
  # blocks' configs are what is checked, not their values.
  params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"])
  blocks = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, xattn.GatedXattnDense):
      blocks.append(context.module)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda p: model.apply({"params": p}, *inputs), params)
  assert blocks and all(getattr(b.cfg, field) is False for b in blocks)
  names = {p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert ("attn_gate" in names) == (field != "gated")


def test_bad_xattn_switch_is_an_error():
  with pytest.raises(ValueError, match=r"lm.xattn.gated='no'; expected True or False"):
    model_utils.tiny_model(**{"lm.xattn.gated": "no"})


def test_mlp_connector_replaces_the_resampler_under_the_same_name():
  """model.resampler.kind='mlp' (paper Table 3): one visual token per image at this grid (S=1)."""
  model, _ = model_utils.tiny_model(**{"resampler.kind": "mlp", "resampler.num_latents": 1})
  images, tokens, media_idx = model_utils.random_inputs(0)
  params = model_utils.set_gates(model_utils.init(model, images, tokens, media_idx), 0.8)
  assert set(params["resampler"]) == {"input_proj", "ffw", "norm"}
  visual = jax.eval_shape(lambda i: model.apply({"params": params}, i,
                                                method=model.encode_images), images)
  assert visual.shape == (2, 2, 1, 32)  # Its values act below: each image moves its tokens.
  forward = jax.jit(lambda i: model.apply({"params": params}, i, tokens, media_idx))
  noise = jax.random.normal(jax.random.PRNGKey(3), images.shape[2:])
  moved = np.abs(np.asarray(forward(images.at[:, 1].add(noise)) - forward(images))).max(-1) > 1e-5
  mi = np.asarray(media_idx)
  assert not moved[mi < 2].any() and moved[mi == 2].all()


def test_bad_resampler_kind_is_an_error():
  _, cfg = model_utils.tiny_model()
  cfg.resampler.kind = "convolution"
  with pytest.raises(ValueError, match=r"model.resampler.kind='convolution'"):
    flamingo.from_config(cfg)


def test_model_is_a_hashable_static_argument():
  """Every field is a frozen config: the module can be a static jit argument (no id-keyed cache)."""
  config = tiny.get_config()
  a, b = flamingo.from_config(config.model), flamingo.from_config(config.model)
  assert a == b and hash(a) == hash(b)
  assert hash(dataclasses.replace(a.connector, num_latents=8)) != hash(a.connector)


def _scan_unrolls(jaxpr) -> list[tuple[int, int]]:
  """(length, unroll) of every scan in a jaxpr, nested ones included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      found.append((eqn.params["length"], eqn.params["unroll"]))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
          found += _scan_unrolls(getattr(sub, "jaxpr", sub))
  return found


def test_unrolled_layers_compute_the_same_model_with_the_same_parameters(setup):
  model, _, params, forward, (images, tokens, media_idx) = setup
  unrolled, _ = model_utils.tiny_model(unroll_layers=True)
  apply = lambda m: (lambda p, i, t, mi: m.apply({"params": p}, i, t, mi))
  scans = _scan_unrolls(jax.make_jaxpr(apply(unrolled))(params, images, tokens, media_idx).jaxpr)
  rolled = _scan_unrolls(jax.make_jaxpr(apply(model))(params, images, tokens, media_idx).jaxpr)
  assert rolled and all(unroll == 1 for _, unroll in rolled), rolled  # LM groups/layers, resampler.
  assert [n for n, _ in scans] == [n for n, _ in rolled], scans
  assert all(unroll == 0 for _, unroll in scans), scans  # 0: all unrolled (layers.scan_unroll).
  np.testing.assert_allclose(jax.jit(apply(unrolled))(params, images, tokens, media_idx),
                             forward(params, images, tokens, media_idx), rtol=1e-5, atol=1e-5)
