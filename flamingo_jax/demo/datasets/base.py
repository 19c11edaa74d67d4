"""What every embedded builder shares: sizes in a BuilderConfig, and seeded train/test generation.

A builder module subclasses `Config` (adding its own fields and checks) and `Builder` (adding
`_features` and `_example`). Example `i` of a split is drawn from its own generator seeded with
`(seed, split, i)`, so the same config gives byte-identical data and train and test never share a
seed. A custom config needs its own `name`: TFDS caches prepared data by name and version.
"""
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from flamingo_jax.demo.datasets import scenes


@dataclasses.dataclass(kw_only=True)
class Config(tfds.core.BuilderConfig):
  """Sizes shared by all builders; `num_train`/`num_test` count rows of the split."""
  num_train: int = 1000
  num_test: int = 100
  image_size: int = 64
  seed: int = 0

  def __post_init__(self):
    scenes.check_image_size(self.image_size)
    for field in ('num_train', 'num_test'):
      if getattr(self, field) < 1:
        raise ValueError(f'{field}={getattr(self, field)}; expected at least 1.')


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Generates both splits locally; subclasses define `_features()` and `_example(rng)`."""
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _features(self) -> dict[str, tfds.features.FeatureConnector]:
    raise NotImplementedError

  def _example(self, rng: np.random.Generator) -> dict:
    raise NotImplementedError

  def _image(self) -> tfds.features.Image:
    size = self.builder_config.image_size
    return tfds.features.Image(shape=(size, size, 3))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__,
        features=tfds.features.FeaturesDict(self._features()))

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is drawn locally; nothing is downloaded.
    cfg = self.builder_config
    return {'train': self._generate_examples(0, cfg.num_train),
            'test': self._generate_examples(1, cfg.num_test)}

  def _generate_examples(self, split: int, num_examples: int):
    for i in range(num_examples):
      yield i, self._example(np.random.default_rng((self.builder_config.seed, split, i)))
