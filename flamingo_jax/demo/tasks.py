"""The demo's few-shot tasks on shapes_fewshot TEST splits, registered in eval/tasks.py by name.

- `shapes_names` (close-ended): made-up names given to shapes within an episode; accuracy per k by
  log-likelihood ranking over the episode's choices, with the chance level.
- `shapes_vqa` (VQA accuracy) and `shapes_captioning` (CIDEr-D): open-ended, by generation,
  supports from the TRAIN split (eval/fewshot.py:evaluate_open_ended).
Sizes come from each run's config.evals entry (num_episodes or num_queries, shots, beam_size,
max_new_tokens).
"""
import logging
from typing import Callable, Sequence

import jax
import numpy as np

from flamingo_jax.demo import features
from flamingo_jax.demo.datasets import shapes_fewshot
from flamingo_jax.eval import decode
from flamingo_jax.eval import evaluate
from flamingo_jax.eval import fewshot
from flamingo_jax.eval import tasks
from flamingo_jax.models import nfnet


def evaluate_names(model, params, tokenizer, data, shots: Sequence[int] = fewshot.SHOTS, *,
                   preprocess: Callable = fewshot.to_model_range) -> dict[str, float]:
  """The close-ended `names` task: accuracy per k (first k supports) and the chance level.

  Each query is scored over its episode's `choices` by log-likelihood; k that do not fit the LM's
  context or the episode's support are left out (logged).
  """
  template = shapes_fewshot.NAME_TEMPLATE
  visual_tokens = _visual_tokens(model, params)
  correct, skipped = {k: [] for k in shots}, set()
  chance = []
  for ep in data["test"]:
    choices = [fewshot.text(c) for c in ep["choices"]]
    texts = [template.format(fewshot.text(n)) for n in ep["support_names"]]
    images = preprocess(np.concatenate([ep["support_images"], ep["query_images"]]))
    visual = visual_tokens(images[None, :, None])[0]  # [S + Q, R, D]
    support, queries = visual[:len(texts)], visual[len(texts):]
    labels = [choices.index(fewshot.text(n)) for n in ep["query_names"]]
    chance.append(1.0 / len(choices))
    longest = max(len(tokenizer.encode(template.format(c))) for c in choices)
    for k in shots:
      n = fewshot.shot_count(k)
      length = len(fewshot.build_prompt(tokenizer, texts[:n], "", k > 0)) + longest + 1
      if n > len(texts) or length > model.lm.max_len:
        skipped.add(k)
        continue
      scores = fewshot.score_choices(model, params, tokenizer, texts[:n], support[:k], queries,
                                     choices, template)
      correct[k] += list(scores.argmax(1) == np.array(labels))
  if skipped:
    logging.info("names: shots %s left out (support or context too short).", sorted(skipped))
  out = {f"accuracy/{k}shot": float(np.mean(correct[k])) for k in shots if k not in skipped}
  return {**out, "chance": float(np.mean(chance))}


def _visual_tokens(model, params) -> Callable:
  """images [B, N, T, H, W, 3] -> visual tokens [B, N, R, D]: through the feature cache of this
  model's frozen NFNet when this process made one (stage 3 does), else through the encoder."""
  cache = (features.find(model.vision, params["vision"])
           if "vision" in params and isinstance(model.vision, nfnet.NFNetConfig) else None)
  if cache is not None:
    connector = jax.jit(lambda p, f: model.apply(
        {"params": p}, f, method=lambda m, x: m.visual_connector(x)))
    return lambda images: connector(params, cache(np.asarray(images)))
  return lambda images: decode.visual_tokens(model, params, images)


@tasks.register("shapes_names")
def names(task, ctx: tasks.Context) -> dict[str, float]:
  data = {"test": evaluate.records("shapes_fewshot/names", "test", task.num_episodes)}
  return evaluate_names(ctx.model, ctx.params, ctx.tokenizer, data, task.shots,
                        preprocess=ctx.preprocess)


def _open_ended(kind: str):
  def run(task, ctx: tasks.Context) -> dict[str, float]:
    name = f"shapes_fewshot/{kind}"
    data = {"train": evaluate.records(name, "train"),
            "test": evaluate.records(name, "test", task.num_queries)}
    return fewshot.evaluate_open_ended(kind, ctx.model, ctx.params, ctx.tokenizer, data,
                                       task.shots, beam_size=task.beam_size,
                                       max_new_tokens=task.max_new_tokens,
                                       preprocess=ctx.preprocess)
  return run


tasks.register("shapes_vqa")(_open_ended("vqa"))
tasks.register("shapes_captioning")(_open_ended("captioning"))
