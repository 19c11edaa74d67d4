"""`shapes_interleaved`: documents of interleaved images and text (the M3W stand-in).

Features: `images` uint8 [N, S, S, 3] with 1 <= N <= max_images; `texts`, N + 1 strings:
`texts[0]` comes before the first image (may be empty) and `texts[i]` follows image i and describes
it by number, e.g. 'Image 2 shows a small green triangle on the left.', so each chunk needs its own
image.
"""
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from flamingo_jax.data.datasets import base
from flamingo_jax.data.datasets import scenes

INTROS = ('', 'Here are some shapes.', 'A page of pictures.')
TEMPLATES = ('Image {} shows {}.', 'In picture {} there is {}.', 'Picture {}: {}.')


@dataclasses.dataclass(kw_only=True)
class Config(base.Config):
  max_images: int = 5  # The paper's M3W limit.

  def __post_init__(self):
    super().__post_init__()
    if self.max_images < 1:
      raise ValueError(f'max_images={self.max_images}; expected at least 1.')


class ShapesInterleaved(base.Builder):
  """Interleaved image-text documents about procedurally drawn shapes."""
  BUILDER_CONFIGS = [Config(name='default', num_train=2000, num_test=100)]

  def _features(self):
    return {'images': tfds.features.Sequence(self._image()),
            'texts': tfds.features.Sequence(tfds.features.Text())}

  def _example(self, rng: np.random.Generator) -> dict:
    images, texts = [], [INTROS[rng.integers(len(INTROS))]]
    for i in range(1, rng.integers(1, self.builder_config.max_images + 1) + 1):
      image, objects = scenes.random_scene(rng, self.builder_config.image_size)
      images.append(image)
      texts.append(TEMPLATES[rng.integers(len(TEMPLATES))].format(i, scenes.describe(objects)))
    return {'images': np.stack(images), 'texts': texts}


def corpus() -> list[str]:
  """The intros and every template with every image number and one-object description."""
  max_images = max(c.max_images for c in ShapesInterleaved.BUILDER_CONFIGS)
  return [*filter(None, INTROS)] + [
      t.format(i, d) for t in TEMPLATES for i in range(1, max_images + 1)
      for d in scenes.single_descriptions()]
