"""Parity with OpenFlamingo 2.0.1: resampler (frame and media embeddings included), gated xattn
block, a whole model via the converter; head counts are always given, never guessed.

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
from tests.peers import rel_error
from tests.peers import state_of

pytestmark = pytest.mark.parity
RTOL = 1e-4


def randomise(module, seed):
  """Every parameter (LayerNorms and tanh gates included) drawn from N(0, 0.5²)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(0.5 * torch.randn(p.shape, generator=gen))
  return module


@pytest.mark.parametrize("frame_embs,media_embs", [(False, False), (True, False), (True, True)])
def test_resampler(frame_embs, media_embs):
  """[b, media, frames, v, D] features; frame_embs is our time_embed, media_time_embs (one row per
  media index, of 4, 3 used) our media_embed."""
  theirs = randomise(helpers.PerceiverResampler(
      dim=24, depth=2, dim_head=8, heads=2, num_latents=4,
      max_num_frames=3 if frame_embs else None, max_num_media=4 if media_embs else None),
      seed=0).eval()
  x = torch.randn(2, 3, 2, 5, 24, generator=torch.Generator().manual_seed(1))
  kwargs, params = open_flamingo.convert_resampler(state_of(theirs), resampler_heads=2)
  assert kwargs["max_media"] == (4 if media_embs else 0)
  ours = perceiver.PerceiverResampler(**kwargs).apply({"params": params}, x.numpy())
  with torch.no_grad():
    expected = theirs(x).numpy()
  err = rel_error(ours, expected)
  print(f"resampler (frame_embs={frame_embs}, media_embs={media_embs}) relative error {err:.2e}")
  assert err <= RTOL
  if media_embs:  # Each media index has its own embedding: swapping two media changes tokens.
    swapped = perceiver.PerceiverResampler(**kwargs).apply({"params": params},
                                                           x.numpy()[:, [1, 0, 2]])
    assert rel_error(swapped[:, 1], ours[:, 0]) > 1e-2
    with pytest.raises(ValueError, match="max_media=4"):
      perceiver.PerceiverResampler(**kwargs).apply({"params": params},
                                                   np.zeros((1, 5, 1, 5, 24), np.float32))


def test_head_counts_are_required():
  """A 4-head block converts to 4 heads; omitted, non-dividing or wrong counts are caught or, for a
  wrong divisor, shown to matter (why the count is never defaulted)."""
  theirs = randomise(helpers.GatedCrossAttentionBlock(dim=16, dim_visual=24, dim_head=4, heads=4,
                                                      ff_mult=2), seed=8).eval()
  gen = torch.Generator().manual_seed(9)
  x, media = torch.randn(1, 5, 16, generator=gen), torch.randn(1, 1, 4, 24, generator=gen)
  locations = torch.zeros(1, 5, dtype=torch.bool)
  locations[:, 0] = True
  with torch.no_grad():
    expected = theirs(x, media, media_locations=locations).numpy()

  def run(heads):
    params = open_flamingo.convert_xattn_block(state_of(theirs), xattn_heads=heads)
    module = xattn.GatedXattnDense(xattn.XattnConfig(
        num_heads=heads, head_dim=16 // heads, ffw_mult=2, activation="gelu", norm_kv=False),
        num_latents=4)
    return module.apply({"params": params}, x.numpy(), media.numpy(),
                        locations.cumsum(-1).numpy().astype(np.int32))

  assert rel_error(run(4), expected) <= RTOL
  assert rel_error(run(2), expected) > 1e-2
  with pytest.raises(TypeError, match="xattn_heads"):
    open_flamingo.convert_xattn_block(state_of(theirs))  # pylint: disable=missing-kwoa
  with pytest.raises(ValueError, match=r"xattn_heads=3 .*hard-codes 8"):
    open_flamingo.convert_xattn_block(state_of(theirs), xattn_heads=3)
  with pytest.raises(ValueError, match="xattn_heads=None"):
    open_flamingo.convert_xattn_block(state_of(theirs), xattn_heads=None)
  resampler = state_of(helpers.PerceiverResampler(dim=24, depth=1, dim_head=8, heads=2,
                                                  num_latents=4))
  with pytest.raises(TypeError, match="resampler_heads"):
    open_flamingo.convert_resampler(resampler)  # pylint: disable=missing-kwoa
  with pytest.raises(ValueError, match="resampler_heads=5"):
    open_flamingo.convert_resampler(resampler, resampler_heads=5)


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
  params = open_flamingo.convert_xattn_block(state_of(theirs), xattn_heads=2)
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


def build_open_flamingo(tmp, video=False, seed=0):
  """A tiny random OpenFlamingo (CLIP ViT + 4-layer untied GQA LLaMA, xattn every 2nd layer, 8
  heads as OpenFlamingo hard-codes); its HF LM saved in tmp/lm. video: the resampler also has
  frame_embs (2 frames) and media_time_embs (2 media), which `Flamingo` itself never builds."""
  import open_clip  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from open_flamingo.src import flamingo as of_flamingo  # pylint: disable=g-import-not-at-top
  from open_flamingo.src import flamingo_lm, utils  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  clip = open_clip.CLIP(
      embed_dim=16, vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
      text_cfg=dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1))
  clip.visual.output_tokens = True
  lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      tie_word_embeddings=False))
  randomise(lm, seed=4 + seed)
  lm.save_pretrained(tmp / "lm")
  utils.extend_instance(lm, flamingo_lm.FlamingoLMMixin)
  lm.set_decoder_layers_attr_name("model.layers")
  lm.resize_token_embeddings(66)  # <|endofchunk|> = 64, <image> = 65.
  model = of_flamingo.Flamingo(clip, lm, eoc_token_id=64, media_token_id=65, vis_dim=32,
                               cross_attn_every_n_layers=2).eval()
  if video:
    model.perceiver = helpers.PerceiverResampler(dim=32, max_num_media=2, max_num_frames=2)
  randomise(model.perceiver, seed=5 + seed)
  randomise(model.lang_encoder.gated_cross_attn_layers, seed=6 + seed)
  return model.eval()


def inputs():
  """(images [B, N, F, C, H, W], tokens): text before the first <image> (65), an <EOC> (64)."""
  gen = torch.Generator().manual_seed(7)
  images = torch.randn(2, 2, 1, 3, 16, 16, generator=gen)
  tokens = torch.randint(0, 64, (2, 12), generator=gen)
  tokens[:, [2, 7]], tokens[:, 10] = 65, 64
  return images, tokens


def forward(theirs, ours, params):
  """(OpenFlamingo's logits, ours on its CLIP features) on `inputs()`."""
  images, tokens = inputs()
  with torch.no_grad():
    expected = theirs(images, tokens).logits.numpy()
    features = theirs.vision_encoder(images.flatten(0, 2))[1]  # [B·N, S, C]
  features = features.reshape(2, 2, 1, *features.shape[1:]).numpy()
  media_idx = np.cumsum(tokens.numpy() == 65, axis=1).astype(np.int32)
  return expected, ours.apply({"params": params}, None, tokens.numpy(), media_idx,
                              features=features)


@pytest.fixture(scope="module", params=[False, True], ids=["image", "video"])
def open_flamingo_model(request, tmp_path_factory):
  """`build_open_flamingo` (without / with the video embeddings), the directory of its
  checkpoint.pt (the full state dict) and HF LM."""
  tmp = tmp_path_factory.mktemp("open_flamingo")
  model = build_open_flamingo(tmp, video=request.param)
  torch.save(model.state_dict(), tmp / "checkpoint.pt")
  return model, tmp


def test_open_flamingo_forward(open_flamingo_model):
  """Logits of the converted model on OpenFlamingo's CLIP features equal OpenFlamingo's."""
  theirs, tmp = open_flamingo_model
  ours, params = open_flamingo.load(str(tmp / "checkpoint.pt"), str(tmp / "lm"),
                                    resampler_heads=8, xattn_heads=8)
  assert ours.lm.xattn.every == 2 and ours.lm.vocab_size == 64 and ours.lm.num_new_tokens == 2
  video = theirs.perceiver.media_time_embs is not None
  assert ours.connector.max_media == (2 if video else 0)
  assert ours.connector.max_frames == (2 if video else 1)
  expected, logits = forward(theirs, ours, params)
  err = rel_error(logits, expected)
  print(f"OpenFlamingo forward (video={video}): logits {expected.shape}, relative error {err:.2e}")
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
  heads = dict(resampler_heads=8, xattn_heads=8)
  _, params = open_flamingo.convert(released, lm_cfg, lm_params, **heads)
  assert params["lm"]["groups"]["xattn"]["attn_gate"].shape == (1,)
  broken = {k: v for k, v in released.items() if k != "perceiver.norm.bias"}
  broken["perceiver.unknown"] = np.zeros((2, 1, 32), np.float32)
  with pytest.raises(ValueError, match=r"(?s)resampler/norm/bias.*perceiver\.unknown"):
    open_flamingo.convert(broken, lm_cfg, lm_params, **heads)
  with pytest.raises(ValueError, match="hf_state"):
    open_flamingo.convert(full, lm_cfg, lm_params, **heads)
  with pytest.raises(TypeError, match="resampler_heads"):
    open_flamingo.convert(released, lm_cfg, lm_params)  # pylint: disable=missing-kwoa
