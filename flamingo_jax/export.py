"""Trained weights back out to the peers' formats: the inverse of `python -m flamingo_jax.convert`.

  python -m flamingo_jax.export openflamingo --workdir=W --lm_type=mpt --out=checkpoint.pt
  python -m flamingo_jax.export hf --workdir=W --lm_type=llama --out=HF_DIR
  python -m flamingo_jax.export timm --workdir=W --out=nfnet.safetensors

--workdir is what predict loads: a training workdir (its newest checkpoint) or a converted model
directory. openflamingo writes the whole model as OpenFlamingo's `Flamingo.state_dict()` (its
`load_state_dict(strict=True)` takes it; the vision encoder must be an OpenCLIP ViT); hf the
language model, new-token rows appended, as a Hugging Face `model_type` directory
(transformers' `from_pretrained` reads it); timm the NFNet as timm's `dm_nfnet_*` state dict.
"""
import argparse
import os

from flamingo_jax import paths
from flamingo_jax import predict


def _openflamingo(args):
  from flamingo_jax.convert import hf_export  # pylint: disable=g-import-not-at-top
  from flamingo_jax.convert import open_clip_vit  # pylint: disable=g-import-not-at-top
  from flamingo_jax.convert import open_flamingo  # pylint: disable=g-import-not-at-top
  from flamingo_jax.models import vit  # pylint: disable=g-import-not-at-top
  model = predict.load(args.workdir)
  module, params = model.module, model.params
  if not isinstance(module.vision, vit.ViTConfig):
    raise ValueError(f"{args.workdir}: config.model.vision is {type(module.vision).__name__}; "
                     "OpenFlamingo's vision encoder is an OpenCLIP ViT (kind='open_clip_vit').")
  lm_state = hf_export.hf_state_dict(module.lm, params["lm"], args.lm_type)
  vision_state = open_clip_vit.export(module.vision, params["vision"])
  rest = {k: v for k, v in params.items() if k != "vision"}  # The ViT goes as vision_state.
  state = open_flamingo.export(module, rest, vision_state, lm_state=lm_state)
  open_flamingo.save_checkpoint(state, args.out)
  print(f"Wrote OpenFlamingo's state dict ({len(state)} tensors) to {args.out}.")


def _hf(args):
  from flamingo_jax.convert import hf_export  # pylint: disable=g-import-not-at-top
  model = predict.load(args.workdir)
  hf_export.export(model.module.lm, model.params["lm"], args.out, args.lm_type)
  print(f"Wrote the {args.lm_type} LM to {args.out}.")


def _timm(args):
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from flamingo_jax.convert import timm_nfnet  # pylint: disable=g-import-not-at-top
  from flamingo_jax.models import nfnet  # pylint: disable=g-import-not-at-top
  model = predict.load(args.workdir)
  if not isinstance(model.module.vision, nfnet.NFNetConfig):
    raise ValueError(f"{args.workdir}: config.model.vision is not an NFNet; timm export is for "
                     "the paper's NFNet encoder.")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  safetensors.numpy.save_file(timm_nfnet.export(model.module.vision, model.params["vision"]),
                              args.out)
  print(f"Wrote timm's dm_nfnet state dict to {args.out}.")


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m flamingo_jax.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="target", required=True)
  for name, run, out_help in (("openflamingo", _openflamingo, "checkpoint.pt to write"),
                              ("hf", _hf, "Hugging Face directory to write"),
                              ("timm", _timm, ".safetensors file to write")):
    p = sub.add_parser(name, help=out_help)
    p.add_argument("--workdir", required=True, type=paths.resolve,
                   help="A training workdir or a converted model directory.")
    p.add_argument("--out", required=True, type=paths.resolve, help=out_help)
    if name != "timm":
      p.add_argument("--lm_type", required=True,
                     help="The LM's Hugging Face model_type (llama, mistral, qwen2, gemma, gpt2, "
                     "gpt_neox, mpt): which names its weights take.")
    p.set_defaults(run=run)
  args = parser.parse_args(argv)
  args.run(args)


if __name__ == "__main__":
  main()
