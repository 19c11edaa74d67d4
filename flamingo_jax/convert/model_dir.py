"""A converted Flamingo as a directory that runs with no code: `configs/converted.py:dir=DIR`
makes it a run's config, so `launch.py --mode=predict|eval|train` and `flamingo_jax.load(DIR)`
read it like a training workdir.

  DIR/model.json  {"model": config.model, "image_size": S, "image_pp": the vision backbone's
                  pixel preprocessing (pp ops), "source": what it was converted from}
  DIR/vision      params checkpoint {'vision': ...}                      (config.vision_init)
  DIR/lm          the frozen LM as `convert hf` writes it (params, lm_config.json), with its
                  new-token rows and its tokenizer     (config.lm_init, config.input.tokenizer)
  DIR/init        params checkpoint of the parameters Flamingo trains: the resampler, the xattn
                  blocks and the new-token rows (configs/common.py's schedule)  (config.init_from)
"""
import dataclasses
import json
import os
import shutil
from typing import Any, Mapping

from flax import traverse_util
import numpy as np

from flamingo_jax import paths
from flamingo_jax.convert import hf
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.models import flamingo
from flamingo_jax.models import lm as lm_lib
from flamingo_jax.models import vit
from flamingo_jax.train import checkpoint as checkpoint_lib

MODEL_JSON = "model.json"
VISION, LM, INIT = "vision", "lm", "init"


def image_pp(vision: vit.ViTConfig) -> str:
  """The pixel preprocessing the ViT's weights expect, as pp ops after `decode`."""
  return (f"resize_crop({vision.image_size})|"
          f"normalize({tuple(vision.mean)}, {tuple(vision.std)})")


def _trainable(path: str) -> bool:
  """Whether an `lm/` parameter trains: the xattn blocks and the new-token rows."""
  return lm_lib.plain_path(path)[0] is None or path.startswith(("new_token_embed", "new_lm_head"))


def write(directory: str, model: flamingo.Flamingo, params: Mapping[str, Any], *,
          tokenizer_dir: str, new_tokens: Mapping[str, Any] | None,
          source: Mapping[str, str]) -> None:
  """Writes `model` and its full `params` ({'vision', 'resampler', 'lm'}) as described above, to
`directory` (new or empty) at once: it is written beside it and renamed when complete.

  tokenizer_dir: where the LM's tokenizer.json (and config files) are; new_tokens: the content of
  tokenizer.NEW_TOKENS_FILE when the model fixes its own new tokens (OpenFlamingo's).
  """
  directory = paths.resolve(directory)
  if not isinstance(model.vision, vit.ViTConfig):
    raise ValueError(f"A model directory with a {type(model.vision).__name__} vision encoder is "
                     "not supported; only the OpenCLIP ViT of converted OpenFlamingo models.")
  missing = sorted({"vision", "resampler", "lm"} - set(params))
  if missing:
    raise ValueError(f"params lacks {missing}: a model directory needs the whole model.")
  if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
    raise FileNotFoundError(f"{tokenizer_dir} has no tokenizer.json: the model directory needs "
                            "the LM's tokenizer (a Hugging Face LM directory has one).")
  if os.path.exists(directory) and os.listdir(directory):
    raise FileExistsError(f"{directory} is not empty; choose another --out or remove it.")
  partial = directory.rstrip("/") + ".partial"  # Renamed when complete: no half-written model.
  shutil.rmtree(partial, ignore_errors=True)
  _write(partial, model, params, tokenizer_dir, new_tokens, source)
  if os.path.exists(directory):
    os.rmdir(directory)
  os.rename(partial, directory)


def _write(directory, model, params, tokenizer_dir, new_tokens, source):
  lm_tree = traverse_util.flatten_dict(dict(params["lm"]), sep="/")
  trained = {p: np.asarray(x) for p, x in lm_tree.items() if _trainable(p)}
  lm_cfg = dataclasses.replace(model.lm, xattn=None)
  hf.save_converted(os.path.join(directory, LM), lm_cfg, lm_lib.to_plain(params["lm"]))
  for name in tokenizer_lib.HF_FILES:
    if os.path.exists(os.path.join(tokenizer_dir, name)):
      shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(directory, LM, name))
  if new_tokens is not None:
    with open(os.path.join(directory, LM, tokenizer_lib.NEW_TOKENS_FILE), "w") as f:
      json.dump(dict(new_tokens), f, indent=2)
  tokenizer = tokenizer_lib.load_tokenizer(os.path.join(directory, LM))
  if tokenizer.total_vocab_size != model.lm.vocab_size + model.lm.num_new_tokens:
    raise ValueError(f"The tokenizer in {tokenizer_dir} gives {tokenizer.total_vocab_size} ids "
                     f"(new tokens {tokenizer.new_tokens}); the model has "
                     f"{model.lm.vocab_size} + {model.lm.num_new_tokens} rows.")
  checkpoint_lib.save_params(os.path.join(directory, VISION), {"vision": params["vision"]})
  checkpoint_lib.save_params(os.path.join(directory, INIT), {
      "resampler": params["resampler"], "lm": traverse_util.unflatten_dict(trained, sep="/")})
  spec = {"model": {"vision": {"kind": "open_clip_vit", **dataclasses.asdict(model.vision)},
                    "resampler": dataclasses.asdict(model.connector),
                    "lm": dataclasses.asdict(model.lm), "dtype": model.dtype,
                    "param_dtype": model.param_dtype},
          "image_size": model.vision.image_size,
          "image_pp": image_pp(model.vision),
          "source": dict(source)}
  with open(os.path.join(directory, MODEL_JSON), "w") as f:
    json.dump(spec, f, indent=2)


def read(directory: str) -> dict[str, Any]:
  """model.json of a model directory, with its parts' absolute paths under 'paths'."""
  directory = paths.resolve(directory)
  path = os.path.join(directory, MODEL_JSON)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing: expected a directory written by "
                            "`python -m flamingo_jax.convert openflamingo`.")
  with open(path) as f:
    spec = json.load(f)
  spec["paths"] = {part: os.path.join(directory, part) for part in (VISION, LM, INIT)}
  return spec
