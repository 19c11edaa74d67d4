"""The demo's own pp ops, registered into `data/pp.py` by name when the demo is imported.

`name_episode` turns a shapes_fewshot/names episode into a training document, and `copy_tokens`
gives stage 2's tiny LM the in-context copying that few-shot naming runs on.
"""
import numpy as np

from flamingo_jax.data import pp
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.demo.datasets import shapes_fewshot


@pp.register
def name_episode(num_shots: int = 8):
  """A shapes_fewshot/names episode -> a document of `num_shots` named shapes, for training.

  Draws num_shots of the episode's support and query images in random order and gives its shape
  classes fresh made-up names per example, so a name can only be predicted from an earlier image
  of the same shape in context: 'images' [K, H, W, 3] and 'texts' ['', 'This is a dax.', ...].
  """
  def op(example):
    rng = pp.example_rng(example, "name_episode")
    images = [*pp.get_field(example, "support_images"), *pp.get_field(example, "query_images")]
    shapes = np.concatenate([pp.get_field(example, "support_shapes"),
                             pp.get_field(example, "query_shapes")])
    if num_shots > len(images):
      raise ValueError(f"name_episode: num_shots={num_shots} exceeds the episode's "
                       f"{len(images)} images.")
    classes = sorted(set(shapes.tolist()))
    names = dict(zip(classes, shapes_fewshot.nonsense_names(rng, len(classes))))
    pick = rng.choice(len(images), num_shots, replace=False)
    return {**example, "images": np.stack([images[i] for i in pick]),
            "texts": [""] + [shapes_fewshot.NAME_TEMPLATE.format(names[shapes[i]]) for i in pick]}
  return op


@pp.register
def copy_tokens(tokenizer: tokenizer_lib.Tokenizer, max_len: int = 64, min_period: int = 4,
                max_period: int = 16):
  """Any example -> `<BOS>` + a random run of text pieces repeated to `max_len`, for stage 2.

  In-context copying (induction heads, Olsson et al. 2022) is what few-shot naming runs on: the
  frozen LM must find the earlier image of the query's shape and copy the name after it. A large LM
  learns it from web text; the demo's tiny one does not from the demo's text, and does from these
  runs (period drawn from [min_period, max_period]). Only the repeats are targets. The source
  record's content is unused: it just numbers the stream.
  """
  if not 1 <= min_period <= max_period or max_len < 2 * max_period + 1:
    raise ValueError(f"copy_tokens: need 1 <= min_period <= max_period and max_len >= "
                     f"2 * max_period + 1 (two copies); got min_period={min_period}, "
                     f"max_period={max_period}, max_len={max_len}.")
  pieces = np.array(tokenizer.text_ids)

  def op(example):
    rng = pp.example_rng(example, "copy_tokens")
    period = int(rng.integers(min_period, max_period + 1))
    run = rng.choice(pieces, period)
    prefix = tokenizer.prefix
    tokens = np.concatenate([prefix, np.resize(run, max_len - len(prefix))]).astype(np.int32)
    loss_mask = (np.arange(max_len) > period).astype(np.float32)
    return {"tokens": tokens, "media_idx": np.zeros([max_len], np.int32), "loss_mask": loss_mask}
  return op
