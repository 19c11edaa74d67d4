"""Converts timm `dm_nfnet_f*` checkpoints (safetensors) into `models.nfnet.NFNet` parameters.

Only the DeepMind-compatible `dm_nfnet_f*` family is supported. timm's `nfnet_f*` has the same
parameter shapes but different maths (symmetric instead of "SAME" padding, no SkipInit gain, gamma
folded into the convs so its final activation lacks it); `nfnet_l*`/`eca_nfnet_*` also differ in
widths and attention. Loading those fails with the list of mismatches.

Usage: `params = load("dm_nfnet_f6.safetensors", NFNet(nfnet_config("F6")), skip=(HEAD_KEYS,))`,
then `model.apply({"params": params}, images)`; `export(cfg, params)` is the way back, a state dict
that timm's `dm_nfnet_*` loads (e.g. to fine-tune or evaluate the encoder in PyTorch).
"""
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.convert import safetensors_io
from flamingo_jax.convert import strict
from flamingo_jax.models import nfnet

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
# Layouts, both ways: (regex of our path, ours <- timm, timm <- ours); the first match applies,
# none: the same array. A timm tensor of the wrong shape raises ValueError or keeps a wrong shape,
# which `strict.fill` reports.
_LAYOUTS = (
    # Squeeze-excite: timm's 1x1 convs [O, I, 1, 1] <-> Dense [I, O].
    (r"/se/fc\d/kernel$", lambda w: w.reshape(w.shape[:2]).T, lambda k: k.T[:, :, None, None]),
    (r"^head/kernel$", lambda w: w.T, lambda k: k.T),  # Linear [O, I] <-> Dense [I, O].
    (r"kernel$", lambda w: w.transpose(2, 3, 1, 0),  # Conv [O, I/g, kh, kw] <-> [kh, kw, I/g, O].
     lambda k: k.transpose(3, 2, 0, 1)),
    (r"/gain$", lambda g: g.reshape(-1), lambda g: g.reshape(-1, 1, 1, 1)),  # [O, 1, 1, 1] <-> [O].
)
_NOT_DM = ("The checkpoint has no skipinit_gain: it is not a timm dm_nfnet_f* model (timm's "
           "nfnet_*/eca_nfnet_* differ in padding and activations); use dm_nfnet_f* weights.")


def timm_key(path: Sequence[str]) -> str:
  """timm state-dict key of our parameter: ('stem_conv1', 'kernel') -> 'stem.conv1.weight'."""
  name = "/".join(path)
  for pattern, replacement in _RENAMES:
    name = re.sub(pattern, replacement, name)
  return name.replace("/", ".")


def _layout(path: str) -> tuple[Callable[[np.ndarray], np.ndarray], ...]:
  """(ours <- timm, timm <- ours) for our parameter `path` ('/'-joined)."""
  for pattern, to_ours, to_timm in _LAYOUTS:
    if re.search(pattern, path):
      return to_ours, to_timm
  return (lambda a: a,) * 2


def _abstract_params(module: nn.Module) -> dict:
  """`module`'s parameter shapes (nested ShapeDtypeStructs), from `jax.eval_shape`."""
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  return nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), images))["params"]


def convert(state_dict: Mapping[str, np.ndarray], module: nn.Module,
            skip: Sequence[str] = ()) -> dict:
  """Returns `module`'s params (nested dict of numpy arrays, unboxed) filled from `state_dict`.

  Shapes come from `jax.eval_shape`, so nothing is allocated on devices. Raises one ValueError
  listing every model parameter not filled, every checkpoint key not used (unless it matches a
  regex in `skip`) and every shape mismatch.
  """
  shapes = _abstract_params(module)
  spec = {"/".join(path): (timm_key(path), _layout("/".join(path))[0])
          for path in traverse_util.flatten_dict(shapes)}
  return strict.fill(spec, state_dict, shapes, "timm NFNet checkpoint", ignore=skip,
                     hints={"/skipinit_gain ": _NOT_DM})


def export(cfg: nfnet.NFNetConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of `convert`, exact: {timm `dm_nfnet_*` state-dict key: array} of `NFNet(cfg)`'s
  params, which timm's model (same depths, widths, num_classes) loads with strict=True."""
  flat = strict.flat_params(nn.meta.unbox(params), _abstract_params(nfnet.NFNet(cfg)),
                           "NFNetConfig")
  return {timm_key(p.split("/")): np.array(_layout(p)[1](x), order="C") for p, x in flat.items()}


def load(path: str, module: nn.Module, skip: Sequence[str] = ()) -> dict:
  """`convert` on a safetensors file or directory of shards, read one tensor at a time."""
  return convert(safetensors_io.Checkpoint(path), module, skip)
