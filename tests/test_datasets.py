"""The embedded TFDS builders: contract features, text that agrees with the pixels, determinism."""
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from flamingo_jax.demo import datasets
from flamingo_jax.demo.datasets import base
from flamingo_jax.demo.datasets import scenes
from flamingo_jax.demo.datasets import shapes_fewshot
from flamingo_jax.demo.datasets import shapes_interleaved
from flamingo_jax.demo.datasets import shapes_video

S = 48
SMALL = dict(num_train=4, num_test=12, image_size=S)
PALETTE = np.asarray(list(scenes.COLORS.values()), np.float32)
COLOR_NAMES = list(scenes.COLORS)
OBJECT_RE = re.compile(r'a (small|large) (\w+) (\w+) (on the left|in the middle|on the right)')


def prepare(name, config, data_dir, split='test'):
  builder = tfds.builder(name, data_dir=data_dir, config=config)
  builder.download_and_prepare()
  return builder, list(tfds.as_numpy(builder.as_dataset(split=split)))


def text(value):
  return value.decode() if isinstance(value, bytes) else str(value)


def color_map(image):
  """[S, S] index into scenes.COLORS of each pixel, -1 for the background."""
  dist = np.linalg.norm(image[..., None, :].astype(np.float32) - PALETTE, axis=-1)
  return np.where(dist.min(-1) < 50, dist.argmin(-1), -1)


def colors_in(image):
  return {COLOR_NAMES[i] for i in np.unique(color_map(image)) if i >= 0}


def box_center(m):
  ys, xs = np.nonzero(m)
  return np.asarray([ys.min() + ys.max() + 1, xs.min() + xs.max() + 1]) / 2


def best_shape(m):
  """The (shape, size) whose template, aligned to the box of mask `m`, overlaps it best."""
  def iou(shape, size):  # Best over sub-pixel shifts, as boxes are quantised.
    r = scenes.radius(size, S)
    center = box_center(m) - box_center(scenes.mask(shape, (S / 2, S / 2), r, S)) + S / 2
    shifts = np.linspace(-0.5, 0.5, 5)
    templates = [scenes.mask(shape, (center[0] + dy, center[1] + dx), r, S)
                 for dy in shifts for dx in shifts]
    return max((t & m).sum() / (t | m).sum() for t in templates)

  return max(((shape, size) for shape in scenes.SHAPES for size in scenes.SIZES),
             key=lambda shape_size: iou(*shape_size))


def position(m):
  """Where mask `m` lies: wholly in the left or right half, or across the middle."""
  xs = np.nonzero(m)[1]
  return 'left' if xs.max() < S / 2 else 'right' if xs.min() >= S / 2 else 'middle'


def check_description(image, description):
  """Each object named in `description` is drawn in its colour, shape and size, where it says."""
  objects = OBJECT_RE.findall(description)
  assert objects, description
  assert colors_in(image) == {color for _, color, _, _ in objects}, description
  cmap = color_map(image)
  for size, color, shape, where in objects:
    m = cmap == COLOR_NAMES.index(color)
    assert scenes.WHERE[position(m)] == where, description
    assert best_shape(m) == (shape, size), (description, best_shape(m))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


def test_pairs(data_dir):
  builder, rows = prepare('shapes_pairs', base.Config(name='t', **SMALL), data_dir)
  assert builder.info.splits['train'].num_examples == 4 and len(rows) == 12
  for row in rows:
    assert row['image'].shape == (S, S, 3) and row['image'].dtype == np.uint8
    caption = text(row['caption'])
    check_description(row['image'], caption)
    labels = row['objects']
    described = ' and '.join(
        f'a {scenes.SIZES[size]} {COLOR_NAMES[color]} {scenes.SHAPES[shape]} '
        f'{scenes.WHERE[scenes.POSITIONS[position]]}' for size, color, shape, position in zip(
            labels['size'], labels['color'], labels['shape'], labels['position']))
    assert caption in [t.format(described) for t in scenes.CAPTION_TEMPLATES]


def check_answer(image, question, answer):
  """`answer` is right about `image` for a question from scenes.QUESTIONS."""
  colors = colors_in(image)
  patterns = {k: re.escape(q).replace(r'\{shape\}', r'\w+').replace(r'\{color\}', r'\w+')
              for k, q in scenes.QUESTIONS.items()}
  kind = next(k for k, pattern in patterns.items() if re.fullmatch(pattern, question))
  if kind == 'count':
    assert answer == ('one', 'two')[len(colors) - 1]
  elif kind == 'colour':
    assert answer in colors
  elif kind == 'exists':
    shape = re.fullmatch(r'is there a (\w+)\?', question).group(1)
    drawn = {best_shape(color_map(image) == COLOR_NAMES.index(c))[0] for c in colors}
    assert answer == ('yes' if shape in drawn else 'no'), question
  else:
    named = [w for w in re.findall(r'\w+', question) if w in scenes.COLORS]
    assert len(named) == 1 and named[0] in colors, question
    m = color_map(image) == COLOR_NAMES.index(named[0])
    shape, size = best_shape(m)
    assert answer == {'shape': shape, 'size': size, 'position': position(m)}[kind], question
  return kind


def test_interleaved_text_refers_to_its_own_image(data_dir):
  config = shapes_interleaved.Config(name='t', max_images=3, num_train=4, num_test=24,
                                     image_size=S)
  _, rows = prepare('shapes_interleaved', config, data_dir)
  counts, chunks = set(), {'description': 0, 'qa': 0}
  for row in rows:
    images, texts = row['images'], [text(t) for t in row['texts']]
    assert images.ndim == 4 and images.shape[1:] == (S, S, 3) and images.dtype == np.uint8
    assert 1 <= len(images) <= 3 and len(texts) == len(images) + 1
    assert texts[0] in shapes_interleaved.INTROS
    for i, (image, chunk) in enumerate(zip(images, texts[1:]), start=1):
      if qa := re.fullmatch(r'Question: (.+\?) Answer: (\w+)\.', chunk):
        check_answer(image, *qa.groups())
        chunks['qa'] += 1
      else:
        assert int(re.search(r'(?:Image|picture|Picture) (\d+)', chunk).group(1)) == i, chunk
        check_description(image, chunk)
        chunks['description'] += 1
    counts.add(len(images))
  assert len(counts) > 1  # Documents vary in length,
  assert min(chunks.values()) > 0.3 * sum(chunks.values()), chunks  # and chunks in kind.


def motion(video, color):
  """(direction, growth) of the `color` shape, from its pixels in the first and last frames."""
  masks = [color_map(frame) == COLOR_NAMES.index(color) for frame in video]
  (y0, x0), (y1, x1) = (np.mean(np.nonzero(masks[i]), axis=1) for i in (0, -1))
  if abs(x1 - x0) > abs(y1 - y0):
    direction = 'right' if x1 > x0 else 'left'
  else:
    direction = 'down' if y1 > y0 else 'up'
  area = masks[-1].sum() / masks[0].sum()
  growth = 'growing' if area > 1.5 else 'shrinking' if area < 1 / 1.5 else 'none'
  return direction, growth


def test_video_motion_matches_caption(data_dir):
  config = shapes_video.Config(name='t', num_frames=5, fps=4, **SMALL)
  _, rows = prepare('shapes_video', config, data_dir)
  for row in rows:
    video = row['video']
    assert video.shape == (5, S, S, 3) and video.dtype == np.uint8 and row['fps'] == 4
    caption = text(row['caption'])
    color = COLOR_NAMES[row['color']]
    direction = list(shapes_video.DIRECTIONS)[row['direction']]
    growth = list(shapes_video.GROWTH)[row['growth']]
    template = next(t for t in shapes_video.TEMPLATES
                    if caption == shapes_video.caption(t, color, scenes.SHAPES[row['shape']],
                                                       direction, growth))
    assert motion(video, color) == (direction, growth), caption
    # Reversed, the clip shows the opposite motion, which has another caption.
    backward = motion(video[::-1], color)
    assert backward == (shapes_video.OPPOSITE[direction], shapes_video.OPPOSITE[growth])
    assert shapes_video.caption(template, color, scenes.SHAPES[row['shape']], *backward) != caption


def test_fewshot_captioning_and_vqa(data_dir):
  _, rows = prepare('shapes_fewshot', shapes_fewshot.Config(name='c', task='captioning', **SMALL),
                    data_dir)
  for row in rows:
    captions = [text(c) for c in row['captions']]
    assert len(captions) == len(scenes.CAPTION_TEMPLATES)
    check_description(row['image'], captions[0])
  config = shapes_fewshot.Config(name='v', task='vqa', num_train=4, num_test=60, image_size=S)
  _, rows = prepare('shapes_fewshot', config, data_dir)
  kinds = set()
  for row in rows:
    answers = [text(a) for a in row['answers']]
    assert row['image'].shape == (S, S, 3) and len(answers) == 1
    kind = check_answer(row['image'], text(row['question']), answers[0])
    assert kind == list(scenes.QUESTIONS)[row['question_type']]
    kinds.add(kind)
  assert kinds == set(scenes.QUESTIONS)


def test_fewshot_names_episodes(data_dir):
  config = shapes_fewshot.Config(name='n', task='names', num_ways=3, num_support=7, num_queries=4,
                                 num_train=2, num_test=6, image_size=S)
  _, rows = prepare('shapes_fewshot', config, data_dir)
  episodes = set()
  for row in rows:
    choices = [text(c) for c in row['choices']]
    assert len(set(choices)) == 3  # Chance level is 1 / 3.
    assert row['support_images'].shape == (7, S, S, 3)
    assert row['query_images'].shape == (4, S, S, 3)
    names, colors = {}, {}
    for part in ('support', 'query'):
      for image, name, shape in zip(row[f'{part}_images'], row[f'{part}_names'],
                                    row[f'{part}_shapes']):
        assert text(name) in choices
        assert names.setdefault(int(shape), text(name)) == text(name)  # One name per shape.
        (color,) = colors_in(image)
        assert colors.setdefault(int(shape), color) == color  # One colour per shape.
        assert best_shape(color_map(image) >= 0) == (scenes.SHAPES[shape], 'large')
    assert len(set(names.values())) == len(names)  # And one shape per name,
    assert len(set(colors.values())) == len(colors)  # and one colour per shape.
    assert {text(n) for n in row['support_names'][:3]} == set(choices)
    episodes.add(tuple(choices))
  assert len(episodes) == len(rows)


def test_determinism(tmp_path):
  def tfrecords(data_dir, seed):
    config = shapes_video.Config(name=f'seed{seed}', num_frames=3, seed=seed, **SMALL)
    tfds.builder('shapes_video', data_dir=data_dir, config=config).download_and_prepare()
    files = sorted(data_dir.glob('shapes_video/*/*/*.tfrecord*'))
    return {f.name: f.read_bytes() for f in files}

  first = tfrecords(tmp_path / 'a', seed=0)
  assert first and first == tfrecords(tmp_path / 'b', seed=0)  # Byte-identical shards.
  assert first != tfrecords(tmp_path / 'c', seed=1)


def test_splits_use_distinct_seeds():
  builder = shapes_interleaved.ShapesInterleaved(
      data_dir='unused', config=shapes_interleaved.Config(name='s', **SMALL))
  train = [ex for _, ex in builder._generate_examples(0, 3)]
  test = [ex for _, ex in builder._generate_examples(1, 3)]
  assert all(a['texts'] != b['texts'] for a, b in zip(train, test))


@pytest.mark.parametrize('make, field', [
    (lambda: base.Config(name='x', image_size=16), 'image_size=16'),
    (lambda: base.Config(name='x', num_test=0), 'num_test=0'),
    (lambda: shapes_interleaved.Config(name='x', max_images=0), 'max_images=0'),
    (lambda: shapes_interleaved.Config(name='x', qa_fraction=1.5), 'qa_fraction=1.5'),
    (lambda: shapes_video.Config(name='x', num_frames=1), 'num_frames=1'),
    (lambda: shapes_fewshot.Config(name='x', task='ocr'), "task='ocr'"),
    (lambda: shapes_fewshot.Config(name='x', num_ways=9), 'num_ways=9'),
    (lambda: shapes_fewshot.Config(name='x', num_ways=4, num_support=2), 'num_support=2'),
    (lambda: scenes.random_scene(np.random.default_rng(0), S, ['circle'], ['pink']),
     "colors=['pink']"),
    (lambda: scenes.random_scene(np.random.default_rng(0), S, ['circle'], ['red', 'blue']),
     "colors=['red', 'blue']"),
    (lambda: scenes.random_scene(np.random.default_rng(0), S, ['circle'], size='huge'),
     "size='huge'"),
])
def test_bad_sizes_fail_clearly(make, field):
  with pytest.raises(ValueError, match=re.escape(field)):
    make()


def words(lines):
  return {w for line in lines for w in re.findall(r'\w+', line.lower())}


def test_text_corpus_covers_the_data():
  corpus = datasets.text_corpus()
  vocabulary = words(corpus)
  template_words = words(line for line in corpus if not line.startswith('This is a '))
  assert len(template_words) < 80  # A tiny, consistent vocabulary.
  names = set(shapes_fewshot.nonsense_names(np.random.default_rng(1), 2000))
  assert not names & template_words  # Made-up names never collide with real words.
  emitted = []
  for builder_cls, config in [
      (shapes_interleaved.ShapesInterleaved, shapes_interleaved.Config(name='w', **SMALL)),
      (shapes_video.ShapesVideo, shapes_video.Config(name='w', **SMALL)),
      (shapes_fewshot.ShapesFewshot, shapes_fewshot.Config(name='w', task='vqa', **SMALL))]:
    builder = builder_cls(data_dir='unused', config=config)
    for _, row in builder._generate_examples(0, 20):
      emitted += [row.get('caption', ''), row.get('question', ''), *row.get('texts', ()),
                  *row.get('answers', ())]
  emitted += [scenes.caption(np.random.default_rng(i), scenes.random_scene(
      np.random.default_rng(i), S)[1]) for i in range(20)]
  assert words(emitted) <= vocabulary


@pytest.mark.slow
def test_default_configs_prepare(tmp_path):
  for name in ('shapes_pairs', 'shapes_interleaved', 'shapes_video', 'shapes_fewshot/captioning',
               'shapes_fewshot/vqa', 'shapes_fewshot/names'):
    builder = tfds.builder(name, data_dir=tmp_path)
    builder.download_and_prepare()
    config = builder.builder_config
    assert builder.info.splits['train'].num_examples == config.num_train
    assert builder.info.splits['test'].num_examples == config.num_test
