"""`python -m flamingo_jax.convert hf` writes an orbax LM checkpoint with the HF model's logits,
in the plain layout that `--config.lm_init` loads into a Flamingo with any xattn placement."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flamingo_jax.convert import __main__ as cli
from flamingo_jax.convert import hf
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
