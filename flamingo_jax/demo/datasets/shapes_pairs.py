"""`shapes_pairs`: image-caption pairs (the ALIGN/LTIP stand-in), one scene of 1 or 2 shapes each.

Features: `image` uint8 [S, S, 3]; `caption`, e.g. 'a picture of a small red circle on the left
and a large blue square on the right.'; `objects`, the drawn shapes' labels, left to right.
"""
import numpy as np
import tensorflow_datasets as tfds

from flamingo_jax.demo.datasets import base
from flamingo_jax.demo.datasets import scenes


class ShapesPairs(base.Builder):
  """Image-caption pairs of procedurally drawn shapes."""
  BUILDER_CONFIGS = [base.Config(name='default', num_train=4000, num_test=200)]

  def _features(self):
    label = lambda names: tfds.features.ClassLabel(names=list(names))
    return {
        'image': self._image(),
        'caption': tfds.features.Text(),
        'objects': tfds.features.Sequence({
            'shape': label(scenes.SHAPES), 'color': label(scenes.COLORS),
            'size': label(scenes.SIZES), 'position': label(scenes.POSITIONS)}),
    }

  def _example(self, rng: np.random.Generator) -> dict:
    image, objects = scenes.random_scene(rng, self.builder_config.image_size)
    return {
        'image': image,
        'caption': scenes.caption(rng, objects),
        'objects': [{'shape': o.shape, 'color': o.color, 'size': o.size, 'position': o.position}
                    for o in objects],
    }
