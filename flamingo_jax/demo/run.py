"""The demo's stages, run by `python -m flamingo_jax.demo --workdir=workdir [--short]`.

tokenizer (SentencePiece on datasets.text_corpus() and the few-shot prompts' own words) →
stage 1: contrastive NFNet + text tower (configs/nfnet_contrastive.py), zero-shot retrieval,
`{'vision': ...}` → stage 2: LM pretraining (configs/lm_pretrain.py), its in-context copying
(eval/copying.py), `{'lm': ...}` (the plain LM, which serves every xattn placement) → stage 3:
Flamingo with both frozen (configs/demo.py) → few-shot evaluation → workdir/report.md. All stages
use the same trainer; each stage's workdir holds its checkpoints, metrics and eval.json, so a
re-run resumes training and evaluates only what trained anew. `--short` is the end-to-end test's run
(`:short` configs).
"""
import json
import os
import sys
import time

from absl import logging
from etils import epath

from flamingo_jax import paths
from flamingo_jax.configs import demo as demo_config
from flamingo_jax.configs import lm_pretrain
from flamingo_jax.configs import nfnet_contrastive
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.demo import datasets
from flamingo_jax.demo import features
from flamingo_jax.demo import report
from flamingo_jax.eval import evaluate
from flamingo_jax.eval import fewshot as fewshot_lib
from flamingo_jax.train import checkpoint as ckpt_lib
from flamingo_jax.train import trainer

def backbone_paths(workdir: str) -> tuple[str, str, str]:
  """(tokenizer, stage-1 `{'vision': ...}`, stage-2 `{'lm': ...}`) of a demo workdir."""
  return (os.path.join(workdir, "tokenizer.model"), os.path.join(workdir, "stage1", "vision"),
          os.path.join(workdir, "stage2", "lm"))


def stage3(config, workdir: str, stage_dir: str, seconds: dict) -> dict:
  """Trains `config` (configs/demo.py) in `stage_dir` on `workdir`'s tokenizer and frozen stage-1/2
  checkpoints (a config.vision_init or config.lm_init already set is kept), then returns its
  few-shot results.
  """
  config.input.tokenizer, vision_init, lm_init = backbone_paths(workdir)
  config.vision_init = config.vision_init or vision_init
  config.lm_init = config.lm_init or lm_init
  cache = None
  if config.get("cache_features"):  # The frozen NFNet's features, once per image (features.py).
    cache = features.get(*features.load_vision(config), os.path.join(workdir, "features"))
    features.with_features(config, cache.key)
  _, trained = _stage("stage 3: Flamingo", config, stage_dir, seconds)
  start = time.perf_counter()
  fewshot = _evaluate(config, stage_dir, trained)
  if trained or "few-shot evaluation" not in seconds:  # Else: read back, the earlier run's time.
    seconds["few-shot evaluation"] = time.perf_counter() - start
  if cache is not None:
    logging.info("Feature cache %s: %d images encoded, %d reused.", cache.key, cache.misses,
                  cache.hits)
    cache.save()
  return fewshot


def _stage(title: str, config, workdir: str, seconds: dict,
           handed_on: tuple[str, ...] = ()) -> tuple[dict | None, bool]:
  """Trains `config` in `workdir` (resuming): (its trainable parameters, whether a step ran).

  A finished stage (its last step's checkpoint, its eval.json and the files it hands on, e.g.
  stage 1's NFNet, all there) gives (None, False) without the trainer, whose setup (input, model,
  restore) only to train nothing took 12 s of stage 1 and 22 s of stage 3 on a re-run; its entry
  in `seconds` stays the earlier run's.
  """
  logging.info("===== %s: %d steps in %s =====", title, config.total_steps, workdir)
  start = time.perf_counter()
  done = [os.path.join(workdir, "eval.json"), *handed_on]
  if (config.total_steps in ckpt_lib.saved_steps(workdir)
      and all(epath.Path(p).exists() for p in done)):
    logging.info("%s finished in an earlier run: nothing to train.", title)
    return None, False
  state, _, last = trainer.train(config, workdir)
  seconds[title] = time.perf_counter() - start
  step = int(state["step"])
  if step < config.total_steps:  # Stopped by SIGTERM: nothing half-trained may become a backbone.
    logging.warning("%s stopped at step %d of %d (checkpoint saved); re-run to resume.", title,
                    step, config.total_steps)
    sys.exit(0)
  return state["params"], bool(last)


def _evaluate(config, stage_dir: str, trained: bool) -> dict:
  """evaluate.evaluate's results, read back from stage_dir/eval.json when this run trained nothing
  (the file was written for the same final checkpoint)."""
  path = os.path.join(stage_dir, "eval.json")
  if not trained and os.path.exists(path):
    logging.info("Nothing trained in %s: its results are in %s.", stage_dir, path)
    with open(path) as f:
      return json.load(f)
  return evaluate.evaluate(config, stage_dir)


def train_tokenizer(path: str) -> tokenizer_lib.Tokenizer:
  """SentencePiece on every sentence the data makes and on the few-shot prompts' own words, so
  that a prompt never holds <unk>."""
  tokenizer = tokenizer_lib.train_sentencepiece(
      datasets.text_corpus() + fewshot_lib.template_corpus(), demo_config.VOCAB_SIZE, path)
  if tokenizer.vocab_size != demo_config.VOCAB_SIZE:
    raise ValueError(f"The tokenizer has {tokenizer.vocab_size} pieces; configs/demo.py expects "
                     f"VOCAB_SIZE={demo_config.VOCAB_SIZE}.")
  return tokenizer


def _stage1(config, stage_dir: str, vision_path: str, seconds: dict) -> dict:
  """Trains stage 1 in `stage_dir`, keeps its NFNet at `vision_path`; its zero-shot retrieval."""
  params, trained = _stage("stage 1: contrastive", config, stage_dir, seconds, (vision_path,))
  if not epath.Path(vision_path).exists():
    ckpt_lib.save_params(vision_path, {"vision": params["vision"]})
  return _evaluate(config, stage_dir, trained)["retrieval"]


def run(workdir: str, short: bool = False, mlp: bool = False, seeds: int = 1) -> str:
  """Runs every step of the demo into `workdir` (relative: to the current directory); returns the
  report's path. `mlp`: stage 3 as configs/demo.py:mlp (the ablation). `seeds` > 1: also stage 1
  with seeds 1..seeds-1 and stage 3 with seeds 0..seeds-1 on each stage-1 encoder (workdir/seeds/),
  and the report shows the spread over all seeds x seeds runs (stage 2 and the tokenizer are
  shared).
  """
  if seeds < 1:
    raise ValueError(f"seeds must be >= 1, got {seeds}.")
  workdir = paths.resolve(workdir)
  arg = "short" if short else None
  os.makedirs(workdir, exist_ok=True)
  # Each part's wall time in the run that last did it, so a re-run's report keeps the stages' times.
  seconds_path = epath.Path(workdir) / "wall_seconds.json"
  seconds = json.loads(seconds_path.read_text()) if seconds_path.exists() else {}
  start = time.perf_counter()
  tokenizer_path, vision_init, lm_init = backbone_paths(workdir)
  train_tokenizer(tokenizer_path)
  seconds["tokenizer"] = time.perf_counter() - start
  stage3_dir = "stage3_mlp" if mlp else "stage3"
  dirs = {t: os.path.join(workdir, d) for t, d in (("stage 1: contrastive", "stage1"),
                                                    ("stage 2: LM", "stage2"),
                                                    ("stage 3: Flamingo", stage3_dir))}

  def stage1_config(seed: int):
    config = nfnet_contrastive.get_config(arg)
    config.input.tokenizer, config.seed = tokenizer_path, seed
    return config

  retrieval = _stage1(stage1_config(0), dirs["stage 1: contrastive"], vision_init, seconds)
  logging.info("Stage 1 zero-shot retrieval: %s", retrieval)

  c2 = lm_pretrain.get_config(arg)
  c2.input.tokenizer = tokenizer_path
  params, trained = _stage("stage 2: LM", c2, dirs["stage 2: LM"], seconds, (lm_init,))
  if not epath.Path(lm_init).exists():
    ckpt_lib.save_params(lm_init, {"lm": params})  # Plain: it serves every placement.
  copying = _evaluate(c2, dirs["stage 2: LM"], trained)["copying"]
  logging.info("Stage 2 in-context copying: %s", copying)

  stage3_arg = ",".join(filter(None, (arg, "mlp" if mlp else "")))
  fewshot = stage3(demo_config.get_config(stage3_arg), workdir, dirs["stage 3: Flamingo"], seconds)
  logging.info("Few-shot results: %s", json.dumps(fewshot))

  # (stage-1 seed, stage-3 seed) -> (stage-1 retrieval, few-shot results); (0, 0) is the run above.
  runs = {(0, 0): (retrieval, fewshot)} if seeds > 1 else {}
  for seed1 in range(seeds):
    vision, retrieval1 = vision_init, retrieval
    if seed1:
      seed_dir = os.path.join(workdir, "seeds", f"stage1_seed{seed1}")
      vision = os.path.join(seed_dir, "vision")
      retrieval1 = _stage1(stage1_config(seed1), seed_dir, vision, {})
    for seed3 in range(1 if seed1 == 0 else 0, seeds):
      config = demo_config.get_config(stage3_arg)
      config.seed, config.vision_init = seed3, vision
      stage_dir = os.path.join(workdir, "seeds", f"{stage3_dir}_{seed1}_{seed3}")
      logging.info("Seeds: stage 1 %d, stage 3 %d.", seed1, seed3)
      runs[seed1, seed3] = retrieval1, stage3(config, workdir, stage_dir, {})
  seconds_path.write_text(json.dumps(seconds, indent=2))
  path = report.write(workdir, dirs, retrieval, copying, fewshot, seconds, runs)
  logging.info("Wrote %s (%.0f s in all).", path, sum(seconds.values()))
  return path
