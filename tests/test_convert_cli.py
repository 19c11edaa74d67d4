"""`python -m flamingo_jax.convert hf` writes an orbax LM checkpoint with the HF model's logits."""
import json
import os
import subprocess
import sys

import numpy as np

from flamingo_jax.convert import __main__ as cli
from flamingo_jax.convert import hf
from flamingo_jax.models import lm as lm_lib
from tests import test_hf_parity as parity


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


def test_cli_with_xattn_blocks(tmp_path):
  src, dst = tmp_path / "hf", tmp_path / "lm"
  model = parity.tiny_hf_lm(src, "gpt_neox", num_hidden_layers=3)
  cli.main(["hf", "--src", str(src), "--dst", str(dst), "--xattn_every", "2",
            "--xattn_placement", "open_flamingo", "--xattn_num_heads", "2",
            "--xattn_head_dim", "8", "--visual_dim", "16"])
  cfg, params = hf.load_converted(str(dst), visual_dim=16)
  assert (cfg.xattn.every, cfg.xattn.placement, cfg.xattn.num_heads) == (2, "open_flamingo", 2)
  assert lm_lib.xattn_layer_indices(cfg) == [1]
  tokens = parity.random_tokens()
  visual = np.random.default_rng(0).normal(size=(2, 1, cfg.num_latents, 16)).astype(np.float32)
  media_idx = np.ones_like(tokens)
  ours = parity.apply(cfg, params, tokens, visual, media_idx)
  assert parity.rel_error(ours, parity.hf_logits(model, tokens)) <= 1e-4
