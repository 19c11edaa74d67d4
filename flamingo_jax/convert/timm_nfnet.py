"""Converts timm `dm_nfnet_f*` checkpoints (safetensors) into `models.nfnet.NFNet` parameters.

Only the DeepMind-compatible `dm_nfnet_f*` family is supported. timm's `nfnet_f*` has the same
parameter shapes but different maths (symmetric instead of "SAME" padding, no SkipInit gain, gamma
folded into the convs so its final activation lacks it); `nfnet_l*`/`eca_nfnet_*` also differ in
widths and attention. Loading those fails with the list of mismatches.

Usage: `params = load("dm_nfnet_f6.safetensors", NFNet(nfnet_config("F6")), skip=(HEAD_KEYS,))`,
then `model.apply({"params": params}, images)`.
"""
import functools
import math
import re
from typing import Mapping, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.convert import safetensors_io
from flamingo_jax.convert import strict

# The 1000-class ImageNet head; skip it when loading into a headless encoder (num_classes=0).
HEAD_KEYS = r"^head\.fc\."

# Our parameter path ('/'-joined) -> timm state-dict key, applied in order, then '/' -> '.'.
_RENAMES = (
    (r"^stem_", "stem/"),
    (r"^stages_(\d+)_block_(\d+)/", r"stages/\1/\2/"),
    (r"/downsample/", "/downsample/conv/"),
    (r"/se/", "/attn_last/"),
    (r"^head/", "head/fc/"),
    (r"kernel$", "weight"),
)
_NOT_DM = ("The checkpoint has no skipinit_gain: it is not a timm dm_nfnet_f* model (timm's "
           "nfnet_*/eca_nfnet_* differ in padding and activations); use dm_nfnet_f* weights.")


def timm_key(path: Sequence[str]) -> str:
  """timm state-dict key of our parameter: ('stem_conv1', 'kernel') -> 'stem.conv1.weight'."""
  name = "/".join(path)
  for pattern, replacement in _RENAMES:
    name = re.sub(pattern, replacement, name)
  return name.replace("/", ".")


def _to_flax(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """torch layout -> ours; the caller checks the resulting shape."""
  if len(shape) == 4 and value.ndim == 4:  # conv [O, I/g, kh, kw] -> [kh, kw, I/g, O]
    return value.transpose(2, 3, 1, 0)
  if len(shape) == 2 and value.ndim in (2, 4) and value.shape[2:] in ((), (1, 1)):
    return value.reshape(value.shape[:2]).T  # 1x1 conv (SE) or linear [O, I(, 1, 1)] -> [I, O]
  if value.size == math.prod(shape):  # gains [O, 1, 1, 1] -> [O]; biases, SkipInit scalars
    return value.reshape(shape)
  return value


def convert(state_dict: Mapping[str, np.ndarray], module: nn.Module,
            skip: Sequence[str] = ()) -> dict:
  """Returns `module`'s params (nested dict of numpy arrays, unboxed) filled from `state_dict`.

  Shapes come from `jax.eval_shape`, so nothing is allocated on devices. Raises one ValueError
  listing every model parameter not filled, every checkpoint key not used (unless it matches a
  regex in `skip`) and every shape mismatch.
  """
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), images))["params"]
  spec = {"/".join(path): (timm_key(path), functools.partial(_to_flax, shape=s.shape))
          for path, s in traverse_util.flatten_dict(shapes).items()}
  return strict.fill(spec, state_dict, shapes, "timm NFNet checkpoint", ignore=skip,
                     hints={"/skipinit_gain ": _NOT_DM})


def load(path: str, module: nn.Module, skip: Sequence[str] = ()) -> dict:
  """`convert` on a safetensors file or directory of shards."""
  return convert(safetensors_io.load(path), module, skip)
