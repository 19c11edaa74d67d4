"""Converts a checkpoint once into ours: an orbax params checkpoint plus its config as JSON.

  python -m flamingo_jax.convert hf --src path/to/hf_model --dst path/to/lm [--num_new_tokens N]

writes dst/params (orbax), dst/lm_config.json (an LMConfig, for configs to reference) and copies the
tokenizer files, so dst is self-contained; `hf.load_converted(dst)` reads it back. The LM is plain,
so one conversion serves every xattn placement: `--config.lm_init=dst` loads it into a Flamingo
whose config.model.lm agrees with lm_config.json (train/kinds/flamingo.py).
"""
import argparse
import os
import shutil

from flamingo_jax import paths
from flamingo_jax.convert import hf

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _hf(args):
  cfg, params = hf.load_hf_lm(args.src, args.num_new_tokens)
  hf.save_converted(args.dst, cfg, params)
  for name in _TOKENIZER_FILES:
    if os.path.exists(os.path.join(args.src, name)):
      shutil.copy(os.path.join(args.src, name), os.path.join(args.dst, name))
  print(f"Wrote {cfg.num_layers}-layer LM (vocab {cfg.vocab_size} + {cfg.num_new_tokens} new) "
        f"to {args.dst}.")


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m flamingo_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="source", required=True)
  p = sub.add_parser("hf", help="a Hugging Face causal LM directory (config.json + safetensors)")
  p.add_argument("--src", required=True, type=paths.resolve, help="HF model directory.")
  p.add_argument("--dst", required=True, type=paths.resolve, help="Output directory.")
  p.add_argument("--num_new_tokens", type=int, default=None,
                 help="Trainable new token rows (default: as many as the tokenizer adds, else 2).")
  p.set_defaults(run=_hf)
  args = parser.parse_args(argv)
  args.run(args)


if __name__ == "__main__":
  main()
