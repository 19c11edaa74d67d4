"""`shapes_video`: short clips of one shape moving, captioned with its motion (the VTP stand-in).

Features: `video` uint8 [T, S, S, 3]; `caption`, e.g. 'a video of a red circle moving to the left
and growing.'; `fps`; and labels `shape`, `color`, `direction`, `growth`. The shape moves by 0.4 S,
so frame order matters: the reversed clip shows the opposite direction (and growth), another
caption.
"""
import dataclasses
import itertools

import numpy as np
import tensorflow_datasets as tfds

from flamingo_jax.demo.datasets import base
from flamingo_jax.demo.datasets import scenes

DIRECTIONS = {  # (dy, dx) per clip, in units of the image size.
    'left': (0, -0.4), 'right': (0, 0.4), 'up': (-0.4, 0), 'down': (0.4, 0)}
MOTION = {'left': 'moving to the left', 'right': 'moving to the right', 'up': 'moving up',
          'down': 'moving down'}
GROWTH = {'none': '', 'growing': ' and growing', 'shrinking': ' and shrinking'}
OPPOSITE = {'left': 'right', 'right': 'left', 'up': 'down', 'down': 'up',
            'none': 'none', 'growing': 'shrinking', 'shrinking': 'growing'}
TEMPLATES = ('a video of a {} {} {}{}.', 'a {} {} {}{}.', 'a clip showing a {} {} {}{}.')


@dataclasses.dataclass(kw_only=True)
class Config(base.Config):
  num_frames: int = 8  # The paper's video length.
  fps: int = 8

  def __post_init__(self):
    super().__post_init__()
    for field in ('num_frames', 'fps'):
      if getattr(self, field) < 2:
        raise ValueError(f'{field}={getattr(self, field)}; expected at least 2.')


def caption(template: str, color: str, shape: str, direction: str, growth: str) -> str:
  return template.format(color, shape, MOTION[direction], GROWTH[growth])


class ShapesVideo(base.Builder):
  """Clips of a procedurally drawn shape moving across a textured background."""
  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {**base.Builder.RELEASE_NOTES,
                   '1.1.0': 'video declared as a Sequence of Images (the same PNG frames).'}
  BUILDER_CONFIGS = [Config(name='default', num_train=500, num_test=100)]

  def _features(self):
    cfg = self.builder_config
    label = lambda names: tfds.features.ClassLabel(names=list(names))
    return {
        # What tfds.features.Video stores (PNG frames), without its constructor's TensorFlow
        # import (4 s of each demo stage that reads the clips).
        'video': tfds.features.Sequence(self._image(), length=cfg.num_frames),
        'caption': tfds.features.Text(),
        'fps': tfds.features.Scalar(np.int32),
        'shape': label(scenes.SHAPES), 'color': label(scenes.COLORS),
        'direction': label(DIRECTIONS), 'growth': label(GROWTH),
    }

  def _example(self, rng: np.random.Generator) -> dict:
    cfg, size = self.builder_config, self.builder_config.image_size
    pick = lambda names: list(names)[rng.integers(len(names))]
    shape, color = pick(scenes.SHAPES), pick(scenes.COLORS)
    direction, growth = pick(DIRECTIONS), pick(GROWTH)
    small, large = scenes.radius('small', size), scenes.radius('large', size)
    radii = {'none': [(small + large) / 2] * 2, 'growing': [small, large],
             'shrinking': [large, small]}[growth]
    # Start anywhere that keeps the largest shape inside the image for the whole clip.
    move = np.asarray(DIRECTIONS[direction]) * size
    lo, hi = large - np.minimum(move, 0), size - large - np.maximum(move, 0)
    start = rng.uniform(lo, hi)
    background = scenes.background(rng, size)
    frames = []
    for t in np.linspace(0, 1, cfg.num_frames):
      canvas = background.copy()
      r = radii[0] + t * (radii[1] - radii[0])
      scenes.paint(canvas, shape, color, tuple(start + t * move), r, rng)
      frames.append(scenes.to_uint8(canvas))
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    return {
        'video': np.stack(frames), 'caption': caption(template, color, shape, direction, growth),
        'fps': cfg.fps, 'shape': shape, 'color': color, 'direction': direction, 'growth': growth,
    }


def corpus() -> list[str]:
  """Every template with every colour, shape, direction and growth."""
  return [caption(*args) for args in itertools.product(
      TEMPLATES, scenes.COLORS, scenes.SHAPES, DIRECTIONS, GROWTH)]
