"""`python -m flamingo_jax.convert hf` writes an orbax LM checkpoint with the HF model's logits,
in the plain layout that `--config.lm_init` loads into a Flamingo with any xattn placement."""
import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from flamingo_jax.convert import __main__ as cli
from flamingo_jax.convert import hf
from flamingo_jax.convert import safetensors_io
from flamingo_jax.models import flamingo
from flamingo_jax.models import lm as lm_lib
from flamingo_jax.train import checkpoint as ckpt_lib
from flamingo_jax.train import state as state_lib
from flamingo_jax.train import trainer
from tests import test_hf_parity as parity
from tests import test_lm_layout as layout_test


def test_cli_converts_once_and_loads_back(tmp_path):
  src, dst = tmp_path / "hf", tmp_path / "lm"
  model = parity.tiny_hf_lm(src, "mpt")
  parity.word_level_tokenizer(src, 90)
  subprocess.run([sys.executable, "-m", "flamingo_jax.convert", "hf", "--src", str(src),
                  "--dst", str(dst)], check=True, cwd=os.getcwd())
  assert {"lm_config.json", "params", "tokenizer.json", "tokenizer_config.json"} <= set(
      os.listdir(dst))
  assert json.loads((dst / "lm_config.json").read_text())["position"] == "alibi"
  cfg, params = hf.load_converted(str(dst))
  assert (cfg.vocab_size, cfg.num_new_tokens, cfg.xattn) == (90, 4, None)
  tokens = parity.random_tokens(vocab=90)
  ours = parity.apply(cfg, params, tokens)
  assert parity.rel_error(ours[..., :90], parity.hf_logits(model, tokens)[..., :90]) <= 1e-4


@pytest.fixture(scope="module")
def converted_llama(tmp_path_factory):
  """(directory, params) of `convert hf` on a tiny random LLaMA as wide as configs/tiny.py's LM."""
  tmp = tmp_path_factory.mktemp("llama")
  parity.tiny_hf_lm(tmp / "hf", "llama", hidden_size=32, intermediate_size=64,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
  cli.main(["hf", "--src", str(tmp / "hf"), "--dst", str(tmp / "lm")])
  return tmp / "lm", hf.load_converted(str(tmp / "lm"))[1]


def tiny_config_for(lm_dir, every):
  """configs/tiny.py with `--config.lm_init=lm_dir`, its model.lm set as lm_config.json says."""
  config = layout_test.tiny_config(lm_dir, every)
  config.model.lm.update(lm_lib.forward_fields(ckpt_lib.read_lm_config(lm_dir)))
  return config


def test_one_conversion_loads_into_every_placement(converted_llama):
  lm_dir, converted = converted_llama
  assert set(converted) >= {"layers", "token_embed", "new_token_embed"}  # The plain layout.
  for every in (1, 2, 4):
    config = tiny_config_for(lm_dir, every)
    got, _ = layout_test.load(config)
    want = state_lib.flat(lm_lib.to_layout(converted, flamingo.lm_config(config.model)))
    for path, x in want.items():
      np.testing.assert_array_equal(got[path], x, err_msg=path)


@pytest.mark.slow
@pytest.mark.parametrize("every", [1, 2, 4])
def test_a_converted_lm_trains_in_every_placement(converted_llama, tmp_path, every):
  """The issue's "Done when": `convert hf --dst OUT`, then a Flamingo with --config.lm_init=OUT
  trains with xattn every 1, 2 and 4, and its frozen LM is the converted one throughout."""
  lm_dir, converted = converted_llama
  config = tiny_config_for(lm_dir, every)
  config.total_steps = 2
  _, frozen, _ = trainer.train(config, str(tmp_path))
  got = state_lib.flat(lm_lib.to_plain(frozen["lm"]))
  converted = state_lib.flat(converted)
  assert len(got) == len(converted) - 2  # All but the trainable new rows.
  for path, x in got.items():
    np.testing.assert_array_equal(x, converted[path], err_msg=path)


def _bf16_copy(directory):
  """Rewrites the floating tensors of `directory`'s safetensors as bfloat16 (as HF ships them);
  returns {name: the bf16 array}."""
  tensors = {}
  for name in os.listdir(directory):
    if name.endswith(".safetensors"):
      shard = {k: v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v
               for k, v in safetensors.numpy.load_file(str(directory / name)).items()}
      safetensors.numpy.save_file(shard, str(directory / name))
      tensors |= shard
  return tensors


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
  """(directory, tensors) of a tiny random bfloat16 LLaMA as wide as configs/tiny.py's LM."""
  src = tmp_path_factory.mktemp("bf16") / "hf"
  parity.tiny_hf_lm(src, "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2)
  return src, _bf16_copy(src)


def test_lazy_reader_reads_what_the_eager_one_does(tmp_path):
  rng = np.random.RandomState(0)
  shards = [{"a": rng.randn(3, 4).astype(ml_dtypes.bfloat16), "b": rng.randn(5).astype(np.float16)},
            {"c": np.arange(6, dtype=np.int64).reshape(2, 3), "d": rng.randn(2, 2, 2)}]
  for i, shard in enumerate(shards):
    safetensors.numpy.save_file(shard, str(tmp_path / f"model-{i}.safetensors"))
  lazy = safetensors_io.Checkpoint(str(tmp_path))
  eager = safetensors_io.load(str(tmp_path))
  assert sorted(lazy) == sorted(eager) == ["a", "b", "c", "d"] and len(lazy) == 4
  assert "a" in lazy and "e" not in lazy
  for shard in shards:
    for k, v in shard.items():
      assert lazy.dtype(k) == lazy[k].dtype == eager[k].dtype == v.dtype, k
      np.testing.assert_array_equal(lazy[k].view(np.uint8), v.view(np.uint8), err_msg=k)
      np.testing.assert_array_equal(eager[k].view(np.uint8), v.view(np.uint8), err_msg=k)
  safetensors.numpy.save_file({"a": np.zeros(1)}, str(tmp_path / "model-2.safetensors"))
  with pytest.raises(ValueError, match=r"model-2.safetensors' repeats tensors .*\['a'\]"):
    safetensors_io.Checkpoint(str(tmp_path))


@pytest.mark.parametrize("flag, dtype", [(None, "bfloat16"), ("float32", "float32")])
def test_bf16_checkpoint_keeps_its_dtype_unless_asked(bf16_llama, tmp_path, flag, dtype):
  src, tensors = bf16_llama
  cli.main(["hf", "--src", str(src), "--dst", str(tmp_path)] + (["--dtype", flag] if flag else []))
  assert json.loads((tmp_path / "lm_config.json").read_text())["param_dtype"] == dtype
  cfg, params = hf.load_converted(str(tmp_path))
  assert cfg.param_dtype == dtype
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(dtype)}
  # The stored bf16 values, exactly (bf16 -> float32 is exact).
  want = tensors["model.layers.2.mlp.gate_proj.weight"].T.astype(dtype)
  np.testing.assert_array_equal(params["layers"]["mlp"]["wi"]["kernel"][2], want)
  np.testing.assert_array_equal(params["token_embed"],
                                tensors["model.embed_tokens.weight"].astype(dtype))


def test_bf16_lm_loads_cast_into_a_float32_flamingo(bf16_llama, tmp_path):
  """lm_init holding bfloat16 params, model.param_dtype float32: the trainer casts them (exact)."""
  src, _ = bf16_llama
  cli.main(["hf", "--src", str(src), "--dst", str(tmp_path / "lm")])
  _, converted = hf.load_converted(str(tmp_path / "lm"))
  config = tiny_config_for(tmp_path / "lm", 2)
  assert config.model.get("param_dtype", "float32") == "float32"
  got, _ = layout_test.load(config)
  want = state_lib.flat(lm_lib.to_layout(converted, flamingo.lm_config(config.model)))
  for path, x in want.items():
    assert got[path].dtype == np.float32, path
    np.testing.assert_array_equal(got[path], x.astype(np.float32), err_msg=path)


def test_mixed_or_unknown_dtypes_are_refused():
  config = {"model_type": "llama", "vocab_size": 8, "hidden_size": 4, "num_hidden_layers": 1,
            "num_attention_heads": 1, "intermediate_size": 8}
  state = {"model.embed_tokens.weight": np.zeros((8, 4), ml_dtypes.bfloat16),
           "model.norm.weight": np.zeros(4, np.float32)}
  with pytest.raises(ValueError, match="several dtypes.*bfloat16.*float32.*--dtype"):
    hf.convert(state, config)
  with pytest.raises(ValueError, match=r"^dtype 'int8': expected one of \('bfloat16'"):
    hf.convert(state, config, dtype="int8")
  with pytest.raises(ValueError, match=r"checkpoint's dtype \(pass dtype= to cast\) 'float64'"):
    hf.convert({k: v.astype(np.float64) for k, v in state.items()}, config)
