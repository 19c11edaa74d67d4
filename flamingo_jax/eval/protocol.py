"""The paper's few-shot evaluation on the published benchmarks (Flamingo §3, App. B.1.5; issue #23).

One eval task type per benchmark of benchmarks.BENCHMARKS (`config.evals.<run>.type`, e.g.
'coco'), run as the paper describes and, where it is silent, as OpenFlamingo's evaluate.py does:

- k-shot prompts for each k of `shots`; zero-shot is two text-only examples, then the query with
  its image (paper §3; OpenFlamingo's compute_effective_num_shots and its removal of the shots'
  <image> tags at 0 shots do the same).
- in-context examples from the support split, chosen per query at random or by RICES (the most
  similar by pooled frozen vision-encoder features, the most similar last), once per seed.
- open-ended tasks (captioning, VQA, video QA) by beam search, post-processed as OpenFlamingo; they
  are not ensembled (one generation per query). HatefulMemes (close-ended) by the log-likelihood of
  the answers "no"/"yes" (mean per token, as OpenFlamingo's rank classification), averaged over
  `ensembles` random orders of the shots (App. B's prompt ensembling).
- results {'<metric>/<k>shot': mean over seeds, '<metric>/<k>shot/std': std over seeds (more than
  one seed)} in the metric functions' units: CIDEr as coco-caption, VQA accuracy, accuracy and
  ROC-AUC in [0, 1] (the papers print 100x). Video QA (one answer per question) reports top-1
  `accuracy` as the paper's tables; the official VQA accuracy needs several human answers.
- predictions, where the context has a `predictions_dir`: per k and seed, each query's id, its
  shots' ids, prompt text, generated and post-processed answer, references (HatefulMemes: the
  answers' scores), as <benchmark>_<k>shot_seed<seed>.json (`save_predictions`).

A run's fields (`config.evals.<run>`), all optional but data_dir:
  data_dir        the benchmark's files as released (benchmarks.py lists the layouts)
  support_split   where the shots come from (default: the benchmark's, the paper's train)
  query_split     what is scored (default: the benchmark's evaluation split)
  num_queries     a fixed random subset (seed 0) of the query split; None or 0: all of it
  shots           (0, 4, 8, 16, 32), the paper's; k that do not fit the LM's context are left out
  seeds           (0,); each draws its own shots (and shot orders for ensembles)
  selection       'random' or 'rices'
  ensembles       1; orders of the shots averaged over for close-ended scoring
  prompts         'paper' or 'openflamingo' (PROMPTS)
  beam_size       3 (paper App. B.1.5)
  length_penalty  0.0 (OpenFlamingo's evaluate.py; beams ranked by their raw log-probability)
  max_new_tokens  captioning 20, VQA 5, TextVQA 10 (OpenFlamingo's evaluate.py)
  batch_size      8 (OpenFlamingo's evaluate.py)
  max_frames      8 frames read per video at 1 FPS (the paper trains on 8; it evaluates on 30)
"""
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
from typing import Callable, Sequence

from etils import epath
import jax
import numpy as np

from flamingo_jax import paths
from flamingo_jax.data import media
from flamingo_jax.eval import benchmarks
from flamingo_jax.eval import fewshot
from flamingo_jax.eval import metrics
from flamingo_jax.eval import tasks
from flamingo_jax.eval.benchmarks import Example

SELECTIONS = ("random", "rices")
HATEFUL = ("no", "yes")  # Answers scored for labels 0 and 1 (OpenFlamingo's HM_CLASSNAMES).
FPS = 1.0  # Video frames per second (paper §3.1).
_GENERIC = ("type", "every_steps")  # Fields every run may have (tasks.py, evaluate.py).


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A task type's prompt: `shot` renders one in-context example with its <image> and
  end-of-chunk tags, `query` the query left open for the answer (fields from `fields`)."""
  shot: str
  query: str


_HATEFUL_MEMES = Prompt(  # OpenFlamingo's get_hateful_memes_prompt, shots joined with nothing.
    "<image>is an image with: '{text}' written on it. Is it hateful? Answer:{label}"
    "<|endofchunk|>",
    "<image>is an image with: '{text}' written on it. Is it hateful? Answer:")
PROMPTS = {
    # Paper §3.3 and App. B. It gives no HatefulMemes prompt: OpenFlamingo's is used.
    "paper": {
        "captioning": Prompt("<image>Output: {caption}<EOC>", "<image>Output:"),
        "vqa": Prompt("<image>Question: {question} Answer: {answer}<EOC>",
                      "<image>Question: {question} Answer:"),
        "classification": _HATEFUL_MEMES,
    },
    # open_flamingo/eval/models/open_flamingo.py's get_*_prompt, character for character (its
    # missing spaces included), each shot followed by "\n" as evaluate.py joins them.
    "openflamingo": {
        "captioning": Prompt("<image>Output:{caption}<|endofchunk|>\n", "<image>Output:"),
        "vqa": Prompt("<image>Question:{question} Short answer:{answer}<|endofchunk|>\n",
                      "<image>Question:{question} Short answer:"),
        "classification": _HATEFUL_MEMES,
    },
}
# OpenFlamingo's evaluate.py: evaluate_captioning's 20, evaluate_vqa's 5, 10 for TextVQA.
MAX_NEW_TOKENS = {"captioning": 20, "vqa": 5, "classification": 0}
MAX_NEW_TOKENS_BY_BENCHMARK = {"textvqa": 10}
DEFAULTS = dict(data_dir=None, support_split=None, query_split=None, num_queries=None,
                shots=fewshot.SHOTS, seeds=(0,), selection="random", ensembles=1,
                prompts="paper", beam_size=3, length_penalty=0.0, max_new_tokens=None,
                batch_size=8, max_frames=8)


@dataclasses.dataclass(frozen=True)
class Settings:
  """A run's fields, checked, with their defaults filled in (see the module docstring)."""
  name: str
  kind: str  # The benchmark's task: 'captioning' | 'vqa' | 'classification'.
  data_dir: str
  support_split: str
  query_split: str
  num_queries: int | None
  shots: tuple[int, ...]
  seeds: tuple[int, ...]
  selection: str
  ensembles: int
  prompts: str
  beam_size: int
  length_penalty: float
  max_new_tokens: int
  batch_size: int
  max_frames: int

  @property
  def prompt(self) -> Prompt:
    return PROMPTS[self.prompts][self.kind]


# Fields.


def _ints(value, where: str, low: int) -> tuple[int, ...]:
  values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
  if not values or not all(isinstance(v, int) and v >= low for v in values):
    raise ValueError(f"{where}={value!r}; expected ints >= {low}.")
  return values


def _int(value, where: str, low: int) -> int:
  if not isinstance(value, int) or isinstance(value, bool) or value < low:
    raise ValueError(f"{where}={value!r}; expected an int >= {low}.")
  return value


def _choice(value, where: str, known) -> str:
  if value not in known:
    raise ValueError(f"{where}={value!r}; expected one of {sorted(known)}.")
  return value


def _data_dir(value, where: str) -> str:
  if not value:
    raise ValueError(f"{where} is missing; expected the directory of the benchmark's files.")
  root = paths.resolve(os.fspath(value))
  if not epath.Path(root).is_dir():
    raise FileNotFoundError(f"{where}={value!r} is not a directory; expected the benchmark's "
                            "files, unpacked as released.")
  return root


def settings(task, where: str) -> Settings:
  """The run's checked fields; errors name `where`.<field> and what was expected."""
  name = task.type
  bench = benchmarks.BENCHMARKS[name]
  unknown = sorted(set(task.keys()) - set(DEFAULTS) - set(_GENERIC))
  if unknown:
    raise ValueError(f"{where}: unknown fields {unknown}; expected some of {sorted(DEFAULTS)}.")
  get = lambda key, default=None: (task.get(key) if task.get(key) is not None else
                                   default if default is not None else DEFAULTS[key])
  at = lambda key: f"{where}.{key}"
  num_queries = task.get("num_queries")
  max_new = MAX_NEW_TOKENS_BY_BENCHMARK.get(name, MAX_NEW_TOKENS[bench.task])
  return Settings(
      name=name, kind=bench.task, data_dir=_data_dir(task.get("data_dir"), at("data_dir")),
      support_split=_choice(get("support_split", bench.support_split), at("support_split"),
                            bench.splits),
      query_split=_choice(get("query_split", bench.query_split), at("query_split"), bench.splits),
      num_queries=_int(num_queries, at("num_queries"), 1) if num_queries else None,
      shots=_ints(get("shots"), at("shots"), 0), seeds=_ints(get("seeds"), at("seeds"), 0),
      selection=_choice(get("selection"), at("selection"), SELECTIONS),
      ensembles=_int(get("ensembles"), at("ensembles"), 1),
      prompts=_choice(get("prompts"), at("prompts"), PROMPTS),
      beam_size=_int(get("beam_size"), at("beam_size"), 1),
      length_penalty=float(get("length_penalty")),
      max_new_tokens=_int(get("max_new_tokens", max_new), at("max_new_tokens"), 0),
      batch_size=_int(get("batch_size"), at("batch_size"), 1),
      max_frames=_int(get("max_frames"), at("max_frames"), 1))


@functools.lru_cache(maxsize=8)
def _read(name: str, root: str, split: str) -> tuple[Example, ...]:
  """A split's examples, read once for the check and the run."""
  return tuple(benchmarks.read(name, root, split))


def data(s: Settings, where: str) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
  """(support, queries) of the run; missing files, too few examples for the shots or queries
  asked for are errors naming the field."""
  try:
    support = _read(s.name, s.data_dir, s.support_split)
    queries = _read(s.name, s.data_dir, s.query_split)
  except (FileNotFoundError, ValueError) as e:
    raise type(e)(f"{where}.data_dir={s.data_dir!r}: {e}") from e
  too_many = [k for k in s.shots if fewshot.shot_count(k) > len(support)]
  if too_many:
    raise ValueError(f"{where}.shots: {too_many} need more in-context examples than the "
                     f"{len(support)} of split {s.support_split!r}; expected at most "
                     f"{len(support)} (0 shots need {fewshot.ZERO_SHOT_TEXTS}).")
  if s.num_queries is not None and s.num_queries > len(queries):
    raise ValueError(f"{where}.num_queries={s.num_queries}; split {s.query_split!r} has only "
                     f"{len(queries)} examples.")
  return support, _subset(queries, s.num_queries)


def _subset(queries: Sequence[Example], num: int | None) -> tuple[Example, ...]:
  """A fixed random subset (seed 0, file order kept): every seed scores the same queries."""
  if num is None:
    return tuple(queries)
  keep = np.sort(np.random.default_rng(0).choice(len(queries), num, replace=False))
  return tuple(queries[i] for i in keep)


def check(task, where: str) -> None:
  """Bad fields, missing files or too small splits, before any model call (tasks.check)."""
  data(settings(task, where), where)


# Prompts.


def fields(ex: Example) -> dict[str, str]:
  """What the prompts fill in: the first caption (stripped, as OpenFlamingo), the question, the
  first human answer (as OpenFlamingo), the meme's text and its label's answer."""
  return {"caption": ex.captions[0].strip() if ex.captions else "", "question": ex.question,
          "answer": ex.answers[0] if ex.answers else "", "text": ex.text,
          "label": "" if ex.label is None else HATEFUL[ex.label]}


def render(prompt: Prompt, shots: Sequence[Example], query: Example, k: int) -> str:
  """The prompt text: the shots, then the query; at k = 0 the shots lose their <image> tags."""
  context = "".join(prompt.shot.format(**fields(ex)) for ex in shots)
  if k == 0:
    context = context.replace("<image>", "")
  return context + prompt.query.format(**fields(query))


def _texts(s: Settings, support, queries, chosen, k: int) -> list[str]:
  return [render(s.prompt, [support[j] for j in row], query, k)
          for row, query in zip(chosen, queries)]


def _prompts(ctx, s: Settings, support, queries, chosen, k: int) -> list[list[int]]:
  return [fewshot.prompt_ids(ctx.tokenizer, t) for t in _texts(s, support, queries, chosen, k)]


# Media.


def loader(ctx, max_frames: int) -> Callable[[Example], np.ndarray]:
  """Example -> its preprocessed frames [T, S, S, 3] (an image: T = 1; a video: at 1 FPS, at
  most max_frames), cached: random shots come back often."""
  @functools.lru_cache(maxsize=256)
  def load(path: str, video: bool) -> np.ndarray:
    frames = (media.read_video(path, FPS, max_frames) if video else
              media.read_image(path)[None])
    return np.asarray(ctx.preprocess(frames), np.float32)
  return lambda ex: load(ex.media[0], ex.video)


def stack(rows: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
  """Each row's media [T_i, H, W, 3] -> [B, N, T, H, W, 3]. Shorter clips repeat their last frame:
  the model has no frame mask (models/flamingo.py), and a repeated frame is a real frame where a
  zero frame would be an input never seen in training."""
  t = max(len(m) for row in rows for m in row)
  pad = lambda m: np.concatenate([m, np.repeat(m[-1:], t - len(m), axis=0)])
  return np.stack([np.stack([pad(m) for m in row]) for row in rows])


def _media(support, queries, chosen, k: int, load) -> Callable[[Sequence[int]], np.ndarray]:
  """rows -> their media [B, k + 1, T, H, W, 3]: the shots' (none at k = 0), then the query's."""
  return lambda rows: stack([[load(support[j]) for j in chosen[i][:k]] + [load(queries[i])]
                             for i in rows])


# RICES features, cached per vision encoder.

_PROBE = np.arange(48 * 64 * 3, dtype=np.uint32).reshape(48, 64, 3).astype(np.uint8)


def vision_fingerprint(ctx) -> str:
  """A hash of the vision encoder (config and parameter bytes) and the image preprocessing (its
  output on a fixed probe image): features cached under another encoder are never reused."""
  h = hashlib.sha256(repr(ctx.model.vision).encode())
  leaves, _ = jax.tree_util.tree_flatten_with_path(ctx.params["vision"])
  for path, leaf in leaves:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.asarray(leaf).tobytes())
  h.update(np.asarray(ctx.preprocess(_PROBE[None]), np.float32).tobytes())
  return h.hexdigest()


def _pooled(ctx, examples: Sequence[Example], load, chunk: int = 64) -> np.ndarray:
  """[E, C] mean-pooled vision features per example (a video: averaged over its frames)."""
  out = []
  for start in range(0, len(examples), chunk):
    clips = [load(ex) for ex in examples[start:start + chunk]]
    feats = fewshot.image_embeddings(ctx.model, ctx.params, np.concatenate(clips))
    ends = np.cumsum([len(c) for c in clips])
    out += [f.mean(0) for f in np.split(feats, ends[:-1])]
  return np.stack(out)


def embeddings(ctx, s: Settings, split: str, examples: Sequence[Example], load,
               vision: str) -> np.ndarray:
  """The split's RICES features [E, C], from ctx.cache_dir when computed before for the same
  vision encoder (`vision`: its fingerprint), preprocessing, benchmark, files and examples."""
  if not ctx.cache_dir:
    return _pooled(ctx, examples, load)
  key = json.dumps([vision, s.name, s.data_dir, split, FPS, s.max_frames,
                    [ex.id for ex in examples]])
  digest = hashlib.sha256(key.encode()).hexdigest()[:24]
  path = epath.Path(ctx.cache_dir) / f"rices_{s.name}_{split}_{digest}.npy"
  if path.exists():
    with path.open("rb") as f:
      return np.load(f)
  feats = _pooled(ctx, examples, load)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f"{path.name}.tmp{os.getpid()}"
  with tmp.open("wb") as f:
    np.save(f, feats)
  tmp.rename(path)  # Whole or absent: a killed run leaves no half file to read.
  return feats


# Scoring.


def _open_ended(ctx, s: Settings, support, queries, chosen, k: int, load, rng):
  """Generation, then CIDEr, VQA accuracy or (video QA) top-1 accuracy; (results, records)."""
  del rng  # Open-ended tasks are not ensembled.
  texts = _texts(s, support, queries, chosen, k)
  generated = fewshot.generate_texts(
      ctx.model, ctx.params, ctx.tokenizer, [fewshot.prompt_ids(ctx.tokenizer, t) for t in texts],
      _media(support, queries, chosen, k, load), batch_size=s.batch_size,
      beam_size=s.beam_size, max_new_tokens=s.max_new_tokens, length_penalty=s.length_penalty)
  if s.kind == "captioning":
    predictions = [metrics.postprocess_caption(t).replace('"', "") for t in generated]
    refs = [list(ex.captions) for ex in queries]
    results = {"cider": metrics.cider_d([metrics.ptb_tokenize(p) for p in predictions],
                                        [[metrics.ptb_tokenize(c) for c in r] for r in refs])[0]}
  else:
    predictions = [metrics.postprocess_vqa(t) for t in generated]
    refs = [list(ex.answers) for ex in queries]
    if queries[0].video:
      norm = metrics.normalize_vqa_answer
      results = {"accuracy": float(np.mean([norm(a) == norm(r[0])
                                            for a, r in zip(predictions, refs)]))}
    else:
      results = {"vqa_accuracy": float(np.mean([metrics.vqa_accuracy(a, r)
                                                for a, r in zip(predictions, refs)]))}
  return results, records(support, queries, chosen, texts, generated=generated,
                          prediction=predictions, references=refs)


def records(support, queries, chosen, texts, **columns) -> list[dict]:
  """Per query: its id, its shots' ids and prompt text as given to the model, and `columns`."""
  return [{"id": q.id, "shots": [support[j].id for j in row], "prompt": text,
           **{name: values[i] for name, values in columns.items()}}
          for i, (q, row, text) in enumerate(zip(queries, chosen, texts))]


def _orders(chosen: np.ndarray, ensembles: int, rng) -> list[np.ndarray]:
  """The shot orders to average over: as chosen, or min(ensembles, n!) random permutations per
  query (OpenFlamingo's cap; it shuffles every one, the first included)."""
  count = min(ensembles, math.factorial(chosen.shape[1]))
  if count == 1:
    return [chosen]
  return [np.stack([rng.permutation(row) for row in chosen]) for _ in range(count)]


def answer_logprobs(ctx, s: Settings, support, queries, chosen, k: int, load) -> np.ndarray:
  """[Q, 2] mean log-prob per token of "no" and "yes" after each query's prompt (no <EOC>, as
  OpenFlamingo's rank classification)."""
  conts = [ctx.tokenizer.encode(a) for a in HATEFUL]
  prompts = _prompts(ctx, s, support, queries, chosen, k)
  media_fn = _media(support, queries, chosen, k, load)
  out = []
  for start in range(0, len(queries), s.batch_size):
    rows = range(start, min(start + s.batch_size, len(queries)))
    out.append(fewshot.score_continuations(ctx.model, ctx.params, ctx.tokenizer,
                                           [prompts[i] for i in rows], media_fn(rows), conts,
                                           normalize=True))
  return np.concatenate(out)


def _close_ended(ctx, s: Settings, support, queries, chosen, k: int, load, rng):
  """HatefulMemes: ROC-AUC of p(yes) (softmax over the two answers, as OpenFlamingo's pred_score)
  and accuracy, log-probs averaged over shot orders; (results, records of the first order)."""
  orders = _orders(chosen, s.ensembles, rng)
  logp = np.mean([answer_logprobs(ctx, s, support, queries, order, k, load) for order in orders],
                 axis=0)
  p_yes = np.exp(logp[:, 1] - np.logaddexp(logp[:, 0], logp[:, 1]))
  labels = np.array([ex.label for ex in queries])
  results = {"roc_auc": metrics.roc_auc(p_yes, labels),
             "accuracy": metrics.accuracy(logp.argmax(1), labels)}
  return results, records(
      support, queries, orders[0], _texts(s, support, queries, orders[0], k),
      scores=[dict(zip(HATEFUL, map(float, row))) for row in logp], p_yes=p_yes.tolist(),
      prediction=[HATEFUL[i] for i in logp.argmax(1)],
      references=[[HATEFUL[ex.label]] for ex in queries])


def save_predictions(ctx, s: Settings, k: int, seed: int, rows: list[dict]) -> None:
  """ctx.predictions_dir/<benchmark>_<k>shot_seed<seed>.json (process 0; nothing without the
  directory): what each query was asked and answered, to inspect or submit to a server."""
  if not ctx.predictions_dir or jax.process_index():
    return
  path = epath.Path(ctx.predictions_dir) / f"{s.name}_{k}shot_seed{seed}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(
      {"benchmark": s.name, "split": s.query_split, "shots": k, "seed": seed,
       "selection": s.selection, "prompts": s.prompts, "predictions": rows}, indent=1))


def _extra_tokens(ctx, s: Settings) -> int:
  """Tokens after the prompt: the generated ones, or the longest scored answer."""
  if s.kind == "classification":
    return max(len(ctx.tokenizer.encode(a)) for a in HATEFUL)
  return s.max_new_tokens


def aggregate(per_seed: Sequence[dict[str, float]], k: int) -> dict[str, float]:
  """{'<metric>/<k>shot': mean, '<metric>/<k>shot/std': std (more than one seed)}."""
  out = {}
  for metric in per_seed[0]:
    values = [r[metric] for r in per_seed]
    out[f"{metric}/{k}shot"] = float(np.mean(values))
    if len(values) > 1:
      out[f"{metric}/{k}shot/std"] = float(np.std(values))
  return out


def _k_shot(ctx, s: Settings, support, queries, k: int, load, feats) -> dict[str, float]:
  """One k over every seed; {} (logged) when a seed's prompts exceed the LM's context."""
  n = fewshot.shot_count(k)
  rngs = {seed: np.random.default_rng(seed) for seed in s.seeds}
  chosen = {seed: fewshot.choose_support(s.selection, rng, len(support), len(queries), n, feats)
            for seed, rng in rngs.items()}
  extra = _extra_tokens(ctx, s)
  if not all(fewshot.fits(ctx.model, _prompts(ctx, s, support, queries, c, k), extra)
             for c in chosen.values()):
    logging.info("%s: %d-shot left out: prompts exceed the LM's max_len=%d.", s.name, k,
                 ctx.model.lm.max_len)
    return {}
  score = _close_ended if s.kind == "classification" else _open_ended
  per_seed = []
  for seed in s.seeds:
    results, rows = score(ctx, s, support, queries, chosen[seed], k, load, rngs[seed])
    save_predictions(ctx, s, k, seed, rows)
    per_seed.append(results)
  return aggregate(per_seed, k)


def run(task, ctx: tasks.Context) -> dict[str, float]:
  """The run's results for every k of its shots that fits the LM's context."""
  where = f"config.evals[type={task.type!r}]"  # Its name is not passed; check (first) names it.
  s = settings(task, where)
  support, queries = data(s, where)
  load = loader(ctx, s.max_frames)
  feats = None
  if s.selection == "rices":
    vision = vision_fingerprint(ctx)
    feats = (embeddings(ctx, s, s.support_split, support, load, vision),
             embeddings(ctx, s, s.query_split, queries, load, vision))
  results = {}
  for k in s.shots:
    results.update(_k_shot(ctx, s, support, queries, k, load, feats))
  return results


for _name in benchmarks.BENCHMARKS:
  tasks.register(_name, check)(run)
