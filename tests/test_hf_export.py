"""The LM exported to Hugging Face loads in transformers with no key left over and computes the same
logits, new-token rows included; HF -> ours -> HF -> ours is lossless (float32, offline)."""
import dataclasses

from flax import traverse_util
import numpy as np
import pytest
import transformers

from flamingo_jax.convert import hf
from flamingo_jax.convert import hf_export
from flamingo_jax.models import lm as lm_lib
from tests.test_hf_parity import CONFIGS, V, apply, hf_logits, random_tokens, rel_error, tiny_hf_lm

pytestmark = pytest.mark.parity


def with_random_new_rows(params, seed=1):
  """Distinct new-token rows, so a misplaced row shows in the logits."""
  rng = np.random.default_rng(seed)
  new = lambda x: rng.normal(0, 0.5, x.shape).astype(np.float32)
  out = dict(params, new_token_embed=new(params["new_token_embed"]))
  if "new_lm_head" in params:
    out["new_lm_head"] = {"kernel": new(params["new_lm_head"]["kernel"])}
  return out


def merged(params):
  """Our params with the new-token rows appended to the base tables, as the export writes them."""
  out = {k: v for k, v in params.items() if not k.startswith("new_")}
  out["token_embed"] = np.concatenate([params["token_embed"], params["new_token_embed"]])
  if "lm_head" in params:
    out["lm_head"] = {"kernel": np.concatenate([params["lm_head"]["kernel"],
                                                params["new_lm_head"]["kernel"]], 1)}
  return out


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_export_loads_in_transformers_and_round_trips(tmp_path, family):
  model = tiny_hf_lm(tmp_path / "hf", family)
  cfg, params = hf.load_hf_lm(str(tmp_path / "hf"))
  params = with_random_new_rows(params)
  hf_export.export(cfg, params, str(tmp_path / "out"), model_type=family)

  back, info = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "out"), output_loading_info=True)
  assert not any(info.values()), info
  assert back.config.vocab_size == V + 2
  tokens = random_tokens(vocab=V + 2)  # New ids V, V+1 included.
  ours = apply(cfg, params, tokens)
  err = rel_error(ours, hf_logits(back.eval(), tokens))
  print(f"{family}: exported relative error {err:.2e}")
  assert err <= 1e-4

  theirs, exported = model.state_dict(), back.state_dict()
  assert sorted(exported) == sorted(theirs)
  for key, x in theirs.items():  # HF -> ours -> HF: the base rows as they were.
    np.testing.assert_allclose(exported[key].numpy()[:x.shape[0]], x.numpy(), atol=1e-6)

  cfg2, params2 = hf.load_hf_lm(str(tmp_path / "out"), num_new_tokens=0)  # ... -> ours again.
  assert lm_lib.forward_fields(cfg2) == lm_lib.forward_fields(
      dataclasses.replace(cfg, vocab_size=V + 2, num_new_tokens=0))
  want = traverse_util.flatten_dict(merged(params), sep="/")
  got = traverse_util.flatten_dict(params2, sep="/")
  assert sorted(got) == sorted(want)
  for path, x in want.items():
    np.testing.assert_array_equal(got[path], x, err_msg=path)


def test_configs_a_family_cannot_express_are_refused():
  cfg = lm_lib.make_config(dict(
      vocab_size=V, dim=64, num_layers=1, num_heads=4, mlp_dim=96, norm="rmsnorm",
      norm_bias=False, activation="silu", gated_mlp=True, tied_embeddings=False,
      sliding_window=8, qkv_bias=True))
  with pytest.raises(ValueError, match=r"llama config.json cannot express this LM: lm.qkv_bias="
                                       r"True .*lm.sliding_window=8 \(as llama: None\)"):
    hf_export.hf_config(cfg, "llama")
  assert hf_export.hf_config(cfg, "qwen2")["use_sliding_window"] is True
  with pytest.raises(ValueError, match="model_type='opt' cannot be exported"):
    hf_export.hf_config(cfg, "opt")
  with pytest.raises(ValueError, match="lm.activation='sqrelu' has no Hugging Face name"):
    hf_export.hf_config(dataclasses.replace(cfg, activation="sqrelu"), "qwen2")
  params = {"token_embed": np.zeros((V, 64)), "bogus": np.zeros(3),
            "layers": {"attn": {"query": {"kernel": np.zeros((1, 64, 4, 8))}}}}
  with pytest.raises(ValueError, match="do not match the LMConfig") as error:
    hf_export.hf_state_dict(cfg, params, "qwen2")
  for line in ("bogus: not a parameter of this LM", "new_token_embed: missing, expected (2, 64)",
               "layers/attn/query/kernel: (1, 64, 4, 8), expected (1, 64, 4, 16)",
               "layers/attn/query/bias: missing, expected (1, 4, 16)"):
    assert line in str(error.value)
