"""Media as stored: images keep their encoded bytes, re-encoded only when they must be.

TFDS decodes stored images with PIL without converting them (`Image.decode_example_np`), so a
stored image must be an RGB JPEG or PNG: others (grey, RGBA, CMYK, WebP, GIF...) are re-encoded as
PNG, and an image larger than `max_size` on its longer side is resized (bicubic) and re-encoded in
its own format. Videos are decoded to frames at `fps` (`data/media.read_video`); `max_size`
resizes their frames too.
"""
import io
import tempfile

import av
import numpy as np
from PIL import Image

from flamingo_jax.data import media
from flamingo_jax.data.prepare.report import Skip

JPEG_QUALITY = 95


def _resized(img: Image.Image, max_size: int) -> Image.Image:
  scale = max_size / max(img.size)
  if not max_size or scale >= 1:
    return img
  size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
  return img.resize(size, Image.BICUBIC)


def image(data: bytes, name: str, max_size: int = 0) -> bytes:
  """Encoded RGB JPEG or PNG bytes of the image `data` (from file `name`), or Skip."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      fmt = img.format
      if img.mode == 'RGB' and fmt in ('JPEG', 'PNG') and (
          not max_size or max(img.size) <= max_size):
        return data
      out = _resized(img.convert('RGB'), max_size)
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds)
    raise Skip('unreadable_image', name, str(e)) from e
  buffer = io.BytesIO()
  if fmt == 'JPEG':
    out.save(buffer, format='JPEG', quality=JPEG_QUALITY)
  else:
    out.save(buffer, format='PNG')
  return buffer.getvalue()


def _last_frame_s(path: str) -> float | None:
  """When the last frame shows: the container's duration less one frame (None if unknown)."""
  with av.open(path) as container:
    rate = container.streams.video[0].average_rate
    if container.duration is None or not rate:
      return None
    return container.duration / av.time_base - 1 / float(rate)


def video(data: bytes, name: str, *, fps: float, max_frames: int, min_frames: int,
          max_size: int = 0) -> tuple[np.ndarray, float]:
  """(uint8 [T, H, W, 3] frames, their rate) of the video `data`, or Skip.

  The rate is `fps` unless the clip had more than `max_frames` ticks and read_video spaced its
  frames evenly over the whole clip: then it is the rate those frames are at, from the container's
  duration (`fps` where the container does not tell it).
  """
  with tempfile.NamedTemporaryFile() as f:  # read_video reads a file (PyAV seeks).
    f.write(data)
    f.flush()
    try:
      frames = media.read_video(f.name, fps=fps, max_frames=max_frames)
      last = _last_frame_s(f.name) if len(frames) == max_frames else None
    except (ValueError, av.FFmpegError) as e:
      raise Skip('unreadable_video', name, str(e)) from e
  if len(frames) < min_frames:
    raise Skip('too_short_video', name, f'{len(frames)} frames at {fps} fps < {min_frames}')
  rate = fps
  ticks = int(last * fps + 1e-3) + 1 if last else 0
  if ticks > len(frames) > 1:
    rate = fps * (len(frames) - 1) / (ticks - 1)
  if max_size and max(frames.shape[1:3]) > max_size:
    frames = np.stack([np.asarray(_resized(Image.fromarray(f), max_size)) for f in frames])
  return frames, rate
