"""OpenCLIP ViT against open_clip: configs, parameter counts, converter, preprocessing, tokens."""
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import open_clip
import pytest
import safetensors.numpy
import torch

from flamingo_jax.convert import open_clip_vit
from flamingo_jax.models import flamingo
from flamingo_jax.models import vit
from tests import model_utils
from tests.peers import rel_error
from tests.peers import state_of

pytestmark = pytest.mark.parity

# A tiny ViT: open_clip's vision_cfg and the same as ViTConfig overrides (heads = width / 8).
TINY_VISION = dict(image_size=32, patch_size=8, width=32, layers=2, head_width=8)
TINY = dict(image_size=32, patch_size=8, width=32, layers=2, heads=4, output_dim=16)
NAMES = ["ViT-L-14", "ViT-B-16", "ViT-B-32"]


def _clip(quick_gelu=False, seed=0, **vision):
  """A tiny open_clip CLIP, every parameter (LayerNorms, class token, positions) ~ N(0, 0.5²)."""
  model = open_clip.CLIP(
      embed_dim=16, vision_cfg={**TINY_VISION, **vision}, quick_gelu=quick_gelu,
      text_cfg=dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1)).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(0.5 * torch.randn(p.shape, generator=gen))
  model.visual.output_tokens = True
  return model


def _num_params(cfg):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(open_clip_vit.abstract_params(cfg)))


def _open_clip(name):
  """open_clip's model (on the meta device: shapes only) and eval transform for `name`."""
  with torch.device("meta"):
    model, _, transform = open_clip.create_model_and_transforms(name, device="meta")
  return model, transform


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("quick_gelu", [False, True])
def test_config_and_param_count_match_open_clip(name, quick_gelu):
  name = f"{name}-quickgelu" if quick_gelu else name
  ours = vit.vit_config(name)
  json = open_clip.get_model_config(name)
  for field in ("image_size", "patch_size", "width", "layers"):
    assert getattr(ours, field) == json["vision_cfg"][field], field
  assert ours.output_dim == json["embed_dim"]
  assert (ours.activation == "quick_gelu") == json.get("quick_gelu", False)
  # What the JSON leaves to open_clip's defaults, read off the model it builds.
  model, transform = _open_clip(name)
  visual, block = model.visual, model.visual.transformer.resblocks[0]
  assert ours.heads == block.attn.num_heads
  assert ours.mlp_ratio * ours.width == block.mlp.c_fc.out_features
  assert isinstance(block.mlp.gelu, open_clip.transformer.QuickGELU) == quick_gelu
  assert ours.norm_eps == block.ln_1.eps == visual.ln_post.eps
  assert ours.ln_pre == (not isinstance(visual.ln_pre, torch.nn.Identity))
  normalize = transform.transforms[-1]
  assert (ours.mean, ours.std) == (tuple(normalize.mean), tuple(normalize.std))
  assert _num_params(ours) == sum(p.numel() for p in visual.parameters())


def test_vit_config_errors():
  with pytest.raises(ValueError, match="ViT-B-16-quickgelu"):  # Lists the supported names.
    vit.vit_config("ViT-H-14")
  with pytest.raises(ValueError, match=r"unknown ViTConfig fields \['depth'\]"):
    vit.vit_config("ViT-B-16", depth=3)
  with pytest.raises(ValueError, match="heads=5 must divide width=768"):
    vit.vit_config("ViT-B-16", heads=5)
  with pytest.raises(ValueError, match="activation='relu'"):
    vit.vit_config("ViT-B-16", activation="relu")


@pytest.mark.parametrize("quick_gelu, vision", [(False, {}), (True, dict(no_ln_pre=True))])
def test_tokens_and_embedding_match_open_clip(quick_gelu, vision):
  theirs = _clip(quick_gelu, **vision)
  cfg = vit.ViTConfig(**TINY, activation="quick_gelu" if quick_gelu else "gelu",
                      ln_pre=not vision)
  params = open_clip_vit.convert(state_of(theirs.visual), cfg)
  images = np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32)
  with torch.no_grad():
    pooled, tokens = theirs.visual(torch.from_numpy(images).permute(0, 3, 1, 2))
  model = vit.VisionTransformer(cfg)
  ours = jax.jit(model.apply)({"params": params}, images)
  embed = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.embed))
  embedding = embed(params, images)
  assert ours.shape == tokens.shape == (2, 16, 32)
  err, err_embedding = rel_error(ours, tokens), rel_error(embedding, pooled)
  print(f"ViT (quick_gelu={quick_gelu}, {vision}) tokens {err:.2e}, embedding {err_embedding:.2e}")
  assert err <= 1e-4 and err_embedding <= 1e-4


def test_wrong_image_size_is_rejected():
  model = vit.VisionTransformer(vit.ViTConfig(**TINY))
  with pytest.raises(ValueError, match=r"expected \[B, 32, 32, 3\]"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 48, 32, 3)))


def test_export_round_trips_and_loads_into_open_clip():
  theirs = _clip(quick_gelu=True)
  cfg = vit.ViTConfig(**TINY, activation="quick_gelu")
  # A whole CLIP state dict: the text tower's keys (transformer.*, positional_embedding) ignored.
  params = open_clip_vit.convert(state_of(theirs), cfg)
  exported = open_clip_vit.export(cfg, params)
  state = state_of(theirs.visual)
  assert exported.keys() == state.keys()
  for key, value in state.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  fresh = _clip(quick_gelu=True, seed=1).visual
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  assert all(torch.equal(fresh.state_dict()[k], torch.from_numpy(v)) for k, v in state.items())
  del params["blocks"]["c_fc"]
  params["proj"] = params["proj"][:3]
  with pytest.raises(ValueError, match=r"missing \['blocks/c_fc/bias', 'blocks/c_fc/kernel'\]"
                     r".*wrong shapes \['proj \(3, 16\) \(expected \(32, 16\)\)'\]"):
    open_clip_vit.export(cfg, params)


def test_convert_lists_every_problem():
  state = state_of(_clip().visual)
  del state["transformer.resblocks.1.ln_2.bias"]
  state["transformer.resblocks.0.attn.in_proj_weight"] = np.zeros((95, 32), np.float32)
  state["extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as error:
    open_clip_vit.convert(state, vit.ViTConfig(**TINY))
  message = str(error.value)
  for expected in ("OpenCLIP ViT checkpoint does not match the model",
                   "blocks/ln_2/bias (checkpoint key transformer.resblocks.1.ln_2.bias)",
                   "transformer.resblocks.0.attn.in_proj_weight (95, 32)",
                   "-> blocks/query/kernel expects (2, 32, 4, 8)", "extra.weight"):
    assert expected in message
  with pytest.raises(ValueError, match="the checkpoint has 2 resblocks; the config has layers=3"):
    open_clip_vit.convert(state_of(_clip().visual), vit.ViTConfig(**{**TINY, "layers": 3}))


@pytest.mark.parametrize("spec", ["open_clip:ViT-B-32", "timm:ViT-B-32:x.pt", "ViT-B-32:x.pt",
                                  "open_clip::x.pt"])
def test_load_rejects_bad_specs(spec):
  with pytest.raises(ValueError, match="expected open_clip:MODEL:PATH"):
    open_clip_vit.load(spec)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_reads_checkpoints(suffix, tmp_path):
  """A tiny checkpoint under a real name: read (torch or safetensors), then refused by shape."""
  path = str(tmp_path / f"clip{suffix}")
  state = _clip().state_dict()
  if suffix == ".pt":
    torch.save(state, path)
  else:
    safetensors.numpy.save_file({k: v.numpy() for k, v in state.items()}, path)
  with pytest.raises(ValueError, match="not a supported OpenCLIP ViT"):
    open_clip_vit.load(f"open_clip:ViT-X:{path}")
  with pytest.raises(ValueError, match="the checkpoint has 2 resblocks; the config has layers=12"):
    open_clip_vit.load(f"open_clip:ViT-B-32:{path}")


def test_model_config_json_and_the_vision_cli(tmp_path):
  """An OpenCLIP model-config JSON describes a custom ViT; `convert vision` writes vision_init."""
  from flamingo_jax.convert import __main__ as cli  # pylint: disable=g-import-not-at-top
  from flamingo_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  theirs = _clip(quick_gelu=True)
  (tmp_path / "tiny.json").write_text(json.dumps(
      {"embed_dim": 16, "quick_gelu": True, "vision_cfg": TINY_VISION}))
  safetensors.numpy.save_file(state_of(theirs.visual), str(tmp_path / "vit.safetensors"))
  spec = f"open_clip:{tmp_path}/tiny.json:{tmp_path}/vit.safetensors"
  cfg, params = open_clip_vit.load(spec)
  assert cfg == vit.ViTConfig(**TINY, activation="quick_gelu")
  cli.main(["vision", f"--src={spec}", f"--dst={tmp_path}/vision"])
  stored = checkpoint.load_params(str(tmp_path / "vision"),
                                  {"vision": open_clip_vit.abstract_params(cfg)})
  for a, b in zip(jax.tree.leaves(stored["vision"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  (tmp_path / "pool.json").write_text(json.dumps(
      {"vision_cfg": {**TINY_VISION, "attentional_pool": True, "timm_model_name": "x"}}))
  with pytest.raises(ValueError, match=r"vision_cfg \['attentional_pool', 'timm_model_name'\]"):
    open_clip_vit.model_config(str(tmp_path / "pool.json"))
  with pytest.raises(ValueError, match="expected timm:VARIANT:PATH or open_clip:MODEL:PATH"):
    cli.main(["vision", "--src=tf:F0:x", f"--dst={tmp_path}/bad"])


def test_flamingo_with_open_clip_vit():
  cfg = model_utils.tiny.get_model_config()
  cfg.vision = ml_collections.ConfigDict(dict(kind="open_clip_vit", name="ViT-B-16", **TINY))
  model = flamingo.from_config(cfg)
  assert isinstance(model.vision, vit.ViTConfig) and model.vision.width == 32
  images, tokens, media_idx = model_utils.random_inputs(0)  # images [2, 2, 1, 32, 32, 3]
  params = model_utils.set_gates(model_utils.init(model, images, tokens, media_idx), 0.8)
  assert params["vision"]["blocks"]["query"]["kernel"].shape == (2, 32, 4, 8)
  forward = jax.jit(lambda x: model.apply({"params": params}, x, tokens, media_idx))
  logits = forward(images)
  assert logits.shape == (2, 12, 66) and bool(jnp.isfinite(logits).all())
  assert np.abs(np.asarray(forward(images + 1.0) - logits)).max() > 1e-4  # The ViT's tokens count.
  custom = ml_collections.ConfigDict(dict(kind="open_clip_vit", **TINY, mean=[0.5] * 3))
  assert flamingo.vision_config(custom) == vit.ViTConfig(**TINY, mean=(0.5,) * 3)
  with pytest.raises(ValueError, match="model.vision.kind='vit'"):
    flamingo.vision_config(dict(kind="vit"))


def test_flamingo_keeps_nfnet_by_default():
  vision = flamingo.vision_config(dict(variant="F1"))
  assert not isinstance(vision, vit.ViTConfig) and vision.depths == (2, 4, 12, 6)
