"""Preprocessing ops selected by a string, big_vision style.

    fn = pp.build("decode|resize_pad(64)|value_range(-1, 1)|tokenize_pair(max_len=32)", tokenizer)
    batch_fields = fn(example)

Ops are plain numpy/PIL functions over one example dict, run in Python by `mixture`. That keeps the
pipeline deterministic and resumable with no machinery: an example's output depends only on the
record and the generator that `mixture` puts in `example['_rng']` (seeded by the example's position
in the stream), so any batch can be recomputed from the step number alone. Random ops (flip,
color_jitter, choose, prepend_space, sample_frames' random start, tokenize_document's window and
p_next) draw from that generator; use them in training pp only.

Image ops act on every media field present: 'image' [H, W, 3], 'images' [N, H, W, 3] (or a list of
differently sized frames before `resize_pad`) and 'video' [T, H, W, 3]. Tokenising ops end the
pipeline: they return exactly the batch fields of `interleave` (without B).
"""
import ast
import inspect
import io
import os
from typing import Any, Callable

import numpy as np
from PIL import Image

from flamingo_jax.data import interleave
from flamingo_jax.data import tokenizer as tokenizer_lib

Example = dict[str, Any]
MEDIA_KEYS = ("image", "images", "video")
_OPS: dict[str, Callable[..., Callable[[Example], Example]]] = {}


def register(fn):
  """Adds the op factory `fn` under its name (also for ops defined outside this module, e.g. the
  demo's, imported through config.modules)."""
  if fn.__name__ in _OPS and _OPS[fn.__name__] is not fn:
    raise ValueError(f"pp op {fn.__name__!r} is registered twice ({_OPS[fn.__name__].__module__} "
                     f"and {fn.__module__}).")
  _OPS[fn.__name__] = fn
  return fn


def get_field(example: Example, key: str) -> Any:
  """example['a/b'] reads the nested example['a']['b'] (TFDS features like 'captions/text')."""
  value = example
  for part in key.split("/"):
    if not isinstance(value, dict) or part not in value:
      raise KeyError(f"example has no field {key!r}; its fields are {sorted(example)}.")
    value = value[part]
  return value


def example_rng(example: Example, op: str) -> np.random.Generator:
  if "_rng" not in example:
    raise ValueError(f"op {op!r} is random and needs example['_rng'] (the mixture sets it).")
  return example["_rng"]


def _text(value: Any, key: str) -> str:
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if not isinstance(value, str):
    raise TypeError(f"field {key!r} must be a string; got {type(value).__name__} "
                    "(use choose(...) to pick one of several captions).")
  return value


def _frame(value: Any, key: str, op: str, dtype=np.uint8) -> np.ndarray:
  """`value` as one [H, W, 3] frame of `dtype` (None: any), or a clear error."""
  frame = np.asarray(value)
  if frame.ndim != 3 or frame.shape[-1] != 3:
    raise ValueError(f"{op}: field {key!r} has a frame of shape {frame.shape} "
                     f"(dtype {frame.dtype}); expected [H, W, 3] (encoded images need 'decode').")
  if dtype is not None and frame.dtype != dtype:
    raise ValueError(f"{op}: field {key!r} has dtype {frame.dtype}; expected {np.dtype(dtype)}.")
  return frame


def _map_frames(example: Example, op: str, fn: Callable[[Any, str], np.ndarray]) -> Example:
  """Applies fn(frame, key) to every frame of every media field present.

  'image' is one frame; 'images' and 'video' are sequences of frames, stacked again when all
  results share a shape (a list otherwise, e.g. differently sized images before resize_pad).
  """
  out = dict(example)
  for key in MEDIA_KEYS:
    if key not in example:
      continue
    value = example[key]
    if key == "image":
      out[key] = fn(value, key)
      continue
    if isinstance(value, np.ndarray) and value.dtype != object and value.ndim != 4:
      raise ValueError(f"{op}: field {key!r} has shape {value.shape}; expected [N, H, W, 3].")
    frames = [fn(f, key) for f in value]
    if frames:
      same = len({(f.shape, f.dtype) for f in frames}) == 1
      out[key] = np.stack(frames) if same else frames
  return out


# Images.


@register
def decode():
  """Decodes encoded images (bytes) or reads image files (a path) to uint8 [H, W, 3] RGB."""
  def frame(value, key):
    if isinstance(value, (str, os.PathLike)):
      if not os.path.isfile(value):
        raise FileNotFoundError(
            f"decode: field {key!r} names image file {value!r}, which is missing.")
      with open(value, "rb") as f:
        value = f.read()
    if isinstance(value, bytes):
      try:
        with Image.open(io.BytesIO(value)) as img:
          return np.asarray(img.convert("RGB"))
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"decode: field {key!r} holds bytes that are not an image: {e}") from e
    return _frame(value, key, "decode")
  return lambda example: _map_frames(example, "decode", frame)


_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


@register
def resize_pad(size: int, method: str = "bilinear"):
  """Resizes the longer side to `size` (aspect ratio kept) and pads to square with the mean colour.

  The paper pads with the mean; we use the frame's own per-channel mean, so the padding carries no
  signal after any value_range.
  """
  if method not in _RESAMPLE:
    raise ValueError(f"resize_pad: method={method!r}; expected one of {sorted(_RESAMPLE)}.")

  def frame(value, key):
    value = _frame(value, key, "resize_pad")
    h, w = value.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(value).resize((nw, nh), _RESAMPLE[method]))
    out = np.empty([size, size, 3], np.uint8)
    if nh < size or nw < size:  # The mean only where there is padding (a third of the op's time).
      out[...] = np.round(value.reshape(-1, 3).mean(0)).astype(np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out

  def op(example):
    example = _map_frames(example, "resize_pad", frame)
    for key in ("images", "video"):  # A document without images still gets [0, S, S, 3].
      if key in example and len(example[key]) == 0:
        example[key] = np.zeros([0, size, size, 3], np.uint8)
    return example
  return op


@register
def resize_crop(size: int, method: str = "bicubic"):
  """Resizes the shorter side to `size` and takes the centre square: CLIP's eval transform
  (torchvision Resize + CenterCrop on PIL images, as OpenCLIP and OpenFlamingo preprocess)."""
  if method not in _RESAMPLE:
    raise ValueError(f"resize_crop: method={method!r}; expected one of {sorted(_RESAMPLE)}.")

  def frame(value, key):
    value = _frame(value, key, "resize_crop")
    h, w = value.shape[:2]
    scale = size / min(h, w)
    # torchvision's Resize(int) rounds the longer side down (int()), never past the crop.
    nh, nw = (size, int(w * scale)) if h <= w else (int(h * scale), size)
    resized = np.asarray(Image.fromarray(value).resize((nw, nh), _RESAMPLE[method]))
    # torchvision's CenterCrop offsets: int(round((resized - size) / 2)).
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    return resized[top:top + size, left:left + size]
  return lambda example: _map_frames(example, "resize_crop", frame)


@register
def normalize(mean: tuple[float, float, float], std: tuple[float, float, float]):
  """uint8 [0, 255] -> float32 (x / 255 - mean) / std per channel: the pixel statistics a vision
  backbone was trained with (e.g. OpenAI CLIP's; `models/vit.py` holds each backbone's)."""
  mean_, std_ = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  if mean_.shape != (3,) or std_.shape != (3,) or (std_ <= 0).any():
    raise ValueError(f"normalize: mean={mean} and std={std} must be 3 numbers each, std > 0.")

  def frame(value, key):
    x = _frame(value, key, "normalize").astype(np.float32) / 255.0
    return ((x - mean_) / std_).astype(np.float32)
  return lambda example: _map_frames(example, "normalize", frame)


@register
def flip(p: float = 0.5):
  """Flips all media of an example left-right together, with probability p (training only)."""
  def op(example):
    if example_rng(example, "flip").random() >= p:
      return example
    return _map_frames(example, "flip", lambda f, key: np.ascontiguousarray(
        _frame(f, key, "flip", dtype=None)[:, ::-1]))
  return op


@register
def color_jitter(brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2):
  """Scales brightness, contrast and saturation by factors in [1 - x, 1 + x] (training only)."""
  def op(example):
    amounts = np.array([brightness, contrast, saturation])
    b, c, s = example_rng(example, "color_jitter").uniform(1 - amounts, 1 + amounts)

    def frame(value, key):
      x = _frame(value, key, "color_jitter").astype(np.float32) * b
      x = (x - x.mean()) * c + x.mean()
      gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
      x = (x - gray[..., None]) * s + gray[..., None]
      return np.clip(np.round(x), 0, 255).astype(np.uint8)
    return _map_frames(example, "color_jitter", frame)
  return op


@register
def value_range(vmin: float = -1.0, vmax: float = 1.0, in_min: float = 0.0, in_max: float = 255.0):
  """Maps uint8 [in_min, in_max] linearly to float32 [vmin, vmax]."""
  def frame(value, key):
    x = (_frame(value, key, "value_range").astype(np.float32) - in_min) / (in_max - in_min)
    return (vmin + x * (vmax - vmin)).astype(np.float32)
  return lambda example: _map_frames(example, "value_range", frame)


@register
def sample_frames(num_frames: int, fps: float = 1.0, random_start: bool = False):
  """Takes `num_frames` frames of 'video' at `fps`, given the video's own rate in example['fps'].

  Starts at frame 0 (or at a random offset with random_start, training only); a short video
  repeats its last frame.
  """
  def op(example):
    video = np.asarray(get_field(example, "video"))
    if video.ndim != 4:
      raise ValueError(
          f"sample_frames: field 'video' has shape {video.shape}; expected [T, H, W, 3].")
    source_fps = float(np.asarray(get_field(example, "fps")))
    if source_fps <= 0:
      raise ValueError(f"sample_frames: field 'fps' is {source_fps}; expected a positive rate.")
    step = source_fps / fps
    span = int(np.ceil(step * (num_frames - 1))) + 1
    start = 0
    if random_start and len(video) > span:
      start = int(example_rng(example, "sample_frames").integers(len(video) - span + 1))
    index = np.minimum(start + np.round(step * np.arange(num_frames)).astype(int), len(video) - 1)
    return {**example, "video": video[index]}
  return op


# Text.


@register
def choose(key: str = "captions/text", to: str = "caption"):
  """Picks one of several strings (COCO's 5 captions) at random; the first without '_rng'."""
  def op(example):
    values = get_field(example, key)
    if len(values) == 0:
      raise ValueError(f"choose: field {key!r} is empty.")
    i = int(example["_rng"].integers(len(values))) if "_rng" in example else 0
    return {**example, to: values[i]}
  return op


@register
def prepend_space(p: float = 0.5, key: str = "caption"):
  """Prepends one space to the text in `key` with probability p: the paper's augmentation of the
  pairs' captions (a substantial gain there). It changes the ids only with a tokenizer that keeps a
  leading space (byte-level BPE; a SentencePiece model that removes extra whitespace drops it)."""
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"prepend_space: p={p}; expected a probability in [0, 1].")
  if "/" in key:
    raise ValueError(f"prepend_space: key={key!r}; expected a top-level field (choose(...) "
                     "copies a nested caption to one).")

  def op(example):
    text = _text(get_field(example, key), key)
    if example_rng(example, "prepend_space").random() < p:
      text = " " + text
    return {**example, key: text}
  return op


def _media(value: Any, key: str, rank: int) -> np.ndarray:
  """A media field as an array of `rank` (3: image, 4: images or video), or a clear error."""
  if isinstance(value, (list, tuple)) and len({np.shape(v) for v in value}) > 1:
    raise ValueError(f"field {key!r} holds frames of different sizes; resize them (resize_pad).")
  value = np.asarray(value)
  if value.dtype == object or value.ndim != rank or value.shape[-1] != 3:
    raise ValueError(f"field {key!r} has shape {value.shape} (dtype {value.dtype}); expected rank "
                     f"{rank} ending in 3 channels, all frames of one size (use resize_pad).")
  return value


@register
def tokenize_pair(tokenizer: tokenizer_lib.Tokenizer, max_len: int = 32, key: str = "caption"):
  """An image-text pair -> `<BOS><image>caption<EOC><EOS>` batch fields with N = T = 1."""
  def op(example):
    image = _media(get_field(example, "image"), "image", rank=3)
    return interleave.build_sequence(["", _text(get_field(example, key), key)], image[None, None],
                                     tokenizer, max_len=max_len, max_media=1)
  return op


@register
def tokenize_video(tokenizer: tokenizer_lib.Tokenizer, max_len: int = 32, key: str = "caption"):
  """A video-text pair -> batch fields with one media item of T frames."""
  def op(example):
    video = _media(get_field(example, "video"), "video", rank=4)
    return interleave.build_sequence(["", _text(get_field(example, key), key)], video[None],
                                     tokenizer, max_len=max_len, max_media=1)
  return op


@register
def tokenize_document(tokenizer: tokenizer_lib.Tokenizer, max_len: int = 256, max_media: int = 5,
                      p_next: float = 0.0, random_window: bool = False):
  """An interleaved document ('images' [N, H, W, 3], 'texts' N + 1 strings) -> batch fields.

  M3W training (paper App. A.3) sets random_window (a random max_len-token window of a longer
  document, else its first tokens) and p_next (per document, the probability that tokens attend
  to the image after their chunk); both draw from the example's rng (`interleave`).
  """
  def op(example):
    images = _media(get_field(example, "images"), "images", rank=4)
    texts = [_text(t, "texts") for t in get_field(example, "texts")]
    random = p_next > 0 or random_window
    return interleave.build_sequence(
        texts, images[:, None], tokenizer, max_len=max_len, max_media=max_media, p_next=p_next,
        random_window=random_window,
        rng=example_rng(example, "tokenize_document") if random else None)
  return op


# Inference.

# The deterministic image ops of a pp spec: a resize, then the pixel values' mapping.
_RESIZE_OPS = ("resize_pad", "resize_crop")
_IMAGE_OPS = _RESIZE_OPS + ("value_range", "normalize")


def image_spec(config) -> str:
  """A run's image preprocessing for inference (predict, eval): decode, then the resize and
  pixel-value ops of its eval or input pp (the first spec that resizes), else the paper's at
  config.image_size. Training's random ops (flip, jitter) are left out."""
  specs = [config.get("eval", {}).get("pp", "")]
  specs += [d.get("pp", "") for d in config.get("input", {}).get("datasets", {}).values()]
  for spec in specs:
    ops = [op.strip() for op in spec.split("|") if op.split("(")[0].strip() in _IMAGE_OPS]
    if any(op.split("(")[0] in _RESIZE_OPS for op in ops):
      return "|".join(["decode", *ops])
  return f"decode|resize_pad({config.image_size})|value_range(-1, 1)"


# Parsing.


def _parse(spec: str) -> tuple[str, list[Any], dict[str, Any]]:
  """'name(1, a=2)' -> ('name', [1], {'a': 2}); arguments are Python literals."""
  try:
    call = ast.parse(spec.strip(), mode="eval").body
    if isinstance(call, ast.Name):
      return call.id, [], {}
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
      raise ValueError("not a call")
    return (call.func.id, [ast.literal_eval(a) for a in call.args],
            {k.arg: ast.literal_eval(k.value) for k in call.keywords})
  except (SyntaxError, ValueError) as e:
    raise ValueError(f"pp op {spec!r} is not of the form name or name(literal args...).") from e


def _factory(name: str, spec: str):
  if name not in _OPS:
    raise ValueError(f"unknown pp op {name!r} in {spec!r}; known ops: {sorted(_OPS)} (ops defined "
                     "elsewhere are registered by importing their module: config.modules).")
  return _OPS[name]


def output_shapes(spec: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{field: (shape, dtype)} of one example that `spec` makes, read from its arguments alone.

  For ahead-of-time compilation (no data, no tokenizer): H = W from resize_pad, T from
  sample_frames (else 1), N and L from the tokenising op.
  """
  args = {}
  for op_spec in spec.split("|"):
    name, op_args, kwargs = _parse(op_spec)
    params = inspect.signature(_factory(name, spec)).parameters
    bound = inspect.signature(_OPS[name]).bind(
        *(([None] if "tokenizer" in params else []) + op_args), **kwargs)
    bound.apply_defaults()
    args[name] = bound.arguments
  tokenize = [n for n in ("tokenize_pair", "tokenize_video", "tokenize_document") if n in args]
  if "resize_pad" not in args or len(tokenize) != 1:
    raise ValueError(f"pp {spec!r}: fixed shapes need resize_pad and one tokenize_* op.")
  size, length = args["resize_pad"]["size"], args[tokenize[0]]["max_len"]
  media = args.get("tokenize_document", {}).get("max_media", 1)
  frames = args.get("sample_frames", {}).get("num_frames", 1)
  image_dtype = np.float32 if {"value_range", "normalize"} & set(args) else np.uint8
  return {"images": ((media, frames, size, size, 3), np.dtype(image_dtype)),
          "tokens": ((length,), np.dtype(np.int32)), "media_idx": ((length,), np.dtype(np.int32)),
          "loss_mask": ((length,), np.dtype(np.float32)), "media_mask": ((media,), np.dtype(bool))}


def build(spec: str,
          tokenizer: tokenizer_lib.Tokenizer | None = None) -> Callable[[Example], Example]:
  """Parses "op1|op2(...)|..." into one function over an example dict.

  Fields starting with '_' (the mixture's '_rng') are dropped from the result.
  """
  ops = []
  for op_spec in spec.split("|"):
    name, args, kwargs = _parse(op_spec)
    factory = _factory(name, spec)
    if "tokenizer" in inspect.signature(factory).parameters:
      if tokenizer is None:
        raise ValueError(f"pp op {name!r} needs a tokenizer; pass one to pp.build.")
      kwargs["tokenizer"] = tokenizer
    try:
      ops.append(factory(*args, **kwargs))
    except TypeError as e:
      raise ValueError(f"pp op {op_spec.strip()!r}: {e}") from e

  def fn(example: Example) -> Example:
    for op in ops:
      example = op(example)
    return {k: v for k, v in example.items() if not k.startswith("_")}
  return fn
