"""Converted Hugging Face causal LMs match transformers on tiny random models (float32, offline)."""
import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
import torch
import transformers

from flamingo_jax.convert import hf
from flamingo_jax.models import lm as lm_lib
from flamingo_jax.models import xattn as xattn_lib
from flamingo_jax.train import state as state_lib

pytestmark = pytest.mark.parity
V = 100  # Base vocabulary of the tiny models.
CONFIGS = {  # family: (config class, tiny settings)
    "gpt2": (transformers.GPT2Config, dict(n_layer=2, n_embd=64, n_head=4, n_positions=64)),
    "llama": (transformers.LlamaConfig, dict(  # Grouped-query attention, untied head.
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)),
    "gpt_neox": (transformers.GPTNeoXConfig, dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        rotary_pct=0.25, use_parallel_residual=True)),
    "mpt": (transformers.MptConfig, dict(  # 6 heads: ALiBi slopes for a non-power of 2.
        d_model=48, n_heads=6, n_layers=2, max_seq_len=64)),
    "mistral": (transformers.MistralConfig, dict(  # A window of 5 < the 16 tokens: it acts.
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=5)),
    "qwen2": (transformers.Qwen2Config, dict(  # q/k/v biases, no o_proj bias.
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)),
    "gemma": (transformers.GemmaConfig, dict(  # head_dim 24: 4 x 24 != 64; one k/v head.
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=24, hidden_act="gelu_pytorch_tanh")),
}


def tiny_hf_lm(directory, family, max_shard_size="5GB", **overrides):
  """A tiny random HF model (every weight perturbed, so norms and biases matter), saved."""
  torch.manual_seed(0)
  config_cls, settings = CONFIGS[family]
  config = config_cls(vocab_size=V, **(settings | overrides))
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(str(directory), max_shard_size=max_shard_size)
  return model


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.numpy()


@functools.cache
def _jitted_apply(cfg):
  return jax.jit(lm_lib.LM(cfg).apply)


def apply(cfg, params, *args):
  """Our logits, jitted once per config (eager flax dispatch is slower for these tiny models)."""
  return _jitted_apply(cfg)({"params": params}, *args)


def rel_error(ours, theirs):
  """max |ours - theirs| / max |theirs|, over the columns both have."""
  ours = np.asarray(ours)[..., :theirs.shape[-1]]
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def random_tokens(seed=0, vocab=V, shape=(2, 16)):
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("family,sharded", [
    ("gpt2", False), ("gpt2", True), ("llama", False), ("gpt_neox", False), ("mpt", False),
    ("mistral", False), ("qwen2", False), ("gemma", False)])
def test_logits_match_transformers(tmp_path, family, sharded):
  model = tiny_hf_lm(tmp_path, family, max_shard_size="20KB" if sharded else "5GB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json") == sharded
  cfg, params = hf.load_hf_lm(str(tmp_path))
  assert (cfg.vocab_size, cfg.num_new_tokens) == (V, 2)  # No tokenizer.json: <image>, <EOC>.
  tokens = random_tokens()
  ours = apply(cfg, params, tokens)
  assert ours.shape == (2, 16, V + 2)
  err = rel_error(ours, hf_logits(model, tokens))
  print(f"{family}{' (sharded)' if sharded else ''}: relative error {err:.2e}")
  assert err <= 1e-4


@pytest.mark.parametrize("family, theta_key", [
    ("llama", "rope_theta"), ("gpt_neox", "rotary_emb_base"), ("mistral", "rope_theta"),
    ("qwen2", "rope_theta"), ("gemma", "rope_theta")])
def test_transformers_5_rope_parameters_are_read(tmp_path, family, theta_key):
  """transformers 5.x writes the rotary base under rope_parameters: a model trained with θ=5e5
  converted from that layout matches (reading only the 4.x key would silently use 1e4)."""
  model = tiny_hf_lm(tmp_path, family, **{theta_key: 500000.0})
  config = json.loads((tmp_path / "config.json").read_text())
  assert config.pop(theta_key) == 500000.0
  config.pop("rope_scaling", None)
  config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
  if family == "gpt_neox":
    config["rope_parameters"]["partial_rotary_factor"] = config.pop("rotary_pct")
  (tmp_path / "config.json").write_text(json.dumps(config))
  cfg, params = hf.load_hf_lm(str(tmp_path))
  assert cfg.rope_theta == 500000.0
  tokens = random_tokens()
  assert rel_error(apply(cfg, params, tokens), hf_logits(model, tokens)) <= 1e-4


@pytest.mark.parametrize("rope", [
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
])
def test_scaled_rotary_embeddings_are_refused_by_name(rope):
  base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
          "num_hidden_layers": 1, "intermediate_size": 96, "vocab_size": V}
  with pytest.raises(ValueError, match="rope_scaling|rope_parameters.rope_type"):
    hf.convert({}, {**base, **rope})


def test_partial_rotary_is_refused_outside_gpt_neox():
  base = {"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4,
          "num_hidden_layers": 1, "intermediate_size": 96, "vocab_size": V}
  for extra in ({"partial_rotary_factor": 0.5},
                {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}):
    with pytest.raises(ValueError, match="mistral config.json sets partial_rotary_factor=0.5"):
      hf.convert({}, {**base, **extra})


def test_gemma_parts_each_matter(tmp_path):
  """Gemma's (1 + weight) norms, sqrt(dim)-scaled embeddings and GeGLU: dropping any one moves the
  logits far from transformers'."""
  model = tiny_hf_lm(tmp_path, "gemma")
  cfg, params = hf.load_hf_lm(str(tmp_path))
  assert (cfg.scale_embeddings, cfg.head_dim, cfg.activation, cfg.tied_embeddings) == (
      True, 24, "gelu_tanh", True)
  tokens = random_tokens()
  theirs = hf_logits(model, tokens)
  raw_norms = jax.tree_util.tree_map_with_path(
      lambda path, x: x - 1 if "norm" in str(path) else x, params)
  for wrong_cfg, wrong_params in ((dataclasses.replace(cfg, scale_embeddings=False), params),
                                  (dataclasses.replace(cfg, activation="silu"), params),
                                  (cfg, raw_norms)):
    assert rel_error(apply(wrong_cfg, wrong_params, tokens), theirs) > 1e-3


def test_sliding_window_acts_and_decodes(tmp_path):
  """Mistral's window (5 of 16 tokens) matches transformers, in one pass and token by token from
  the KV cache; without it the logits differ."""
  model = tiny_hf_lm(tmp_path, "mistral")
  cfg, params = hf.load_hf_lm(str(tmp_path))
  assert cfg.sliding_window == 5
  tokens = random_tokens()
  theirs = hf_logits(model, tokens)
  assert rel_error(apply(cfg, params, tokens), theirs) <= 1e-4
  assert rel_error(apply(dataclasses.replace(cfg, sliding_window=None), params, tokens),
                   theirs) > 1e-3
  decoder = lm_lib.LM(cfg, decode=True)
  cache = jax.jit(decoder.init)(jax.random.key(0), np.zeros((2, 16), np.int32))["cache"]
  # Jitted (two compiles: the 3-token prefix, then every 1-token step): eager dispatch of the 14
  # calls takes most of this test's time.
  step = jax.jit(functools.partial(decoder.apply, mutable=["cache"]))
  logits, state = step({"params": params, "cache": cache}, tokens[:, :3])
  steps = [logits]
  for t in range(3, 16):
    logits, state = step({"params": params, **state}, tokens[:, t:t + 1])
    steps.append(logits)
  assert rel_error(np.concatenate(steps, 1), theirs) <= 1e-4


@pytest.mark.parametrize("layers,window", [(0, 5), (2, None)])
def test_qwen2_window_on_all_layers_or_none(tmp_path, layers, window):
  """use_sliding_window from layer `max_window_layers` on: all layers (0) or none (2 of 2)."""
  model = tiny_hf_lm(tmp_path, "qwen2", use_sliding_window=True, sliding_window=5,
                     max_window_layers=layers)
  cfg, params = hf.load_hf_lm(str(tmp_path))
  assert (cfg.sliding_window, cfg.qkv_bias, cfg.use_bias) == (window, True, False)
  tokens = random_tokens()
  assert rel_error(apply(cfg, params, tokens), hf_logits(model, tokens)) <= 1e-4


def test_qwen2_mixed_windows_and_gemma2_are_refused():
  base = {"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4,
          "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": V}
  with pytest.raises(ValueError, match="use_sliding_window=true with sliding_window=8 on only "
                                       "some layers .*max_window_layers=1"):
    hf.convert({}, {**base, "use_sliding_window": True, "sliding_window": 8,
                    "max_window_layers": 1})
  with pytest.raises(ValueError, match="layer_types"):
    hf.convert({}, {**base, "layer_types": ["full_attention", "chunked_attention"]})
  with pytest.raises(ValueError, match="model_type='gemma2' is not supported"):
    hf.convert({}, {**base, "model_type": "gemma2"})
  with pytest.raises(ValueError, match="attention_bias"):
    hf.convert({}, {**base, "model_type": "gemma", "attention_bias": True})


def word_level_tokenizer(directory, size):
  """A tokenizer.json with `size` < V words: the checkpoint's extra rows are padding."""
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {f"w{i}": i for i in range(size)}, unk_token="w0"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w1"}))


def test_tokenizer_specials_get_new_rows_after_its_vocabulary(tmp_path):
  model = tiny_hf_lm(tmp_path, "gpt_neox")
  word_level_tokenizer(tmp_path, 90)
  cfg, params = hf.load_hf_lm(str(tmp_path))
  # <image>, <EOC>, <BOS>, <PAD> (the tokenizer config names an EOS) follow its 90 tokens.
  assert (cfg.vocab_size, cfg.num_new_tokens) == (90, 4)
  assert params["token_embed"].shape == (90, 64) and params["lm_head"]["kernel"].shape == (64, 90)
  np.testing.assert_allclose(params["new_token_embed"],
                             np.broadcast_to(params["token_embed"].mean(0), (4, 64)))
  tokens = random_tokens(vocab=90)
  ours = apply(cfg, params, tokens)
  assert ours.shape == (2, 16, 94)
  assert rel_error(ours[..., :90], hf_logits(model, tokens)[..., :90]) <= 1e-4
  tokens[:, 3] = 90  # <image>: a new row, so the prefix before it is unchanged.
  with_image = apply(cfg, params, tokens)
  np.testing.assert_allclose(with_image[:, :3], ours[:, :3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("placement,xattn_layers", [("paper", [0, 2]), ("open_flamingo", [1])])
def test_xattn_blocks_with_zero_gates_keep_the_lm(tmp_path, placement, xattn_layers):
  """The converted plain LM regrouped (`lm.to_layout`) beside fresh xattn blocks, gates at 0."""
  model = tiny_hf_lm(tmp_path, "llama", num_hidden_layers=3)
  plain_cfg, plain = hf.load_hf_lm(str(tmp_path))
  cfg = dataclasses.replace(plain_cfg, xattn=xattn_lib.XattnConfig(
      every=2, placement=placement, num_heads=2, head_dim=16))
  assert lm_lib.xattn_layer_indices(cfg) == xattn_layers
  tokens = random_tokens()
  rng = np.random.default_rng(1)
  visual = rng.normal(size=(2, 2, cfg.num_latents, 24)).astype(np.float32)
  media_idx = np.sort(rng.integers(0, 3, tokens.shape), axis=1).astype(np.int32)
  fresh = jax.jit(lm_lib.LM(cfg).init)(jax.random.key(0), tokens, visual, media_idx)["params"]
  params = state_lib.merge(nn.unbox(fresh), lm_lib.to_layout(plain, cfg))
  err = rel_error(apply(cfg, params, tokens, visual, media_idx), hf_logits(model, tokens))
  print(f"llama + xattn ({placement}): relative error {err:.2e}")
  assert err <= 1e-4
  open_gates = jax.tree_util.tree_map_with_path(
      lambda path, x: np.ones_like(x) if "gate" in str(path[-1]) else x, params)
  open_logits = apply(cfg, open_gates, tokens, visual, media_idx)
  assert rel_error(open_logits, hf_logits(model, tokens)) > 1e-2  # The blocks do act.


def test_mismatches_are_listed_in_one_error(tmp_path):
  tiny_hf_lm(tmp_path, "gpt2")
  state = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
  del state["transformer.h.1.mlp.c_fc.weight"]
  state["transformer.h.9.bogus.weight"] = np.zeros(3, np.float32)
  state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:32]
  state["lm_head.weight"] = state["transformer.wte.weight"]  # Tolerated: a copy of the tied head,
  state["transformer.h.0.attn.bias"] = np.ones((1, 1, 64, 64), bool)  # and an old mask buffer.
  safetensors.numpy.save_file(state, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError) as error:
    hf.load_hf_lm(str(tmp_path))
  message = str(error.value)
  print(message)
  assert "layers/1/mlp/wi/kernel (checkpoint key transformer.h.1.mlp.c_fc.weight)" in message
  assert "1 checkpoint keys not used:\n  transformer.h.9.bogus.weight" in message
  assert "transformer.wpe.weight (32, 64) -> pos_embed expects (64, 64)" in message


def test_refuses_pickles_and_unsupported_configs(tmp_path):
  tiny_hf_lm(tmp_path, "gpt2")
  os.rename(tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin")
  with pytest.raises(ValueError, match=r"only pickled \['pytorch_model.bin'\].*safe_serialization"):
    hf.load_hf_lm(str(tmp_path))
  with pytest.raises(ValueError, match="model_type='opt' is not supported"):
    hf.convert({}, {"model_type": "opt"})
  with pytest.raises(ValueError, match="clip_qkv"):
    hf.convert({}, {"model_type": "mpt", "attn_config": {"clip_qkv": 6.0}})
