"""Frozen vision features, computed once per image and cached, for stage 3 and its evaluation.

The stage-3 NFNet is frozen, so its features of an image never change: `FeatureCache` keeps them
by the bytes of the preprocessed image, under a key that hashes the encoder's config and every
parameter, so a different stage-1 checkpoint (or grid) can never reuse them. The pp op
`visual_features(key)` (last in a stage-3 pp spec) replaces an example's 'images'
[N, T, H, W, 3] by 'features' [N, T, S, C], and the flamingo kind passes them to the model's
`features=` (models/flamingo.py), so training runs no encoder; the `names` task reads the same
cache. Caches are saved as `<dir>/<key>.npz` (run.py: workdir/features) and read back by later
runs (other stage-3 seeds, sweeps, re-runs). configs/demo.py:cache_features turns it on.
"""
import dataclasses
import hashlib
import json
import os
import threading

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.data import pp
from flamingo_jax.models import flamingo
from flamingo_jax.models import nfnet
from flamingo_jax.train import checkpoint as ckpt_lib

_CACHES: dict[str, "FeatureCache"] = {}  # By key: pp ops find theirs by name.
# Every image is encoded in a batch of exactly this many: XLA's CPU convolutions gave bitwise
# different features at batch 1 or 2 than at 8 to 128 (up to 7e-7), so with padding to a power of 2
# an image's features depended on which images missed the cache with it, and stage 3 differed from
# run to run (final loss 1.610 vs 1.600). In the cache key: it is part of what makes a feature.
ENCODE_BATCH = 8


def cache_key(vision_cfg, vision_params) -> str:
  """A hash of the encoder: its config (grid and dtypes included) and every parameter. With the
  per-image key (the preprocessed pixels' bytes), it is all that determines a feature."""
  h = hashlib.sha256(f"encode_batch={ENCODE_BATCH}".encode())
  cfg = dataclasses.asdict(vision_cfg)
  h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(vision_params)[0],
                           key=lambda x: jax.tree_util.keystr(x[0])):
    leaf = np.asarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape}".encode())
    h.update(leaf.tobytes())
  return h.hexdigest()[:16]


class FeatureCache:
  """Features [S, C] of images [H, W, 3] by their bytes, for one frozen encoder."""

  def __init__(self, key: str, vision_cfg, vision_params, directory: str | None = None):
    self.key, self.path = key, directory and os.path.join(directory, f"{key}.npz")
    encoder = nfnet.NFNet(vision_cfg)
    params = nn.unbox(vision_params)

    @jax.jit
    def encode(images):  # [B, H, W, 3] -> [B, S, C]
      grid = encoder.apply({"params": params}, images)
      return grid.reshape(grid.shape[0], -1, grid.shape[-1])

    self._encode, self._lock = encode, threading.Lock()
    self._features: dict[bytes, np.ndarray] | None = None  # Read from self.path on first use.
    self.misses = self.hits = 0
    self._saved = 0

  def _loaded(self) -> dict[bytes, np.ndarray]:
    """The features by image digest, read on first use (under self._lock): a re-run whose stage 3
    is done never reads them (1.5 s for the `:short` demo's 10k images)."""
    if self._features is None:
      self._features = {}
      if self.path and os.path.exists(self.path):
        with np.load(self.path) as f:
          self._features = dict(zip((bytes(d) for d in f["digests"]), f["features"]))
        self._saved = len(self._features)
        logging.info("Feature cache %s: %d images from %s.", self.key, self._saved, self.path)
    return self._features

  def __len__(self):
    with self._lock:
      return len(self._loaded())

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """images [..., H, W, 3] -> features [..., S, C]; encodes only the images not seen before."""
    images = np.ascontiguousarray(images, np.float32)
    flat = images.reshape(-1, *images.shape[-3:])
    digests = [hashlib.blake2b(im.tobytes(), digest_size=16).digest() for im in flat]
    with self._lock:
      known = self._loaded()
      missing = {d: i for i, d in enumerate(digests) if d not in known}
    if missing:
      batch = flat[list(missing.values())]
      pad = np.zeros((-len(batch) % ENCODE_BATCH, *batch.shape[1:]), batch.dtype)
      batch = np.concatenate([batch, pad])
      encoded = np.concatenate([np.asarray(self._encode(chunk)) for chunk in
                                np.split(batch, len(batch) // ENCODE_BATCH)])[:len(missing)]
      with self._lock:
        self._features.update(zip(missing, encoded))
        self.misses += len(missing)
    with self._lock:
      self.hits += len(digests) - len(missing)
      out = np.stack([self._features[d] for d in digests])
    return out.reshape(*images.shape[:-3], *out.shape[1:])

  def save(self):
    """Writes the cache to its path if it grew since it was read."""
    with self._lock:
      if not self.path or self._features is None or len(self._features) == self._saved:
        return
      digests, features = list(self._features), np.stack(list(self._features.values()))
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    tmp = self.path + ".tmp.npz"
    np.savez(tmp, digests=np.array(digests, dtype="S16"), features=features)
    os.replace(tmp, self.path)
    self._saved = len(digests)
    logging.info("Feature cache %s: saved %d images to %s.", self.key, len(digests), self.path)


def load_vision(config):
  """(NFNetConfig, params) of a stage-3 config's frozen encoder: config.model.vision's grid on
  config.vision_init's weights."""
  vision_cfg = flamingo.vision_config(config.model.vision)
  if not isinstance(vision_cfg, nfnet.NFNetConfig):
    raise ValueError("The feature cache serves the demo's NFNet (model.vision.kind='nfnet').")
  size = config.image_size
  abstract = jax.eval_shape(lambda: nn.unbox(nfnet.NFNet(vision_cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))["params"])
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract)
  return vision_cfg, ckpt_lib.load_params(config.vision_init, {"vision": abstract})["vision"]


def get(vision_cfg, vision_params, directory: str | None = None) -> FeatureCache:
  """The cache of this encoder (made once per process, read from `directory` if it has it)."""
  key = cache_key(vision_cfg, vision_params)
  if key not in _CACHES:
    _CACHES[key] = FeatureCache(key, vision_cfg, vision_params, directory)
  return _CACHES[key]


def find(vision_cfg, vision_params) -> FeatureCache | None:
  """The cache this process made for this encoder, if any."""
  return _CACHES.get(cache_key(vision_cfg, vision_params))


@pp.register
def visual_features(key: str):
  """'images' [N, T, H, W, 3] -> 'features' [N, T, S, C] from the cache `key` (`get` made it)."""
  if key not in _CACHES:
    raise ValueError(f"visual_features: no feature cache {key!r} in this process; "
                     "flamingo_jax/demo/features.py:get makes it before the pp runs.")
  cache = _CACHES[key]

  def op(example):
    example = dict(example)
    example["features"] = cache(pp.get_field(example, "images"))
    del example["images"]
    return example
  return op


def with_features(config, key: str):
  """`config` with every stage-3 dataset's pp ending in `visual_features(key)`."""
  for ds in config.input.datasets.values():
    if "visual_features" not in ds.pp:
      ds.pp = f"{ds.pp}|visual_features('{key}')"
  return config
