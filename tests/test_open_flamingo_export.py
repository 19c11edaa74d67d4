"""Export back to OpenFlamingo: OpenFlamingo -> convert -> export -> a fresh OpenFlamingo loads it
strictly and computes the same logits; export inverts convert exactly."""
import dataclasses

import jax
import numpy as np
import pytest
import torch

from flamingo_jax.convert import hf
from flamingo_jax.convert import open_flamingo
from flamingo_jax.convert import safetensors_io
from flamingo_jax.convert import state_dict
from flamingo_jax.models import perceiver
from tests.test_open_flamingo_parity import build_open_flamingo
from tests.test_open_flamingo_parity import forward
from tests.test_open_flamingo_parity import inputs
from tests.peers import rel_error
from tests.peers import state_of

pytestmark = pytest.mark.parity
HEADS = dict(resampler_heads=8, xattn_heads=8)


@pytest.fixture(scope="module", params=[False, True], ids=["image", "video"])
def converted(request, tmp_path_factory):
  """(OpenFlamingo model, its HF LM tensors, our model, params, the export of them)."""
  tmp = tmp_path_factory.mktemp("export")
  theirs = build_open_flamingo(tmp, video=request.param)
  lm_state = safetensors_io.load(str(tmp / "lm"))
  lm_cfg, lm_params = hf.load_hf_lm(str(tmp / "lm"), num_new_tokens=0)
  ours, params = open_flamingo.convert(state_of(theirs), lm_cfg, lm_params, hf_state=lm_state,
                                       **HEADS)
  vision = state_of(theirs.vision_encoder)
  exported = open_flamingo.export(ours, params, vision, lm_state=lm_state)
  return theirs, lm_state, ours, params, exported, (lm_cfg, lm_params)


def test_fresh_open_flamingo_loads_the_export(converted, tmp_path):
  """Strict load into a differently seeded model; same tensors, same logits as the original."""
  theirs, _, ours, params, exported, _ = converted
  fresh = build_open_flamingo(tmp_path, video=theirs.perceiver.media_time_embs is not None,
                              seed=100)
  assert not torch.equal(fresh.perceiver.latents, theirs.perceiver.latents)
  fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()},
                        strict=True)
  expected = state_of(theirs)
  assert sorted(exported) == sorted(expected)
  for key, value in state_of(fresh).items():
    np.testing.assert_array_equal(value, expected[key], err_msg=key)
  images, tokens = inputs()
  with torch.no_grad():
    logits, reference = fresh(images, tokens).logits.numpy(), theirs(images, tokens).logits.numpy()
  assert rel_error(logits, reference) <= 1e-4
  _, ours_logits = forward(fresh, ours, params)  # And ours still agrees with the reloaded model.
  assert rel_error(ours_logits, logits) <= 1e-4


def test_convert_of_export_is_identity(converted):
  theirs, lm_state, _, params, exported, (lm_cfg, lm_params) = converted
  _, again = open_flamingo.convert(exported, lm_cfg, lm_params, hf_state=lm_state, **HEADS)
  jax.tree.map(np.testing.assert_array_equal, again, params)
  assert ("perceiver.media_time_embs" in exported) == (theirs.perceiver.media_time_embs
                                                       is not None)


def test_save_checkpoint_as_openflamingo_training(converted, tmp_path):
  """{'model_state_dict': ...} of tensors: torch.load(weights_only=True) and state_dict.read."""
  *_, exported, _ = converted
  open_flamingo.save_checkpoint(exported, str(tmp_path / "checkpoint.pt"))
  saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
  assert list(saved) == ["model_state_dict"]
  back = state_dict.read(str(tmp_path / "checkpoint.pt"))
  assert sorted(back) == sorted(exported)
  for key, value in exported.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_export_without_vision(converted):
  """Only the vision tower is then missing (OpenFlamingo's released checkpoints lack it too)."""
  theirs, lm_state, ours, params, _, _ = converted
  state = open_flamingo.export(ours, params, lm_state=lm_state)
  result = theirs.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                                  strict=False)
  assert not result.unexpected_keys
  assert result.missing_keys and all(k.startswith("vision_encoder.")
                                     for k in result.missing_keys)


def test_export_errors(converted):
  """Each bad input is named: a config OpenFlamingo cannot compute, a parameter it has no place
  for, an LM state dict of another depth."""
  _, lm_state, ours, params, _, _ = converted
  sqrelu = ours.clone(connector=dataclasses.replace(ours.connector, activation="sqrelu"))
  with pytest.raises(ValueError, match="connector.activation='sqrelu'"):
    open_flamingo.export(sqrelu, params, lm_state=lm_state)
  projected = {**params, "resampler": {**params["resampler"], "input_proj": {"kernel": 0}}}
  with pytest.raises(ValueError, match="no OpenFlamingo tensor for resampler/input_proj/kernel"):
    open_flamingo.export(ours, projected, lm_state=lm_state)
  shallow = {k: v for k, v in lm_state.items() if not k.startswith("model.layers.3.")}
  with pytest.raises(ValueError, match="lm_state has 3 decoder layers"):
    open_flamingo.export(ours, params, lm_state=shallow)
  with_media = ours.clone(connector=perceiver.ConnectorConfig(
      **{**dataclasses.asdict(ours.connector), "max_media": 2}))
  if not ours.connector.max_media:
    with pytest.raises(ValueError, match="missing resampler/media_embed"):
      open_flamingo.export(with_media, params, lm_state=lm_state)
