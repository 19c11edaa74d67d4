"""Procedural scenes: coloured shapes on textured backgrounds, and the text that describes them.

Shared by every embedded builder. Drawing is plain numpy and depends only on the `rng` passed in,
so a seeded generator gives byte-identical images. The vocabulary is deliberately tiny (6 shapes,
6 colours, 2 sizes, 3 positions) so a small tokenizer and model can learn it.
"""
import dataclasses
import itertools

import numpy as np

SHAPES = ('square', 'circle', 'triangle', 'diamond', 'cross', 'star')
COLORS = {  # Saturated, so they never look like the grey backgrounds.
    'red': (220, 40, 40),
    'green': (40, 170, 60),
    'blue': (40, 80, 220),
    'yellow': (235, 215, 40),
    'purple': (150, 60, 200),
    'orange': (245, 140, 30),
}
SIZES = ('small', 'large')
POSITIONS = ('left', 'middle', 'right')
WHERE = {'left': 'on the left', 'middle': 'in the middle', 'right': 'on the right'}
QUESTIONS = {
    'colour': 'what colour is the {shape}?',
    'shape': 'what shape is the {color} object?',
    'position': 'where is the {color} {shape}?',
    'size': 'is the {color} {shape} small or large?',
    'count': 'how many shapes are there?',
    'exists': 'is there a {shape}?',
}
CAPTION_TEMPLATES = ('{}.', 'a picture of {}.', 'there is {}.', 'an image showing {}.')

MIN_IMAGE_SIZE = 32
_RADIUS = {'small': 0.12, 'large': 0.2}  # Shape radius as a fraction of the image size.


@dataclasses.dataclass(frozen=True)
class Object:
  """One shape in a scene; `center` is (y, x) in pixels."""
  shape: str
  color: str
  size: str
  position: str
  center: tuple[float, float]


def check_image_size(image_size: int):
  if image_size < MIN_IMAGE_SIZE:
    raise ValueError(f'image_size={image_size} is too small: shapes need image_size >= '
                     f'{MIN_IMAGE_SIZE} so that a small one spans at least 7 pixels.')


def radius(size: str, image_size: int) -> float:
  return _RADIUS[size] * image_size


def mask(shape: str, center: tuple[float, float], r: float, image_size: int) -> np.ndarray:
  """Boolean [S, S] mask of `shape` with circumradius `r` around `center` (y, x)."""
  yy, xx = np.mgrid[:image_size, :image_size] + 0.5
  dy, dx = (yy - center[0]) / r, (xx - center[1]) / r  # Unit coordinates, y down.
  ady, adx = np.abs(dy), np.abs(dx)
  if shape == 'square':
    return np.maximum(ady, adx) <= 0.8
  if shape == 'circle':
    return dy**2 + dx**2 <= 1
  if shape == 'triangle':  # Upright, apex at the top.
    return (dy <= 0.8) & (adx <= (dy + 1) * 0.55)
  if shape == 'diamond':
    return ady + adx <= 1
  if shape == 'cross':
    return (np.minimum(ady, adx) <= 0.3) & (np.maximum(ady, adx) <= 0.9)
  if shape == 'star':  # Five points; each edge joins an outer (1) and an inner (0.45) vertex.
    half = np.pi / 5
    phi = np.mod(np.arctan2(dx, -dy), 2 * half)
    phi = np.minimum(phi, 2 * half - phi)
    inner = 0.45
    edge = inner * np.sin(half) / (np.sin(phi) + inner * np.sin(half - phi))
    return np.hypot(dy, dx) <= edge
  raise ValueError(f'shape={shape!r}; expected one of {SHAPES}.')


def background(rng: np.random.Generator, image_size: int) -> np.ndarray:
  """A low-saturation grey float [S, S, 3] image with noise and a random texture."""
  yy, xx = np.mgrid[:image_size, :image_size] / image_size
  base = rng.uniform(70, 180) + rng.uniform(-10, 10, size=3)
  kind = rng.integers(3)
  if kind == 0:  # Stripes at a random angle and frequency.
    angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 6)
    texture = 15 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
  elif kind == 1:  # Checkerboard.
    cells = rng.integers(2, 8)
    texture = 12 * (2 * ((np.floor(xx * cells) + np.floor(yy * cells)) % 2) - 1)
  else:  # Linear gradient.
    angle = rng.uniform(0, 2 * np.pi)
    texture = 30 * (np.cos(angle) * xx + np.sin(angle) * yy - 0.5)
  noise = rng.normal(0, 8, size=(image_size, image_size, 3))
  return base + texture[..., None] + noise


def paint(canvas: np.ndarray, shape: str, color: str, center: tuple[float, float], r: float,
          rng: np.random.Generator):
  """Draws a shape onto the float [S, S, 3] canvas in place, with a little pixel noise."""
  m = mask(shape, center, r, canvas.shape[0])
  canvas[m] = np.asarray(COLORS[color]) + rng.normal(0, 5, size=(m.sum(), 3))


def to_uint8(canvas: np.ndarray) -> np.ndarray:
  return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def random_objects(rng: np.random.Generator, image_size: int, shapes: list[str],
                   colors: list[str] | None = None, size: str | None = None) -> list[Object]:
  """1 shape (left, middle or right) or 2 (left and right), by default of distinct random colours
  and random sizes; `colors` (one per shape) and `size` fix those instead."""
  if colors is None:
    colors = rng.choice(list(COLORS), len(shapes), replace=False)
  elif len(colors) != len(shapes) or not set(colors) <= set(COLORS):
    raise ValueError(f'colors={colors}; expected one of {tuple(COLORS)} per shape in {shapes}.')
  if size is not None and size not in SIZES:
    raise ValueError(f'size={size!r}; expected one of {SIZES}.')
  if len(shapes) == 1:
    positions = [POSITIONS[rng.integers(3)]]
  elif len(shapes) == 2:
    positions = ['left', 'right']
  else:
    raise ValueError(f'shapes={shapes}; expected 1 or 2 shapes.')
  objects = []
  for shape, color, position in zip(shapes, colors, positions):
    obj_size = size or SIZES[rng.integers(2)]
    r, half = radius(obj_size, image_size), image_size / 2
    if position == 'left':
      x = rng.uniform(r, half - r)
    elif position == 'right':
      x = rng.uniform(half + r, image_size - r)
    else:
      x = half + rng.uniform(-0.05, 0.05) * image_size
    y = rng.uniform(r, image_size - r)
    objects.append(Object(str(shape), str(color), obj_size, position, (y, x)))
  return objects


def random_scene(rng: np.random.Generator, image_size: int, shapes: list[str] | None = None,
                 colors: list[str] | None = None,
                 size: str | None = None) -> tuple[np.ndarray, list[Object]]:
  """A uint8 [S, S, 3] image of `shapes` (default: 1 or 2 distinct random ones), and its objects;
  `colors` and `size` as in random_objects."""
  if shapes is None:
    shapes = rng.choice(SHAPES, rng.integers(1, 3), replace=False)
  objects = random_objects(rng, image_size, shapes, colors, size)
  canvas = background(rng, image_size)
  for obj in objects:
    paint(canvas, obj.shape, obj.color, obj.center, radius(obj.size, image_size), rng)
  return to_uint8(canvas), objects


def describe(objects: list[Object]) -> str:
  """E.g. 'a small red circle on the left and a large blue square on the right'."""
  return ' and '.join(f'a {o.size} {o.color} {o.shape} {WHERE[o.position]}' for o in objects)


def caption(rng: np.random.Generator, objects: list[Object]) -> str:
  return CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))].format(describe(objects))


def question_answer(rng: np.random.Generator, objects: list[Object]) -> tuple[str, str, str]:
  """A random (question type, question, answer) about the scene of `objects`."""
  kind = list(QUESTIONS)[rng.integers(len(QUESTIONS))]
  obj = objects[rng.integers(len(objects))]
  shapes = [o.shape for o in objects]
  shape = obj.shape
  if kind == 'exists' and rng.integers(2):  # Half the time ask about an absent shape.
    shape = str(rng.choice([s for s in SHAPES if s not in shapes]))
  answer = {'colour': obj.color, 'shape': obj.shape, 'position': obj.position, 'size': obj.size,
            'count': ('one', 'two')[len(objects) - 1],
            'exists': 'yes' if shape in shapes else 'no'}[kind]
  return kind, QUESTIONS[kind].format(shape=shape, color=obj.color), answer


def question_answer_corpus() -> list[str]:
  """Every question `question_answer` can ask and every answer it can give."""
  questions = {q.format(shape=s, color=c)
               for q, s, c in itertools.product(QUESTIONS.values(), SHAPES, COLORS)}
  return sorted(questions) + [*COLORS, *SHAPES, *POSITIONS, *SIZES, 'one', 'two', 'yes', 'no']


def single_descriptions() -> list[str]:
  """Every one-object description."""
  return [f'a {size} {color} {shape} {WHERE[position]}'
          for size, color, shape, position in itertools.product(SIZES, COLORS, SHAPES, POSITIONS)]


def corpus() -> list[str]:
  """Every caption template with every one-object description, and every left-right pair once."""
  lines = [t.format(d) for t in CAPTION_TEMPLATES for d in single_descriptions()]
  side = lambda where: [d for d in single_descriptions() if d.endswith(WHERE[where])]
  lines += [f'{left} and {right}.' for left in side('left') for right in side('right')]
  return lines
