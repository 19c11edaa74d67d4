"""Parity with OpenFlamingo 2.0.1: resampler, gated xattn block, a whole model via the converter.

Vision is out of scope here (no ViT in JAX): our model takes OpenFlamingo's CLIP patch tokens,
computed in torch, as `features`.
"""
import numpy as np
from open_flamingo.src import helpers
import pytest
import torch

from flamingo_jax.convert import open_flamingo
from flamingo_jax.models import perceiver
from flamingo_jax.models import xattn

pytestmark = pytest.mark.parity
RTOL = 1e-4


def randomise(module, seed):
  """Every parameter (LayerNorms and tanh gates included) drawn from N(0, 0.5²)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(0.5 * torch.randn(p.shape, generator=gen))
  return module


def state_of(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def rel_error(ours, theirs):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("frame_embs", [False, True])
def test_resampler(frame_embs):
  """[b, media, frames, v, D] features; with frame_embs the learned table is our time_embed."""
  theirs = randomise(helpers.PerceiverResampler(
      dim=24, depth=2, dim_head=8, heads=2, num_latents=4,
      max_num_frames=3 if frame_embs else None), seed=0).eval()
  x = torch.randn(2, 3, 2, 5, 24, generator=torch.Generator().manual_seed(1))
  kwargs, params = open_flamingo.convert_resampler(state_of(theirs), heads=2)
  ours = perceiver.PerceiverResampler(**kwargs).apply({"params": params}, x.numpy())
  with torch.no_grad():
    expected = theirs(x).numpy()
  err = rel_error(ours, expected)
  print(f"resampler (frame_embs={frame_embs}) relative error {err:.2e}")
  assert err <= RTOL


def xattn_case(only_attend_immediate):
  """OpenFlamingo's block with random weights and gates; text before the first of two images."""
  theirs = randomise(helpers.GatedCrossAttentionBlock(
      dim=16, dim_visual=24, dim_head=8, heads=2, ff_mult=2,
      only_attend_immediate_media=only_attend_immediate), seed=2).eval()
  gen = torch.Generator().manual_seed(3)
  x, media = torch.randn(2, 9, 16, generator=gen), torch.randn(2, 2, 4, 24, generator=gen)
  locations = torch.zeros(2, 9, dtype=torch.bool)
  locations[:, [2, 5]] = True  # Tokens 0-1 precede any image.
  media_idx = locations.cumsum(-1).numpy().astype(np.int32)
  params = open_flamingo.convert_xattn_block(state_of(theirs), heads=2)
  module = xattn.GatedXattnDense(xattn.XattnConfig(
      num_heads=2, head_dim=8, ffw_mult=2, activation="gelu",
      only_attend_immediate=only_attend_immediate, norm_kv=False), num_latents=4)
  ours = np.asarray(module.apply({"params": params}, x.numpy(), media.numpy(), media_idx))
  with torch.no_grad():
    expected = theirs(x, media, media_locations=locations).numpy()
  return ours, expected, params


def test_xattn_block_immediate_media():
  ours, expected, params = xattn_case(only_attend_immediate=True)
  assert params["attn_gate"] != 0 and params["ffw_gate"] != 0
  err = rel_error(ours, expected)
  print(f"gated xattn block relative error {err:.2e}")
  assert err <= RTOL


def test_xattn_block_all_previous_media():
  """Equal once an image has been seen. Before the first image OpenFlamingo's fully masked
  softmax turns uniform over all images; ours gives those tokens no visual input (see xattn.py)."""
  ours, expected, _ = xattn_case(only_attend_immediate=False)
  err = rel_error(ours[:, 2:], expected[:, 2:])
  print(f"gated xattn block (all previous media) relative error {err:.2e}")
  assert err <= RTOL
  assert rel_error(ours[:, :2], expected[:, :2]) > 1e-2


@pytest.fixture(scope="module")
def open_flamingo_model(tmp_path_factory):
  """A tiny OpenFlamingo (CLIP ViT + 4-layer untied GQA LLaMA, xattn every 2nd layer), its
  checkpoint.pt (the full state dict) and the HF LM directory."""
  import open_clip  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from open_flamingo.src import flamingo as of_flamingo  # pylint: disable=g-import-not-at-top
  from open_flamingo.src import flamingo_lm, utils  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  clip = open_clip.CLIP(
      embed_dim=16, vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
      text_cfg=dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1))
  clip.visual.output_tokens = True
  lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      tie_word_embeddings=False))
  randomise(lm, seed=4)
  tmp = tmp_path_factory.mktemp("open_flamingo")
  lm.save_pretrained(tmp / "lm")
  utils.extend_instance(lm, flamingo_lm.FlamingoLMMixin)
  lm.set_decoder_layers_attr_name("model.layers")
  lm.resize_token_embeddings(66)  # <|endofchunk|> = 64, <image> = 65.
  model = of_flamingo.Flamingo(clip, lm, eoc_token_id=64, media_token_id=65, vis_dim=32,
                               cross_attn_every_n_layers=2).eval()
  randomise(model.perceiver, seed=5)
  randomise(model.lang_encoder.gated_cross_attn_layers, seed=6)
  torch.save(model.state_dict(), tmp / "checkpoint.pt")
  return model, tmp


def test_open_flamingo_forward(open_flamingo_model):
  """Logits of the converted model on OpenFlamingo's CLIP features equal OpenFlamingo's."""
  theirs, tmp = open_flamingo_model
  ours, params = open_flamingo.load(str(tmp / "checkpoint.pt"), str(tmp / "lm"))
  assert ours.lm.xattn.every == 2 and ours.lm.vocab_size == 64 and ours.lm.num_new_tokens == 2
  gen = torch.Generator().manual_seed(7)
  images = torch.randn(2, 2, 1, 3, 16, 16, generator=gen)  # [B, N, F, C, H, W]
  tokens = torch.randint(0, 64, (2, 12), generator=gen)
  tokens[:, [2, 7]], tokens[:, 10] = 65, 64  # Text before the first <image>; an <EOC>.
  with torch.no_grad():
    expected = theirs(images, tokens).logits.numpy()
    features = theirs.vision_encoder(images.flatten(0, 2))[1]  # [B·N, S, C]
  features = features.reshape(2, 2, 1, *features.shape[1:]).numpy()
  media_idx = np.cumsum(tokens.numpy() == 65, axis=1).astype(np.int32)
  logits = ours.apply({"params": params}, None, tokens.numpy(), media_idx, features=features)
  err = rel_error(logits, expected)
  print(f"OpenFlamingo forward: logits {expected.shape}, relative error {err:.2e}")
  assert err <= RTOL


def test_trainable_only_checkpoint_and_errors(open_flamingo_model):
  """OpenFlamingo's released format (perceiver, xattn, embeddings) converts alone; a missing and
  an unknown tensor are both named in one error."""
  theirs, tmp = open_flamingo_model
  from flamingo_jax.convert import hf  # pylint: disable=g-import-not-at-top
  lm_cfg, lm_params = hf.load_hf_lm(str(tmp / "lm"), num_new_tokens=0)
  full = state_of(theirs)
  released = {k: v for k, v in full.items()
              if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k
              or k.endswith(("embed_tokens.weight", "lm_head.weight"))}
  _, params = open_flamingo.convert(released, lm_cfg, lm_params)
  assert params["lm"]["groups"]["xattn"]["attn_gate"].shape == (1,)
  broken = {k: v for k, v in released.items() if k != "perceiver.norm.bias"}
  broken["perceiver.media_time_embs"] = np.zeros((2, 1, 32), np.float32)
  with pytest.raises(ValueError, match=r"(?s)resampler/norm/bias.*perceiver\.media_time_embs"):
    open_flamingo.convert(broken, lm_cfg, lm_params)
  with pytest.raises(ValueError, match="hf_state"):
    open_flamingo.convert(full, lm_cfg, lm_params)
