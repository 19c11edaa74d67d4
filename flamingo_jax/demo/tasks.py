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

import numpy as np

from flamingo_jax.demo.datasets import shapes_fewshot
from flamingo_jax.eval import decode
from flamingo_jax.eval import evaluate
from flamingo_jax.eval import fewshot
from flamingo_jax.eval import tasks


def evaluate_names(model, params, tokenizer, data, shots: Sequence[int] = fewshot.SHOTS, *,
                   preprocess: Callable = fewshot.to_model_range) -> dict[str, float]:
  """The close-ended `names` task: accuracy per k (first k supports) and the chance level.

  Each query is scored over its episode's `choices` by log-likelihood; k that do not fit the LM's
  context or the episode's support are left out (logged).
  """
  template = shapes_fewshot.NAME_TEMPLATE
  correct, skipped = {k: [] for k in shots}, set()
  chance = []
  for ep in data["test"]:
    choices = [fewshot.text(c) for c in ep["choices"]]
    texts = [template.format(fewshot.text(n)) for n in ep["support_names"]]
    images = preprocess(np.concatenate([ep["support_images"], ep["query_images"]]))
    visual = decode.visual_tokens(model, params, images[None, :, None])[0]  # [S + Q, R, D]
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
