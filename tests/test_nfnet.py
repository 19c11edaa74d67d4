"""NFNet: shapes, parameter counts, SkipInit, variants, input errors, stochastic depth, bf16."""
import dataclasses
import math

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from flamingo_jax.convert import safetensors_io
from flamingo_jax.models import nfnet

TINY = dict(depths=(1, 1, 1, 1), channels=(32, 64, 96, 128), stem_chs=16, group_size=16,
            num_features=256)
# sum(p.numel()) of timm 1.0.31 models built with num_classes=0 (without the 1000-class head;
# with it dm_nfnet_f6 has 438,359,116); test_timm_nfnet_parity.py checks these numbers against timm.
TIMM_F0_PARAMS = 68_416_284
TIMM_F6_PARAMS = 435_286_116
IMAGES = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)


def _boxed_shapes(model):
  return jax.eval_shape(model.init, jax.random.key(0), IMAGES)["params"]


def _num_params(model):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(_boxed_shapes(model))))


@pytest.fixture(scope="module")
def tiny():
  """Tiny model with random params (SkipInit gains 1, so residuals count), built without init."""
  model = nfnet.NFNet(nfnet.NFNetConfig(**TINY, drop_path_rate=0.5))
  rng = np.random.default_rng(0)
  flat = traverse_util.flatten_dict(nn.meta.unbox(_boxed_shapes(model)))
  params = traverse_util.unflatten_dict({
      p: np.ones(x.shape, x.dtype) if p[-1] in ("gain", "skipinit_gain")
      else rng.normal(size=x.shape).astype(x.dtype) * 0.1 for p, x in flat.items()})
  images = jax.random.normal(jax.random.key(1), IMAGES.shape)
  apply = jax.jit(model.apply, static_argnames="train")
  return model, params, images, apply


def test_grid_shape_and_param_names(tiny):
  _, params, images, apply = tiny
  grid = apply({"params": params}, images)
  assert grid.shape == (2, 2, 2, 256)  # 64 / 32 = 2
  assert np.isfinite(grid).all()
  names = {"/".join(p) for p in traverse_util.flatten_dict(params)}
  for name in ("stem_conv1/kernel", "stem_conv4/gain", "stages_0_block_0/downsample/kernel",
               "stages_3_block_0/conv2b/bias", "stages_3_block_0/se/fc1/kernel",
               "stages_3_block_0/skipinit_gain", "final_conv/kernel"):
    assert name in names


def test_every_param_has_logical_axes():
  model = nfnet.NFNet(nfnet.NFNetConfig(**TINY, num_classes=10))
  flat = traverse_util.flatten_dict(_boxed_shapes(model))
  for path, box in flat.items():
    assert isinstance(box, nn.LogicallyPartitioned), path
    assert len(box.names) == box.value.ndim, path
  assert flat[("head", "kernel")].names == ("vis_embed", "classes")
  assert flat[("stem_conv1", "kernel")].names == ("conv_h", "conv_w", "conv_in", "conv_out")


def test_head_returns_grid_and_logits():
  model = nfnet.NFNet(nfnet.NFNetConfig(**TINY, num_classes=10))
  params = nn.meta.unbox(_boxed_shapes(model))
  grid, logits = jax.eval_shape(model.apply, {"params": params}, IMAGES)
  assert grid.shape == (2, 2, 2, 256) and logits.shape == (2, 10)


@pytest.mark.parametrize("in_chs, strides", [(32, 1), (16, 2)])
def test_skipinit_blocks_start_as_their_shortcut(in_chs, strides):
  """SkipInit gains are 0 at init, so no residual-branch weight changes a block's output."""
  block = nfnet.NFBlock(32, strides=strides, group_size=16)
  branch = ("conv1", "conv2", "conv2b", "conv3", "se")

  @jax.jit
  def init_and_apply(x):
    params = nn.meta.unbox(block.init(jax.random.key(0, impl="rbg"), x))["params"]
    perturbed = {k: jax.tree.map(lambda v: v + 1.0, v) if k in branch else v
                 for k, v in params.items()}
    return params["skipinit_gain"], block.apply({"params": params}, x), block.apply(
        {"params": perturbed}, x)

  x = jax.random.normal(jax.random.key(2), (2, 8, 8, in_chs))
  gain, out, out_perturbed = init_and_apply(x)
  assert gain == 0
  np.testing.assert_array_equal(out, out_perturbed)
  if in_chs == 32 and strides == 1:
    np.testing.assert_array_equal(out, x)  # no downsample: the block is the identity.


@pytest.mark.parametrize("n", range(8))
def test_variant_depths(n):
  config = nfnet.nfnet_config(f"f{n}")
  assert config.depths == ((n + 1) * 1, (n + 1) * 2, (n + 1) * 6, (n + 1) * 3)
  assert config.channels == (256, 512, 1536, 1536) and config.num_features == 3072


def test_param_counts_match_timm_and_paper():
  assert _num_params(nfnet.NFNet(nfnet.nfnet_config("F0"))) == TIMM_F0_PARAMS
  f6 = _num_params(nfnet.NFNet(nfnet.nfnet_config("F6")))
  print(f"NFNet-F6 parameters: {f6:,}")
  assert f6 == TIMM_F6_PARAMS
  assert abs(f6 - 435e6) / 435e6 < 0.01  # Flamingo paper, Table: 435M NFNet-F6.


@pytest.mark.parametrize("shape", [(2, 64, 64), (2, 64, 64, 4), (64, 64, 3, 1)])
def test_bad_image_shape_raises(shape):
  with pytest.raises(ValueError, match="images: expected"):
    jax.eval_shape(nfnet.NFNet(nfnet.NFNetConfig(**TINY)).init, jax.random.key(0),
                   jax.ShapeDtypeStruct(shape, jnp.float32))


@pytest.mark.parametrize("overrides, match", [
    (dict(group_size=24), "group_size"),
    (dict(channels=(32, 64, 96, 124)), "channels"),
    (dict(depths=(1, 1, 1)), "differ in length"),
])
def test_bad_config_raises(overrides, match):
  with pytest.raises(ValueError, match=match):
    _num_params(nfnet.NFNet(nfnet.NFNetConfig(**{**TINY, **overrides})))


@pytest.mark.parametrize("variant", ["F8", "B0", "nfnet_f0", ""])
def test_unknown_variant_raises(variant):
  with pytest.raises(ValueError, match="variant"):
    nfnet.nfnet_config(variant)
  with pytest.raises(ValueError, match="widths"):
    nfnet.nfnet_config("F0", widths=(1, 2, 3, 4))


def test_stochastic_depth_only_in_training(tiny):
  _, params, images, apply = tiny
  variables = {"params": params}
  evaluated = apply(variables, images)
  no_drop = jax.jit(nfnet.NFNet(nfnet.NFNetConfig(**TINY)).apply)(variables, images)
  np.testing.assert_array_equal(evaluated, no_drop)
  keys = [jax.random.key(k, impl="rbg") for k in (0, 1)]
  train = [apply(variables, images, train=True, rngs={"dropout": key}) for key in keys]
  assert not np.allclose(train[0], evaluated)
  assert not np.allclose(train[0], train[1])


def test_bf16_compute_keeps_fp32_params():
  model = nfnet.NFNet(nfnet.NFNetConfig(**TINY, num_classes=10, dtype=jnp.bfloat16))
  params = nn.meta.unbox(_boxed_shapes(model))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  grid, logits = jax.eval_shape(model.apply, {"params": params}, IMAGES)
  assert grid.dtype == jnp.bfloat16 and logits.dtype == jnp.bfloat16


def test_safetensors_io_reads_shards(tmp_path):
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  b = np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)
  safetensors.numpy.save_file({"a": a}, str(tmp_path / "model-00001.safetensors"))
  safetensors.numpy.save_file({"b": b}, str(tmp_path / "model-00002.safetensors"))
  tensors = safetensors_io.load(str(tmp_path))
  np.testing.assert_array_equal(tensors["a"], a)
  assert tensors["b"].dtype == ml_dtypes.bfloat16 and tensors["b"].tolist() == b.tolist()
  assert safetensors_io.load(str(tmp_path / "model-00001.safetensors")).keys() == {"a"}
  safetensors.numpy.save_file({"a": a}, str(tmp_path / "model-00003.safetensors"))
  with pytest.raises(ValueError, match="repeats"):
    safetensors_io.load(str(tmp_path))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no \\*.safetensors"):
    safetensors_io.load(str(tmp_path / "empty"))


def test_scanned_blocks_match_unrolled():
  """scan_blocks (one compiled body per stage) computes what the blocks one by one do."""
  kw = dict(TINY, depths=(1, 3, 2, 1))
  scanned = nfnet.NFNet(nfnet.NFNetConfig(**kw))
  unrolled = nfnet.NFNet(nfnet.NFNetConfig(**kw, scan_blocks=False))
  images = jax.random.normal(jax.random.key(1), IMAGES.shape)
  params = nn.meta.unbox(jax.jit(scanned.init)(jax.random.key(0), images)["params"])  # Eager: slow.
  params = jax.tree.map(lambda p: p + 0.5 if p.ndim == 0 else p, params)  # SkipInit gains != 0.
  assert "stages_1_block_2" in params  # Per-block parameter names, scanned or not.
  np.testing.assert_allclose(jax.jit(scanned.apply)({"params": params}, images),
                             jax.jit(unrolled.apply)({"params": params}, images),
                             rtol=1e-5, atol=1e-5)


def test_strides_give_a_finer_grid_from_the_same_weights(tiny):
  """config.strides: (1, 2, 1, 1) leaves the parameters as they are and gives a 4x finer grid
  (the demo's 4x4 at 32 px)."""
  model, params, images, apply = tiny
  fine = nfnet.NFNet(dataclasses.replace(model.config, strides=(1, 2, 1, 1)))
  grid = jax.jit(fine.apply)({"params": params}, images)
  assert grid.shape == (2, 8, 8, 256) and np.isfinite(grid).all()
