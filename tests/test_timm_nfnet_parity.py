"""NFNet against timm's dm_nfnet: configs, parameter counts, converter, and feature-grid parity."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import timm
from timm.models import nfnet as timm_nfnet_lib
import torch

from flamingo_jax.convert import timm_nfnet
from flamingo_jax.models import nfnet

pytestmark = pytest.mark.parity

TINY = dict(depths=(1, 1, 1, 1), channels=(32, 64, 96, 128), stem_chs=16, group_size=16,
            num_features=256)


def _timm(variant="dm_nfnet_f0", seed=0, **kwargs):
  """timm model with EVERY parameter random (SkipInit and conv gains too, else residuals are 0)."""
  torch.manual_seed(seed)
  model = timm.create_model(variant, pretrained=False, **kwargs).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("gain"):
        p.uniform_(0.5, 1.5)
      elif name.endswith("bias"):
        p.normal_(0.0, 0.1)
      else:
        p.normal_(0.0, p[0].numel() ** -0.5)
  return model


def _num_params(model):
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes)))


@pytest.mark.parametrize("n", range(7))  # timm has dm_nfnet_f0..f6.
def test_config_matches_timm(n):
  cfg = timm_nfnet_lib.model_cfgs[f"dm_nfnet_f{n}"]
  ours = nfnet.nfnet_config(f"F{n}")
  for field in ("depths", "channels", "stem_chs", "group_size", "bottle_ratio", "num_features",
                "alpha"):
    same = lambda a, b: tuple(np.atleast_1d(a)) == tuple(np.atleast_1d(b))
    assert same(getattr(ours, field), getattr(cfg, field)), field
  assert ours.se_ratio == cfg.attn_kwargs["rd_ratio"]
  # What NFNet hard-codes: the dm_ ("DeepMind-compatible") maths.
  assert (cfg.stem_type, cfg.act_layer, cfg.attn_layer) == ("deep_quad", "gelu", "se")
  assert cfg.attn_gain == 2.0
  assert cfg.extra_conv and cfg.gamma_in_act and cfg.same_padding and cfg.skipinit
  assert (cfg.std_conv_eps, cfg.width_factor, cfg.reg) == (1e-5, 1.0, False)


@pytest.mark.parametrize("variant, kwargs", [
    ("F0", TINY), ("F0", dict(TINY, depths=(1, 2, 2, 1), num_classes=10)), ("F0", {}), ("F6", {})])
def test_param_count_equals_timm(variant, kwargs):
  kwargs = dict(kwargs)
  num_classes = kwargs.pop("num_classes", 0)
  with torch.device("meta"):
    theirs = timm.create_model(f"dm_nfnet_{variant.lower()}", pretrained=False,
                               num_classes=num_classes, **kwargs)
  ours = nfnet.NFNet(nfnet.nfnet_config(variant, **kwargs, num_classes=num_classes))
  assert _num_params(ours) == sum(p.numel() for p in theirs.parameters())


@pytest.mark.parametrize("kwargs, hw", [
    (TINY, (64, 64)),
    # Odd sizes test SAME padding and the ceil-mode avg-pool; also the classification head.
    (dict(TINY, depths=(1, 2, 2, 1), num_classes=10), (72, 56)),
])
def test_feature_grid_matches_timm(kwargs, hw, tmp_path, record_property):
  theirs = _timm(**{"num_classes": 0, **kwargs})
  path = str(tmp_path / "nfnet.safetensors")
  safetensors.torch.save_file(theirs.state_dict(), path)
  model = nfnet.NFNet(nfnet.NFNetConfig(**kwargs))
  params = timm_nfnet.load(path, model)

  images = np.random.RandomState(0).randn(2, *hw, 3).astype(np.float32)
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    grid_ref = theirs.forward_features(x).permute(0, 2, 3, 1).numpy()
    logits_ref = theirs(x).numpy()
  out = jax.jit(model.apply)({"params": params}, images)
  grid = np.asarray(out[0] if model.config.num_classes else out)
  rel = np.linalg.norm(grid - grid_ref) / np.linalg.norm(grid_ref)
  print(f"NFNet {kwargs['depths']} {hw}: grid relative error {rel:.2e}")
  record_property("grid_relative_error", float(rel))
  assert grid.shape == grid_ref.shape
  assert rel <= 1e-4
  if model.config.num_classes:
    np.testing.assert_allclose(np.asarray(out[1]), logits_ref, rtol=1e-4, atol=1e-4)


def test_convert_lists_every_problem():
  state = {k: v.numpy() for k, v in _timm(num_classes=10, **TINY).state_dict().items()}
  del state["stages.1.0.conv2.gain"]
  state["stages.2.0.conv1.weight"] = state["stages.2.0.conv1.weight"][:8]
  state["extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as error:
    timm_nfnet.convert(state, nfnet.NFNet(nfnet.NFNetConfig(**TINY)))
  message = str(error.value)
  for expected in ("stages_1_block_0/conv2/gain", "stages.2.0.conv1.weight (8, 64, 1, 1)",
                   "extra.weight", "head.fc.weight", "head.fc.bias", "3 checkpoint keys not used"):
    assert expected in message
  # Skipping the head is explicit.
  del state["extra.weight"]
  with pytest.raises(ValueError) as error:
    timm_nfnet.convert(state, nfnet.NFNet(nfnet.NFNetConfig(**TINY)),
                       skip=(timm_nfnet.HEAD_KEYS,))
  assert "head.fc" not in str(error.value)


def test_non_dm_nfnet_is_rejected():
  state = timm.create_model("nfnet_f0", pretrained=False, num_classes=0, **TINY).state_dict()
  with pytest.raises(ValueError, match="not a timm dm_nfnet_f"):
    timm_nfnet.convert(state, nfnet.NFNet(nfnet.NFNetConfig(**TINY)))


@pytest.mark.parametrize("kwargs", [TINY, dict(TINY, depths=(1, 2, 2, 1), num_classes=10)])
def test_export_loads_into_timm_strictly(kwargs):
  """Our random params -> timm (strict) gives our feature grid (and logits), and convert(export(p))
  is p bit for bit."""
  cfg = nfnet.NFNetConfig(**kwargs)
  model = nfnet.NFNet(cfg)
  images = np.random.RandomState(1).randn(2, 64, 48, 3).astype(np.float32)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images))["params"]  # Eager: slow.
  # SkipInit gains start at 0, which would hide the residual branches.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: np.full_like(x, 0.7) if "skipinit" in jax.tree_util.keystr(path)
      else np.asarray(x), params)

  state = timm_nfnet.export(cfg, params)
  assert all(isinstance(v, np.ndarray) for v in state.values())
  theirs = timm.create_model("dm_nfnet_f0", pretrained=False, **{"num_classes": 0, **kwargs}).eval()
  # Shapes exactly as timm's (load_state_dict would accept a (1,) array for a scalar).
  assert {k: v.shape for k, v in state.items()} == {
      k: tuple(v.shape) for k, v in theirs.state_dict().items()}
  theirs.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    grid_ref = theirs.forward_features(x).permute(0, 2, 3, 1).numpy()
    logits_ref = theirs(x).numpy()
  out = jax.jit(model.apply)({"params": params}, images)
  grid = np.asarray(out[0] if cfg.num_classes else out)
  assert grid.shape == grid_ref.shape
  assert np.linalg.norm(grid - grid_ref) / np.linalg.norm(grid_ref) <= 1e-4
  if cfg.num_classes:
    np.testing.assert_allclose(np.asarray(out[1]), logits_ref, rtol=1e-4, atol=1e-4)

  back = timm_nfnet.convert(state, model)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def test_export_checks_the_params():
  cfg = nfnet.NFNetConfig(**TINY)
  params = timm_nfnet.convert(
      {k: v.numpy() for k, v in _timm(**TINY, num_classes=0).state_dict().items()},
      nfnet.NFNet(cfg))
  params["stem_conv1"]["kernel"] = params["stem_conv1"]["kernel"][:2]
  del params["final_conv"]["gain"]
  params["extra"] = {"w": np.zeros(3)}
  with pytest.raises(ValueError) as error:
    timm_nfnet.export(cfg, params)
  for expected in ("missing ['final_conv/gain']", "unexpected ['extra/w']",
                   "stem_conv1/kernel (2, 3, 3, 2) (expected (3, 3, 3, 2))"):
    assert expected in str(error.value)
