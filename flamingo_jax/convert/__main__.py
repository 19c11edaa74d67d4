"""Converts a checkpoint once into ours: orbax params checkpoints plus their config as JSON.

  python -m flamingo_jax.convert hf --src path/to/hf_model --dst path/to/lm [--num_new_tokens N]
      [--dtype bfloat16|float16|float32]
  python -m flamingo_jax.convert openflamingo --checkpoint=checkpoint.pt --lm=HF_DIR \
      --vision=open_clip:ViT-L-14:PATH --out=DIR --resampler_heads=8 --xattn_heads=8
  python -m flamingo_jax.convert vision --src={timm:F0,open_clip:ViT-L-14}:PATH --dst=DIR

hf:
writes dst/params (orbax), dst/lm_config.json (an LMConfig, for configs to reference) and copies the
tokenizer files, so dst is self-contained; `hf.load_converted(dst)` reads it back. The LM is plain,
so one conversion serves every xattn placement: `--config.lm_init=dst` loads it into a Flamingo
whose config.model.lm agrees with lm_config.json (train/kinds/flamingo.py). Tensors are read one at
a time (benchmarks/convert_memory.py measures the peak host memory).

openflamingo: a whole OpenFlamingo release (its checkpoint, the HF LM and OpenCLIP ViT it was
trained with) as a model directory that predict, eval and fine-tuning run from
(convert/model_dir.py, configs/converted.py).

vision: a timm `dm_nfnet_f*` or an OpenCLIP ViT as the params checkpoint {'vision': ...} that
`--config.vision_init=DIR` loads (config.model.vision must name the same architecture).
"""
import argparse
import os
import shutil

from flamingo_jax import paths
from flamingo_jax.convert import hf
from flamingo_jax.convert import open_flamingo
from flamingo_jax.data import tokenizer as tokenizer_lib

_HF_EXAMPLES = """examples:
  # Keep the checkpoint's dtype (a bfloat16 checkpoint gives bfloat16 params):
  python -m flamingo_jax.convert hf --src ~/hf/Llama-2-7b-hf --dst ~/ckpt/llama2_7b
  # Cast to float32 (twice the size of bfloat16 on disk and in host memory):
  python -m flamingo_jax.convert hf --src ~/hf/mpt-1b --dst ~/ckpt/mpt_1b_f32 --dtype float32
  # Then train a Flamingo on it (config.model.lm as dst/lm_config.json says):
  python launch.py --config=flamingo_jax/configs/tiny.py --workdir=runs/llama \\
      --config.lm_init=~/ckpt/llama2_7b

lm_config.json records param_dtype. Loading casts the stored params to the training model's
config.model.param_dtype (bfloat16 -> float32 is exact)."""


def _hf(args):
  cfg, params = hf.load_hf_lm(args.src, args.num_new_tokens, args.dtype)
  hf.save_converted(args.dst, cfg, params, consume=True)  # Frees each array once written.
  for name in tokenizer_lib.HF_FILES:
    if os.path.exists(os.path.join(args.src, name)):
      shutil.copy(os.path.join(args.src, name), os.path.join(args.dst, name))
  print(f"Wrote {cfg.num_layers}-layer LM (vocab {cfg.vocab_size} + {cfg.num_new_tokens} new, "
        f"{cfg.param_dtype}) to {args.dst}.")


_OPENFLAMINGO_EXAMPLES = """examples:
  # OpenFlamingo-9B-vitl-mpt7b (MPT-7B LM, OpenAI's CLIP ViT-L/14, QuickGELU):
  python -m flamingo_jax.convert openflamingo --checkpoint=~/of/checkpoint.pt \\
      --lm=~/hf/mpt-7b --vision=open_clip:ViT-L-14-quickgelu:~/clip/vitl14.pt \\
      --out=~/ckpt/of9b --resampler_heads=8 --xattn_heads=8
  # Ask it about an image, or fine-tune it:
  python launch.py --mode=predict --workdir=~/ckpt/of9b --prompt="<image>Output:" --image=cat.jpg
  python launch.py --config=flamingo_jax/configs/converted.py:dir=$HOME/ckpt/of9b \\
      --workdir=runs/of9b_ft --config.input.datasets.m3w.tfds_name=my_docs ...

--vision: open_clip:MODEL:PATH, MODEL an OpenCLIP name (ViT-B-32, ViT-B-16, ViT-L-14, each also
-quickgelu) or an OpenCLIP model-config .json; PATH its weights (.safetensors, or .pt/.bin read
with torch.load(weights_only=True)). Head counts are not stored in checkpoints: OpenFlamingo's
released code uses 8 in both places."""


def _openflamingo(args):
  model = open_flamingo.write_model_dir(
      args.out, args.checkpoint, args.lm, args.vision, resampler_heads=args.resampler_heads,
      xattn_heads=args.xattn_heads, num_new_tokens=args.num_new_tokens,
      only_attend_immediate=not args.all_previous_media)
  print(f"Wrote an OpenFlamingo model ({model.lm.num_layers}-layer LM, xattn every "
        f"{model.lm.xattn.every}, {model.vision.layers}-layer ViT) to {args.out}.")


_VISION_EXAMPLES = """examples:
  python -m flamingo_jax.convert vision --src=timm:F0:~/timm/dm_nfnet_f0.safetensors --dst=~/ckpt/f0
  python -m flamingo_jax.convert vision --src=open_clip:ViT-L-14:~/clip/vitl14.bin --dst=~/ckpt/l14
  python launch.py --config=flamingo_jax/configs/flamingo_3b.py --workdir=runs/3b \\
      --config.model.vision.variant=F0 --config.vision_init=~/ckpt/f0 ...

timm:VARIANT:PATH: a dm_nfnet_f{0..7} safetensors file (its classifier head is not kept);
open_clip:MODEL:PATH as for openflamingo's --vision."""


def _vision(args):
  from flamingo_jax.convert import open_clip_vit  # pylint: disable=g-import-not-at-top
  from flamingo_jax.convert import timm_nfnet  # pylint: disable=g-import-not-at-top
  from flamingo_jax.models import nfnet  # pylint: disable=g-import-not-at-top
  from flamingo_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  kind, _, rest = args.src.partition(":")
  name, _, path = rest.partition(":")
  if kind == "open_clip":
    _, params = open_clip_vit.load(args.src)
  elif kind == "timm" and name and path:
    params = timm_nfnet.load(paths.resolve(path), nfnet.NFNet(nfnet.nfnet_config(name)),
                             skip=(r"^head\.fc\.",))
  else:
    raise ValueError(f"--src={args.src!r}: expected timm:VARIANT:PATH or open_clip:MODEL:PATH.")
  checkpoint.save_params(args.dst, {"vision": params})
  print(f"Wrote the {kind} {name} vision encoder to {args.dst}.")


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m flamingo_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="source", required=True)
  p = sub.add_parser("hf", help="a Hugging Face causal LM directory (config.json + safetensors)",
                     description="Converts a Hugging Face causal LM (config.json + *.safetensors) "
                     "into an orbax params checkpoint and lm_config.json.",
                     epilog=_HF_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--src", required=True, type=paths.resolve, help="HF model directory.")
  p.add_argument("--dst", required=True, type=paths.resolve, help="Output directory.")
  p.add_argument("--num_new_tokens", type=int, default=None,
                 help="Trainable new token rows (default: as many as the tokenizer adds, else 2).")
  p.add_argument("--dtype", choices=hf.PARAM_DTYPES, default=None,
                 help="dtype of the converted params (default: the checkpoint's).")
  p.set_defaults(run=_hf)
  p = sub.add_parser("openflamingo", help="an OpenFlamingo release (checkpoint, HF LM, ViT)",
                     description="Converts an OpenFlamingo checkpoint with the HF LM and OpenCLIP "
                     "ViT it was trained with into a model directory.",
                     epilog=_OPENFLAMINGO_EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, type=paths.resolve,
                 help="OpenFlamingo checkpoint.pt (or .safetensors).")
  p.add_argument("--lm", required=True, type=paths.resolve,
                 help="The HF LM directory it was trained on (weights and tokenizer.json).")
  p.add_argument("--vision", required=True, help="open_clip:MODEL:PATH (see below).")
  p.add_argument("--out", required=True, type=paths.resolve, help="Output directory (new).")
  for part in ("resampler", "xattn"):
    p.add_argument(f"--{part}_heads", required=True, type=int,
                   help=f"Attention heads of the {part} (8 in OpenFlamingo's releases).")
  p.add_argument("--num_new_tokens", type=int, default=None,
                 help="Rows OpenFlamingo appended to the embedding (default: rows - HF vocab).")
  p.add_argument("--all_previous_media", action="store_true",
                 help="The model was trained with only_attend_immediate_media=False.")
  p.set_defaults(run=_openflamingo)
  p = sub.add_parser("vision", help="a timm NFNet or an OpenCLIP ViT (vision_init)",
                     description="Converts a vision encoder into the params checkpoint "
                     "config.vision_init takes.", epilog=_VISION_EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--src", required=True, help="timm:VARIANT:PATH or open_clip:MODEL:PATH.")
  p.add_argument("--dst", required=True, type=paths.resolve, help="Output directory (new).")
  p.set_defaults(run=_vision)
  args = parser.parse_args(argv)
  args.run(args)


if __name__ == "__main__":
  main()
