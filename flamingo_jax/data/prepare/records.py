"""What each kind keeps: its TFDS features and how a sample becomes one of its records.

The features are those the trainer's pp ops read (data/pp.py), as the demo builders store them:
  interleaved: 'images' (encoded, any size) and 'texts' (N + 1 strings: texts[0] before the first
               image, texts[i] after image i), for `decode|...|tokenize_document`;
  pairs:       'image' and 'caption', for `decode|...|tokenize_pair`;
  video:       'video' (frames at 'fps', JPEG-encoded) and 'caption', for
               `sample_frames(...)|...|tokenize_video`.
Each record also has 'source': the file (and line, or tar key) it came from.

Interleaved docs are MMC4's `{"text_list": [str], "image_info": [{"image_name": str,
"matched_text_index": int}]}` (an image comes before the sentence it matches; sentences join with
a space) or OBELICS's `{"texts": [str | null], "images": [str | null]}` (aligned lists, one of the
two set per position; paragraphs join with a blank line). A document is kept whole or not at all.
"""
import dataclasses
from typing import Callable

import numpy as np
import tensorflow_datasets as tfds

from flamingo_jax.data.prepare import encode
from flamingo_jax.data.prepare.report import Skip

KINDS = ('interleaved', 'pairs', 'video')
# Columns a CSV/TSV/Parquet table of each kind must have (JSONL docs are checked per line).
COLUMNS = {'interleaved': (), 'pairs': ('image_path', 'caption'),
           'video': ('video_path', 'caption')}


@dataclasses.dataclass(frozen=True)
class Options:
  """How media are stored (see encode.py); part of a dataset's plan, so a resumed run agrees."""
  max_size: int = 0  # Longer side of stored images and frames (0: as they are).
  fps: float = 1.0  # Video frames kept per second (the paper's 1 FPS).
  max_frames: int = 32  # Longer videos keep this many frames, evenly spaced.
  min_frames: int = 2  # Shorter videos are skipped ('too_short_video').


def features(kind: str) -> tfds.features.FeaturesDict:
  image = tfds.features.Image(shape=(None, None, 3))
  media = {
      'interleaved': {'images': tfds.features.Sequence(image),
                      'texts': tfds.features.Sequence(tfds.features.Text())},
      'pairs': {'image': image, 'caption': tfds.features.Text()},
      'video': {'video': tfds.features.Video(shape=(None, None, None, 3), encoding_format='jpeg'),
                'caption': tfds.features.Text(), 'fps': tfds.features.Scalar(np.float32)},
  }[kind]
  return tfds.features.FeaturesDict({**media, 'source': tfds.features.Text()})


def _text(value, name: str) -> str:
  if not isinstance(value, str):
    raise Skip('malformed_record', name, f'expected a string, got {type(value).__name__}')
  try:
    value.encode('utf-8')
  except UnicodeEncodeError as e:  # Lone surrogates (JSON escapes, CSV bytes that were not UTF-8).
    raise Skip('non_utf8', name) from e
  return value


def _field(doc: dict, key: str, name: str):
  if key not in doc:
    raise Skip('malformed_record', name, f'no {key!r}; its keys are {sorted(doc)}')
  return doc[key]


def _mmc4(doc: dict, name: str) -> list[tuple[str, str]]:
  sentences, infos = doc['text_list'], _field(doc, 'image_info', name)
  if not isinstance(sentences, list) or not isinstance(infos, list):
    raise Skip('malformed_record', name, "'text_list' and 'image_info' must be lists")
  before = [[] for _ in sentences]
  for info in infos:
    index = info.get('matched_text_index') if isinstance(info, dict) else None
    if not isinstance(index, int) or not 0 <= index < len(sentences):
      raise Skip('image_position_mismatch', name,
                 f'matched_text_index={index!r} with {len(sentences)} sentences')
    before[index].append(('image', info.get('image_name') or info.get('raw_url')))
  return [item for images, s in zip(before, sentences) for item in [*images, ('text', s)]]


def _obelics(doc: dict, name: str) -> list[tuple[str, str]]:
  texts, images = doc['texts'], _field(doc, 'images', name)
  if not isinstance(texts, list) or not isinstance(images, list):
    raise Skip('malformed_record', name, "'texts' and 'images' must be lists")
  if len(texts) != len(images) or any(t is not None and i is not None
                                      for t, i in zip(texts, images)):
    raise Skip('image_position_mismatch', name,
               f'{len(texts)} texts and {len(images)} images are not aligned one per position')
  return [('image', i) if i is not None else ('text', t) for t, i in zip(texts, images)
          if (t, i) != (None, None)]


def interleaved(doc: dict, load: Callable[[str], bytes], name: str, opts: Options) -> dict:
  if 'text_list' in doc:
    items, sep = _mmc4(doc, name), ' '
  elif 'texts' in doc:
    items, sep = _obelics(doc, name), '\n\n'
  else:
    raise Skip('malformed_record', name, "expected 'text_list' (MMC4) or 'texts' (OBELICS)")
  texts, images = [[]], []
  for what, value in items:
    if what == 'text':
      texts[-1].append(_text(value, name))
    else:
      images.append(encode.image(load(value), f'{name}: {value}', opts.max_size))
      texts.append([])
  texts = [sep.join(t) for t in texts]
  if not any(t.strip() for t in texts):
    raise Skip('empty_text', name)
  return {'images': images, 'texts': texts}


def _caption(doc: dict, name: str) -> str:
  caption = _text(_field(doc, 'caption', name), name)
  if not caption.strip():
    raise Skip('empty_text', name)
  return caption


def pairs(doc: dict, load: Callable[[str], bytes], name: str, opts: Options) -> dict:
  caption, ref = _caption(doc, name), _field(doc, 'image_path', name)
  return {'image': encode.image(load(ref), f'{name}: {ref}', opts.max_size), 'caption': caption}


def video(doc: dict, load: Callable[[str], bytes], name: str, opts: Options) -> dict:
  caption, ref = _caption(doc, name), _field(doc, 'video_path', name)
  frames, fps = encode.video(load(ref), f'{name}: {ref}', fps=opts.fps, max_frames=opts.max_frames,
                             min_frames=opts.min_frames, max_size=opts.max_size)
  return {'video': frames, 'caption': caption, 'fps': fps}


def record(kind: str, doc: dict, load: Callable[[str], bytes], name: str, opts: Options) -> dict:
  """The record of `kind` for one sample, or Skip."""
  make = {'interleaved': interleaved, 'pairs': pairs, 'video': video}[kind]
  return {**make(doc, load, name, opts), 'source': name}
