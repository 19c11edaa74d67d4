"""`shapes_interleaved`: documents of interleaved images and text (the M3W stand-in).

Features: `images` uint8 [N, S, S, 3] with 1 <= N <= max_images; `texts`, N + 1 strings:
`texts[0]` comes before the first image (may be empty) and `texts[i]` follows image i and either
describes it by number, e.g. 'Image 2 shows a small green triangle on the left.', or (a
`qa_fraction` of the chunks) asks and answers a question about it, e.g. 'Question: what colour is
the square? Answer: red.', so each chunk needs its own image. Web pages hold questions and answers
too; without them in training, the demo's few-shot VQA scored 0 (README, "Status"). The few-shot
VQA prompts ask in another form ('... Short answer: red', eval/fewshot.py).
"""
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from flamingo_jax.demo.datasets import base
from flamingo_jax.demo.datasets import scenes

INTROS = ('', 'Here are some shapes.', 'A page of pictures.')
TEMPLATES = ('Image {} shows {}.', 'In picture {} there is {}.', 'Picture {}: {}.')
QA_TEMPLATE = 'Question: {} Answer: {}.'


@dataclasses.dataclass(kw_only=True)
class Config(base.Config):
  max_images: int = 5  # The paper's M3W limit.
  qa_fraction: float = 0.5  # Chunks that are a question and its answer, not a description.

  def __post_init__(self):
    super().__post_init__()
    if self.max_images < 1:
      raise ValueError(f'max_images={self.max_images}; expected at least 1.')
    if not 0 <= self.qa_fraction <= 1:
      raise ValueError(f'qa_fraction={self.qa_fraction}; expected a fraction in [0, 1].')


class ShapesInterleaved(base.Builder):
  """Interleaved image-text documents about procedurally drawn shapes."""
  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {**base.Builder.RELEASE_NOTES,
                   '1.1.0': 'qa_fraction of the chunks ask and answer a question.'}
  BUILDER_CONFIGS = [Config(name='default', num_train=2000, num_test=100)]

  def _features(self):
    return {'images': tfds.features.Sequence(self._image()),
            'texts': tfds.features.Sequence(tfds.features.Text())}

  def _example(self, rng: np.random.Generator) -> dict:
    images, texts = [], [INTROS[rng.integers(len(INTROS))]]
    for i in range(1, rng.integers(1, self.builder_config.max_images + 1) + 1):
      image, objects = scenes.random_scene(rng, self.builder_config.image_size)
      images.append(image)
      if rng.random() < self.builder_config.qa_fraction:
        _, question, answer = scenes.question_answer(rng, objects)
        texts.append(QA_TEMPLATE.format(question, answer))
      else:
        texts.append(TEMPLATES[rng.integers(len(TEMPLATES))].format(i, scenes.describe(objects)))
    return {'images': np.stack(images), 'texts': texts}


def corpus() -> list[str]:
  """The intros, every template with every image number and one-object description, and the
  question-answer template (scenes.question_answer_corpus() has the questions and answers)."""
  max_images = max(c.max_images for c in ShapesInterleaved.BUILDER_CONFIGS)
  return [*filter(None, INTROS), QA_TEMPLATE.format('', '')] + [
      t.format(i, d) for t in TEMPLATES for i in range(1, max_images + 1)
      for d in scenes.single_descriptions()]
