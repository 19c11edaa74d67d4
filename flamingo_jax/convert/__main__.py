"""Converts a checkpoint once into ours: an orbax params checkpoint plus its config as JSON.

  python -m flamingo_jax.convert hf --src path/to/hf_model --dst path/to/lm
      [--num_new_tokens N] [--xattn_every 4 --xattn_placement paper --visual_dim 1536]

writes dst/params (orbax), dst/lm_config.json (an LMConfig, for configs to reference) and copies the
tokenizer files, so dst is self-contained; `hf.load_converted(dst[, visual_dim])` reads it back.
Without --xattn_every the LM is plain, and one conversion serves every xattn placement
(`hf.add_xattn`).
"""
import argparse
import os
import shutil

from flamingo_jax import paths
from flamingo_jax.convert import hf

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _hf(args):
  xattn = None
  if args.xattn_every:
    xattn = {"every": args.xattn_every, "placement": args.xattn_placement}
    xattn |= {k: v for k, v in (("num_heads", args.xattn_num_heads),
                                ("head_dim", args.xattn_head_dim)) if v is not None}
  cfg, params = hf.load_hf_lm(args.src, args.num_new_tokens, xattn, args.visual_dim)
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
  p.add_argument("--xattn_every", type=int, default=None,
                 help="Add fresh gated xattn blocks every n layers (default: a plain LM).")
  p.add_argument("--xattn_placement", default="paper", choices=("paper", "open_flamingo"))
  p.add_argument("--xattn_num_heads", type=int, default=None)
  p.add_argument("--xattn_head_dim", type=int, default=None)
  p.add_argument("--visual_dim", type=int, default=None,
                 help="Width of the resampler's output tokens (needed with --xattn_every).")
  p.set_defaults(run=_hf)
  args = parser.parse_args(argv)
  args.run(args)


if __name__ == "__main__":
  main()
