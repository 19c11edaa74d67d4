"""Image and video files to uint8 RGB arrays, local or gs:// (through etils.epath, as paths.py).

Images decode as pp's `decode` op does (PIL, `convert("RGB")`), so an image read here and one
decoded by a pp pipeline are the same pixels.

Videos decode with PyAV. Flamingo feeds video at 1 frame per second (Alayrac et al., 2022, §3.1):
`read_video` keeps, for each tick k/fps (k = 0, 1, ...) of the clip's presentation time measured
from its first frame, the first frame shown at or after that tick (a frame is kept once: ticks it
already covers are skipped, so an `fps` above the video's own gives every frame). A clip with more
than `max_frames` such frames keeps `max_frames` of them evenly spaced over the clip, first and last
included, so the same file always gives the same frames.
"""
from collections.abc import Iterator
import io
import os

import av
from etils import epath
import numpy as np
from PIL import Image

from flamingo_jax import paths  # noqa: F401  (pins epath's gs:// to gcsfs before first use)

# Frames whose time is this close before a tick count as on it (rounding of stream time bases).
_TICK_TOLERANCE_S = 1e-3


def _read_bytes(path, what: str) -> bytes:
  """The file's bytes; a missing file is an error naming it, not a decoder's message."""
  file = epath.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"{what} file {os.fspath(path)!r} is missing.")
  return file.read_bytes()


def read_image(path) -> np.ndarray:
  """The image file at `path` as uint8 [H, W, 3] RGB."""
  data = _read_bytes(path, "image")
  try:
    with Image.open(io.BytesIO(data)) as img:
      return np.asarray(img.convert("RGB"))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"image file {os.fspath(path)!r} is not a readable image: {e}") from e


def _frames(data: bytes) -> Iterator[tuple[float, av.VideoFrame]]:
  """(presentation time in seconds, frame) of the first video stream, as decoded (display order),
  streamed so that only the kept frames are held in memory."""
  with av.open(io.BytesIO(data)) as container:
    if not container.streams.video:
      raise ValueError("it has no video stream")
    for frame in container.decode(container.streams.video[0]):
      if frame.time is not None:
        yield frame.time, frame


def _at_ticks(frames, fps: float) -> list[np.ndarray]:
  """The first frame at or after each tick k/fps, from the first frame's time."""
  out, start, tick = [], None, 0
  for time, frame in frames:
    start = time if start is None else start
    if time - start >= tick / fps - _TICK_TOLERANCE_S:
      out.append(frame.to_ndarray(format="rgb24"))
      tick = int((time - start + _TICK_TOLERANCE_S) * fps) + 1
  return out


def _evenly(frames: list[np.ndarray], max_frames: int) -> list[np.ndarray]:
  """`max_frames` of `frames` evenly spaced, first and last kept (all of them if not more)."""
  if len(frames) <= max_frames:
    return frames
  picks = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
  return [frames[i] for i in picks]


def read_video(path, fps: float = 1.0, max_frames: int = 8) -> np.ndarray:
  """The video file at `path` as uint8 [T, H, W, 3] RGB: frames at `fps` by presentation time,
  at most `max_frames` of them (see the module docstring)."""
  if not fps > 0:
    raise ValueError(f"read_video: fps must be > 0, got {fps!r}.")
  if not (isinstance(max_frames, int) and max_frames >= 1):
    raise ValueError(f"read_video: max_frames must be an int >= 1, got {max_frames!r}.")
  data = _read_bytes(path, "video")
  try:
    frames = _at_ticks(_frames(data), fps)
  except (av.FFmpegError, ValueError) as e:
    raise ValueError(f"video file {os.fspath(path)!r} could not be decoded: {e}") from e
  if not frames:
    raise ValueError(f"video file {os.fspath(path)!r} has no decodable frames.")
  return np.stack(_evenly(frames, max_frames))
