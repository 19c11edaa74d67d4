"""`shapes_fewshot`: few-shot evaluation tasks, one config per task.

- `captioning`: `image`; `captions`, the scene described by every caption template (the references).
- `vqa`: `image`; `question`, e.g. 'what colour is the square?'; `answers`, a one-word answer;
  `question_type`. Open-ended.
  For both, a k-shot prompt takes its k support examples from the train split.
- `names`: one row per *episode*, a task solvable only in context. The episode gives `num_ways`
  objects made-up names (`choices`, e.g. 'dax', 'trumeck'), drawn fresh per episode; an object is
  a large shape in a colour of its own (both distinct within the episode, drawn per episode).
  `support_images` / `support_names` / `support_shapes` [K] and `query_images` / `query_names` /
  `query_shapes` [Q] show one object each, in a random place on a random background. The demo's
  frozen NFNet is too small to tell shapes apart reliably under varying colour and size (a linear
  probe of its features reads shape at about 0.4-0.7, colour at about 1.0), and then stage 3 does
  not learn naming (README, "Status"); the episode tests binding names in context, not fine
  vision, so its objects differ in what that encoder sees. A k-shot prompt is the first k support
  examples as `<image>` + NAME_TEMPLATE.format(name), then a query image, scored
  over `choices` (chance is 1 / len(choices)). The support is ordered in rounds that each show every
  class once, so any k >= num_ways shows every name.
"""
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from flamingo_jax.demo.datasets import base
from flamingo_jax.demo.datasets import scenes

TASKS = ('captioning', 'vqa', 'names')
NAME_TEMPLATE = 'This is a {}.'
_ONSETS = ('b', 'd', 'f', 'g', 'k', 'l', 'm', 'n', 'p', 'r', 's', 't', 'v', 'w', 'z',
           'bl', 'dr', 'fl', 'gl', 'kr', 'pl', 'sn', 'st', 'tr')
_VOWELS = ('a', 'e', 'i', 'o', 'u')
_CODAS = ('b', 'g', 'k', 'm', 'n', 'p', 't', 'x', 'z', 'ck', 'sh')


@dataclasses.dataclass(kw_only=True)
class Config(base.Config):
  """`num_train`/`num_test` count images (captioning), questions (vqa) or episodes (names)."""
  task: str = 'captioning'
  num_ways: int = 4  # Names (and choices) per episode.
  num_support: int = 32  # The most shots a prompt can use.
  num_queries: int = 8

  def __post_init__(self):
    super().__post_init__()
    if self.task not in TASKS:
      raise ValueError(f'task={self.task!r}; expected one of {TASKS}.')
    if not 2 <= self.num_ways <= len(scenes.SHAPES):
      raise ValueError(
          f'num_ways={self.num_ways}; expected 2 to {len(scenes.SHAPES)} (the number of shapes).')
    if self.num_support < self.num_ways:
      raise ValueError(f'num_support={self.num_support}; expected at least num_ways='
                       f'{self.num_ways} so the support shows every name.')
    if self.num_queries < 1:
      raise ValueError(f'num_queries={self.num_queries}; expected at least 1.')


def nonsense_names(rng: np.random.Generator, n: int) -> list[str]:
  """`n` distinct pronounceable made-up words of 1 or 2 syllables, e.g. 'dax', 'trumeck'."""
  pick = lambda options: options[rng.integers(len(options))]
  names = []
  while len(names) < n:
    syllables = ''.join(pick(_ONSETS) + pick(_VOWELS) for _ in range(rng.integers(1, 3)))
    if (name := syllables + pick(_CODAS)) not in names:
      names.append(name)
  return names


class ShapesFewshot(base.Builder):
  """Few-shot evaluation tasks on procedurally drawn shapes."""
  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {**base.Builder.RELEASE_NOTES,
                   '1.1.0': 'names: each class is a large shape in a colour of its own.'}
  BUILDER_CONFIGS = [
      Config(name='captioning', task='captioning', num_train=500, num_test=100),
      Config(name='vqa', task='vqa', num_train=1000, num_test=200),
      Config(name='names', task='names', num_train=20, num_test=50),
  ]

  def _features(self):
    image, text = self._image(), tfds.features.Text()
    if self.builder_config.task == 'captioning':
      return {'image': image, 'captions': tfds.features.Sequence(text)}
    if self.builder_config.task == 'vqa':
      return {'image': image, 'question': text, 'answers': tfds.features.Sequence(text),
              'question_type': tfds.features.ClassLabel(names=list(scenes.QUESTIONS))}
    shapes = tfds.features.Sequence(tfds.features.ClassLabel(names=list(scenes.SHAPES)))
    return {'choices': tfds.features.Sequence(text),
            'support_images': tfds.features.Sequence(image),
            'support_names': tfds.features.Sequence(text), 'support_shapes': shapes,
            'query_images': tfds.features.Sequence(image),
            'query_names': tfds.features.Sequence(text), 'query_shapes': shapes}

  def _example(self, rng: np.random.Generator) -> dict:
    cfg = self.builder_config
    if cfg.task == 'names':
      return self._episode(rng)
    image, objects = scenes.random_scene(rng, cfg.image_size)
    if cfg.task == 'captioning':
      return {'image': image,
              'captions': [t.format(scenes.describe(objects)) for t in scenes.CAPTION_TEMPLATES]}
    kind, question, answer = scenes.question_answer(rng, objects)
    return {'image': image, 'question': question, 'answers': [answer], 'question_type': kind}

  def _episode(self, rng: np.random.Generator) -> dict:
    cfg = self.builder_config
    shapes = [str(s) for s in rng.choice(scenes.SHAPES, cfg.num_ways, replace=False)]
    colors = [str(c) for c in rng.choice(list(scenes.COLORS), cfg.num_ways, replace=False)]
    names = nonsense_names(rng, cfg.num_ways)
    rounds = -(-cfg.num_support // cfg.num_ways)
    support = np.concatenate([rng.permutation(cfg.num_ways) for _ in range(rounds)])
    query = rng.integers(cfg.num_ways, size=cfg.num_queries)
    example = {'choices': names}
    for part, classes in (('support', support[:cfg.num_support]), ('query', query)):
      example[f'{part}_images'] = np.stack(
          [scenes.random_scene(rng, cfg.image_size, [shapes[c]], [colors[c]], 'large')[0]
           for c in classes])
      example[f'{part}_names'] = [names[c] for c in classes]
      example[f'{part}_shapes'] = [shapes[c] for c in classes]
    return example


def corpus(num_names: int = 1000) -> list[str]:
  """Every question, every answer, and NAME_TEMPLATE with `num_names` seeded made-up names."""
  names = nonsense_names(np.random.default_rng(0), num_names)
  return scenes.question_answer_corpus() + [NAME_TEMPLATE.format(n) for n in names]
