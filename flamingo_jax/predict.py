"""Ask a trained Flamingo about your images (issue #23).

    model = flamingo_jax.load("runs/demo")  # A training workdir or a converted model directory.
    model.generate(["cat.png"], "<image>Output:")  # -> 'a cat on a mat'
    model.score(["cat.png"], "<image>Output:", ["a cat", "a dog"])  # -> [log p(a cat), ...]

    python -m flamingo_jax.predict --workdir=W --prompt="<image>Output:" --image=cat.png [--json]
    python launch.py --mode=predict --workdir=W --prompt=... --image=...   (the same)

A prompt is text with `<image>` tags (one per image, in order) and optionally `<EOC>` closing
few-shot examples; the model continues it until <EOC> or <EOS>. Images are preprocessed as the
model's input pipeline does (its config's resize and value ops). Every input is checked
before anything is computed. The JAX side is imported where it is used: launch.py imports this
module for its flags alone.
"""
import json
import os
from typing import Sequence

from absl import app
from absl import flags
import ml_collections
import numpy as np
from PIL import Image

from flamingo_jax import paths

METHODS = ("greedy", "beam", "sample")

_PROMPT = flags.DEFINE_string("prompt", None, "predict: text with one <image> tag per --image.")
_IMAGES = flags.DEFINE_multi_string("image", [], "predict: image files, in the prompt's order.")
_EXAMPLES = flags.DEFINE_string("examples", None, "predict: few-shot examples, a JSONL file of "
                                '{"image": path (relative to the file), "text": ...}, each put '
                                "before the prompt as <image>text<EOC>.")
_CANDIDATES = flags.DEFINE_multi_string("candidate", [], "predict: score these continuations "
                                        "(log-likelihoods) instead of generating.")
_METHOD = flags.DEFINE_enum("method", "greedy", METHODS, "predict: decoding method.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 20, "predict: most tokens generated.")
_BEAM_SIZE = flags.DEFINE_integer("beam_size", 3, "predict: beams of --method=beam.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "predict: sampling temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "predict: sample from the k likeliest tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "predict: nucleus sampling mass (1: all).")
_REPETITION_PENALTY = flags.DEFINE_float("repetition_penalty", 1.0,
                                         "predict: > 1 discourages tokens already present.")
_NO_REPEAT_NGRAM_SIZE = flags.DEFINE_integer("no_repeat_ngram_size", 0,
                                             "predict: never repeat an n-gram of this size.")
_SEED = flags.DEFINE_integer("seed", 0, "predict: the seed of --method=sample.")
_JSON = flags.DEFINE_bool("json", False, "predict: print a JSON object instead of the text.")


def _tuples(value):
  """JSON lists as the tuples the config files use (flax fields and jit's static args hash)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (workdir/config.json, the trainer writes it), or that
  configs/converted.py makes of a converted model directory (its model.json)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from flamingo_jax.configs import converted  # pylint: disable=g-import-not-at-top
  from flamingo_jax.convert import model_dir  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir) / "config.json"
  if not path.exists() and (epath.Path(workdir) / model_dir.MODEL_JSON).exists():
    return converted.get_config(f"dir={workdir}")
  if not path.exists():
    raise FileNotFoundError(
        f"{path} is missing: --workdir must be a training workdir (config.json) or a converted "
        f"model directory ({model_dir.MODEL_JSON}).")
  try:
    return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))
  except ValueError as e:
    raise ValueError(f"{path} is not a readable config: {e}") from e


def _pixels(image, where: str):
  """A path, PIL image or array as pp's decode op takes it: a path or an array."""
  if isinstance(image, Image.Image):
    return np.asarray(image.convert("RGB"))
  if isinstance(image, (str, os.PathLike, np.ndarray)):
    return image
  raise TypeError(f"{where}: an image must be a file path, a PIL image or a uint8 [H, W, 3] "
                  f"array; got {type(image).__name__}.")


class Model:
  """A Flamingo with its parameters, tokenizer and image preprocessing (what `load` returns)."""

  def __init__(self, config, module, params, tokenizer):
    from flamingo_jax.data import pp  # pylint: disable=g-import-not-at-top
    self.config, self.module, self.params, self.tokenizer = config, module, params, tokenizer
    self._pp = pp.build(pp.image_spec(config))

  def prompt_ids(self, prompt: str, where: str = "prompt") -> list[int]:
    """<BOS> then the prompt's text pieces and tags as ids (fewshot.prompt_ids). A model's own
    end-of-chunk string (OpenFlamingo's <|endofchunk|>) works as <EOC> does."""
    from flamingo_jax.eval import fewshot  # pylint: disable=g-import-not-at-top
    if not isinstance(prompt, str) or not prompt:
      raise ValueError(f"{where}: expected a non-empty string, got {prompt!r}.")
    return fewshot.prompt_ids(self.tokenizer, prompt)

  def _images(self, images, prompt: str, where: str) -> np.ndarray:
    """One prompt's images, checked against its <image> tags -> [N, H, W, 3] model inputs."""
    if isinstance(images, (str, os.PathLike, np.ndarray, Image.Image)):
      raise TypeError(f"{where}: expected a list of images (one per <image> tag), got one "
                      f"{type(images).__name__}; wrap it in a list.")
    images = list(images)
    tags = prompt.count("<image>")
    if tags != len(images):
      raise ValueError(f"{where}: the prompt has {tags} <image> tags but {len(images)} images "
                       f"were given; give one image per tag, in order. Prompt: {prompt!r}")
    out = []
    for i, image in enumerate(images):
      try:
        out.append(self._pp({"image": _pixels(image, f"{where}[{i}]")})["image"])
      except (OSError, ValueError) as e:
        name = image if isinstance(image, (str, os.PathLike)) else type(image).__name__
        raise type(e)(f"{where}[{i}] ({name}): {e}") from e
    size = self.config.image_size
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.float32)

  def _batch(self, images, prompts, where: str):
    """(prompt ids, images [B, N, 1, H, W, 3]) of prompts with their image lists; rows with fewer
    images are padded with blank ones that no token attends to."""
    if len(images) != len(prompts):
      raise ValueError(f"{where}: {len(prompts)} prompts but {len(images)} image lists; give one "
                       "list per prompt.")
    ids = [self.prompt_ids(p, f"{where} prompt[{i}]") for i, p in enumerate(prompts)]
    media = [self._images(x, p, f"{where} images[{i}]")
             for i, (x, p) in enumerate(zip(images, prompts))]
    n = max(1, max(len(m) for m in media))
    padded = [np.concatenate([m, np.zeros((n - len(m), *m.shape[1:]), m.dtype)]) for m in media]
    return ids, np.stack(padded)[:, :, None].astype(np.float32)

  def generate(self, images, prompt: str | list[str], *, max_new_tokens: int = 20,
               method: str = "greedy", beam_size: int = 3, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
               no_repeat_ngram_size: int = 0, seed: int = 0) -> str | list[str]:
    """The model's continuation of `prompt` (a str: images is its list of images) or of each of
    a list of prompts (images: one list per prompt), batched, up to <EOC> or <EOS>.

    method: 'greedy', 'beam' (beam_size beams, the paper's evaluation) or 'sample' (temperature,
    top_k, top_p, from `seed`); repetition_penalty and no_repeat_ngram_size act on greedy and
    sample, as Hugging Face defines them.
    """
    from flamingo_jax.eval import decode  # pylint: disable=g-import-not-at-top
    if method not in METHODS:
      raise ValueError(f"generate: method={method!r}; expected one of {METHODS}.")
    if max_new_tokens < 1:
      raise ValueError(f"generate: max_new_tokens={max_new_tokens}; expected >= 1.")
    controls = decode.Controls(temperature, top_k, top_p, repetition_penalty,
                               no_repeat_ngram_size)  # decode.generate checks them per method.
    single = isinstance(prompt, str)
    ids, media = self._batch([images] if single else images, [prompt] if single else prompt,
                             "generate")
    out = decode.generate(
        self.module, self.params, self.tokenizer, media, ids, max_new_tokens=max_new_tokens,
        beam_size=beam_size if method == "beam" else 1, controls=controls,
        sample_seed=seed if method == "sample" else None)
    texts = [self.tokenizer.decode(x, skip_special=True).strip() for x in out]
    return texts[0] if single else texts

  def score(self, images, prompt: str, candidates: Sequence[str]) -> list[float]:
    """Log-likelihood of each candidate continuation of `prompt`, closed by <EOC>: the paper's
    ranking of close-ended answers (as fewshot.score_choices)."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from flamingo_jax.eval import decode  # pylint: disable=g-import-not-at-top
    from flamingo_jax.eval import fewshot  # pylint: disable=g-import-not-at-top
    from flamingo_jax.models import lm as lm_lib  # pylint: disable=g-import-not-at-top
    if isinstance(candidates, str) or not candidates or not all(
        isinstance(c, str) and c for c in candidates):
      raise ValueError(f"score: candidates must be a non-empty list of non-empty strings; got "
                       f"{candidates!r}.")
    (ids,), media = self._batch([images], [prompt], "score")
    conts = [self.tokenizer.encode(c) + [self.tokenizer.eoc_id] for c in candidates]
    longest = len(ids) + max(map(len, conts))
    if longest > self.module.lm.max_len:
      raise ValueError(f"score: prompt and candidate take {longest} tokens, over the LM's "
                       f"max_len={self.module.lm.max_len}.")
    tokens, media_idx, target = fewshot.continuations(self.tokenizer, ids, conts)
    visual = jnp.repeat(decode.visual_tokens(self.module, self.params, media), len(conts), 0)
    scores = fewshot.sequence_logprob(lm_lib.LM(self.module.lm), self.params["lm"], visual,
                                      tokens, media_idx, target)
    return [float(s) for s in np.asarray(scores)]


def load(workdir: str, config=None) -> Model:
  """The model of a training workdir (its newest checkpoint) or of a converted model directory
  (config.json with init_from, lm_init and vision_init), with its tokenizer.

  config: the training config; default workdir/config.json.
  """
  from flamingo_jax import modules  # pylint: disable=g-import-not-at-top
  from flamingo_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from flamingo_jax.eval import evaluate  # pylint: disable=g-import-not-at-top
  workdir = paths.resolve(workdir)
  source = "config" if config is not None else f"{workdir}/config.json"
  config = paths.resolve_config(read_config(workdir) if config is None else config)
  if config.get("model_name") != "flamingo":
    raise ValueError(f"{source}: model_name={config.get('model_name')!r}; predict needs a "
                     "Flamingo ('flamingo').")
  if not config.get("input", {}).get("tokenizer"):
    raise ValueError(f"{source} names no tokenizer (input.tokenizer): predict needs the one the "
                     "model was trained with (--config.input.tokenizer=...).")
  modules.import_modules(config)
  tokenizer = tokenizer_lib.load_tokenizer(config.input.tokenizer)
  lm = config.model.lm
  if tokenizer.total_vocab_size != lm.vocab_size + lm.num_new_tokens:
    raise ValueError(
        f"{source}: tokenizer {config.input.tokenizer} gives {tokenizer.total_vocab_size} ids "
        f"but model.lm has {lm.vocab_size} + {lm.num_new_tokens} new: not the model's tokenizer.")
  module, params = evaluate.load(config, workdir)
  return Model(config, module, params, tokenizer)


def _examples(path: str) -> tuple[list[str], str]:
  """(images, prompt prefix) of a few-shot JSONL file of {"image": path, "text": ...} lines."""
  images, prefix = [], ""
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        example = json.loads(line)
        image, text = example["image"], example["text"]
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--examples={path} line {number}: expected a JSON object with 'image' "
                         f"and 'text'; {type(e).__name__}: {e}") from e
      images.append(os.path.join(os.path.dirname(os.path.abspath(path)), image))
      prefix += f"<image>{text}<EOC>"
  return images, prefix


def predict(workdir: str, config=None) -> None:
  """The CLI (this module's flags): prints the continuation, or the candidates' scores."""
  if not workdir or not _PROMPT.value:
    raise app.UsageError("predict needs --workdir and --prompt.")
  images, prompt = list(_IMAGES.value), _PROMPT.value
  if _EXAMPLES.value:
    if not os.path.isfile(_EXAMPLES.value):
      raise FileNotFoundError(f"--examples={_EXAMPLES.value}: no such file.")
    shots, prefix = _examples(_EXAMPLES.value)
    images, prompt = shots + images, prefix + prompt
  model = load(workdir, config)
  result = {"prompt": prompt, "images": images}
  if _CANDIDATES.value:
    result["scores"] = dict(zip(_CANDIDATES.value,
                                model.score(images, prompt, _CANDIDATES.value)))
    text = "\n".join(f"{s:.4f}\t{c}" for c, s in result["scores"].items())
  else:
    result["text"] = text = model.generate(
        images, prompt, max_new_tokens=_MAX_NEW_TOKENS.value, method=_METHOD.value,
        beam_size=_BEAM_SIZE.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
        top_p=_TOP_P.value, repetition_penalty=_REPETITION_PENALTY.value,
        no_repeat_ngram_size=_NO_REPEAT_NGRAM_SIZE.value, seed=_SEED.value)
  print(json.dumps(result) if _JSON.value else text)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
  from flamingo_jax import console  # pylint: disable=g-import-not-at-top  (imports jax)
  console.setup()
  predict(flags.FLAGS.workdir)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A training workdir or a converted model directory.")
  app.run(main)
