"""GATED XATTN-DENSE and its per-image masking, probed directly."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import xattn

B, L, D, N, R, DV = 2, 9, 16, 3, 4, 12
MEDIA_IDX = jnp.array([[0, 0, 1, 1, 1, 2, 2, 3, 3]] * B)


def inputs(seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return jax.random.normal(k1, (B, L, D)), jax.random.normal(k2, (B, N, R, DV))


def perturb(visual, image):
  """A random change to image `image` (a constant shift would vanish in the key/value LayerNorm)."""
  noise = jax.random.normal(jax.random.PRNGKey(7), visual.shape[2:])
  return visual.at[:, image].add(noise)


def run_attention(visual, y, only_attend_immediate=True):
  module = xattn.MaskedCrossAttention(num_heads=2, num_latents=R, head_dim=8,
                                      only_attend_immediate=only_attend_immediate)
  params = nn.unbox(module.init(jax.random.PRNGKey(1), y, visual, MEDIA_IDX))
  return module.apply(params, y, visual, MEDIA_IDX)


def test_mask_layout():
  mask = xattn.media_mask(jnp.array([[0, 1, 2]]), num_media=2, num_latents=2,
                          only_attend_immediate=True)
  np.testing.assert_array_equal(mask[0, 0], [[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]])
  mask = xattn.media_mask(jnp.array([[0, 1, 2]]), 2, 2, only_attend_immediate=False)
  np.testing.assert_array_equal(mask[0, 0], [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])


@pytest.mark.parametrize("image", [0, 1, 2])
def test_token_sees_only_its_own_image(image):
  """Changing image j changes exactly the tokens whose media_idx is j+1."""
  y, visual = inputs()
  base = run_attention(visual, y)
  changed = run_attention(perturb(visual, image), y)
  moved = np.abs(np.asarray(changed - base)).max(axis=(0, 2)) > 1e-6  # [L]
  np.testing.assert_array_equal(moved, np.asarray(MEDIA_IDX[0]) == image + 1)


def test_all_previous_images_ablation_sees_earlier_images():
  y, visual = inputs()
  base = run_attention(visual, y, only_attend_immediate=False)
  changed = run_attention(perturb(visual, 0), y, only_attend_immediate=False)
  moved = np.abs(np.asarray(changed - base)).max(axis=(0, 2)) > 1e-6
  np.testing.assert_array_equal(moved, np.asarray(MEDIA_IDX[0]) >= 1)


def test_tokens_before_any_image_get_zero_output():
  y, visual = inputs()
  out = run_attention(visual, y)
  np.testing.assert_array_equal(out[:, :2], 0.0)
  assert np.abs(np.asarray(out[:, 2:])).min() > 0


def block_and_params(gated=True, **kw):
  y, visual = inputs()
  block = xattn.GatedXattnDense(xattn.XattnConfig(num_heads=2, head_dim=8, gated=gated, **kw), R)
  return block, nn.unbox(block.init(jax.random.PRNGKey(2), y, visual, MEDIA_IDX)), y, visual


def test_gates_start_at_zero_so_block_is_identity():
  block, params, y, visual = block_and_params()
  assert float(params["params"]["attn_gate"]) == 0.0 == float(params["params"]["ffw_gate"])
  np.testing.assert_array_equal(block.apply(params, y, visual, MEDIA_IDX), y)


def test_gate_values_scale_the_branches():
  block, params, y, visual = block_and_params()
  p = jax.tree_util.tree_map(lambda a: a, params)
  p["params"]["attn_gate"] = jnp.array(0.3)
  out_attn_only = block.apply(p, y, visual, MEDIA_IDX)
  attn = xattn.MaskedCrossAttention(2, R, 8).apply({"params": p["params"]["attn"]}, y, visual,
                                                   MEDIA_IDX)
  np.testing.assert_allclose(out_attn_only, y + np.tanh(0.3) * attn, rtol=1e-5, atol=1e-6)


def test_ungated_ablation_has_no_gates_and_changes_output():
  block, params, y, visual = block_and_params(gated=False)
  assert "attn_gate" not in params["params"]
  assert np.abs(np.asarray(block.apply(params, y, visual, MEDIA_IDX) - y)).max() > 1e-3


def test_vanilla_xattn_is_the_cross_attention_alone():
  """Table 3's "vanilla xattn": y + xattn(y, x), no gates, no FFW."""
  block, params, y, visual = block_and_params(gated=False, dense=False)
  assert set(params["params"]) == {"attn"}
  attn = xattn.MaskedCrossAttention(2, R, 8).apply({"params": params["params"]["attn"]}, y,
                                                   visual, MEDIA_IDX)
  np.testing.assert_allclose(block.apply(params, y, visual, MEDIA_IDX), y + attn, rtol=1e-5,
                             atol=1e-6)


def test_decode_reuses_cached_visual_keys():
  block, params, y, visual = block_and_params()
  p = dict(params)
  p["params"] = dict(params["params"], attn_gate=jnp.array(0.5))
  full = block.apply(p, y, visual, MEDIA_IDX)
  cache = block.apply(p, y[:, :5], visual, MEDIA_IDX[:, :5], decode=True, mutable=["cache"])[1]
  step = block.apply({**p, **cache}, y[:, 5:], None, MEDIA_IDX[:, 5:], decode=True,
                     mutable=["cache"])[0]
  np.testing.assert_allclose(step, full[:, 5:], rtol=1e-5, atol=1e-5)


def test_wrong_number_of_visual_tokens_is_an_error():
  block, params, y, visual = block_and_params()
  with pytest.raises(ValueError, match="num_latents"):
    block.apply(params, y, visual[:, :, :3], MEDIA_IDX)
