"""Embedded demo datasets: TFDS builders that draw their data locally, seeded, with no download.

Importing this package registers `shapes_pairs`, `shapes_interleaved`, `shapes_video` and
`shapes_fewshot` (configs `captioning`, `vqa`, `names`), e.g.
`tfds.builder('shapes_pairs', data_dir=d).download_and_prepare()`. Each module's docstring gives its
features.
"""
from flamingo_jax.demo.datasets import scenes
from flamingo_jax.demo.datasets import shapes_fewshot
from flamingo_jax.demo.datasets import shapes_interleaved
from flamingo_jax.demo.datasets import shapes_pairs
from flamingo_jax.demo.datasets import shapes_video

__all__ = ['shapes_fewshot', 'shapes_interleaved', 'shapes_pairs', 'shapes_video', 'text_corpus']


def text_corpus() -> list[str]:
  """Every sentence the builders' templates make: trains a tokenizer without reading the data."""
  return [*scenes.corpus(), *shapes_interleaved.corpus(), *shapes_video.corpus(),
          *shapes_fewshot.corpus()]
