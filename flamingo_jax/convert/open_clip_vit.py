"""Converts OpenCLIP ViT checkpoints into `models.vit.VisionTransformer` parameters, and back.

Reads `model.visual.state_dict()` or a whole CLIP state dict (its `visual.*` keys; the text tower
is ignored). torch's fused `attn.in_proj_*` splits into our query/key/value, and the resblocks
stack into the scanned `blocks`.

Usage:
  cfg, params = load("open_clip:ViT-L-14:open_clip_model.safetensors")
  tokens = VisionTransformer(cfg).apply({"params": params}, images)  # [B, 256, 1024]
"""
import json
import re
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax import paths
from flamingo_jax.convert import state_dict
from flamingo_jax.convert import strict
from flamingo_jax.models import vit

_PREFIX = "visual."  # A whole CLIP model's state dict holds the ViT under it.
_BLOCK_KEY = re.compile(r"^transformer\.resblocks\.(\d+)\.")
SPEC_FORM = ("open_clip:MODEL:PATH, MODEL a name or an OpenCLIP model-config .json (e.g. "
             "open_clip:ViT-L-14:open_clip_model.safetensors)")

# (array, heads) -> array, for one direction of one tensor.
_Fn = Callable[[np.ndarray, int], np.ndarray]
_same: _Fn = lambda a, h: a
_linear: _Fn = lambda a, h: a.T  # [out, in] <-> [in, out]

# Tables: (our path, open_clip key, theirs -> ours, ours -> theirs). Several rows with one key
# split it into equal parts along its first axis, in row order (torch's fused q/k/v).
_TOP = (
    ("patch_embed/kernel", "conv1.weight",
     lambda a, h: a.transpose(2, 3, 1, 0), lambda a, h: a.transpose(3, 2, 0, 1)),
    ("class_embed", "class_embedding", _same, _same),
    ("pos_embed", "positional_embedding", _same, _same),
    ("ln_pre/scale", "ln_pre.weight", _same, _same),
    ("ln_pre/bias", "ln_pre.bias", _same, _same),
    ("ln_post/scale", "ln_post.weight", _same, _same),
    ("ln_post/bias", "ln_post.bias", _same, _same),
    ("proj", "proj", _same, _same),
)
_BLOCK = (  # Within `blocks/` and `transformer.resblocks.{i}.`.
    ("ln_1/scale", "ln_1.weight", _same, _same),
    ("ln_1/bias", "ln_1.bias", _same, _same),
    *((f"{n}/kernel", "attn.in_proj_weight",
       lambda w, h: w.T.reshape(w.shape[1], h, -1),  # [H·D, C] -> [C, H, D]
       lambda w, h: w.reshape(w.shape[0], -1).T) for n in ("query", "key", "value")),
    *((f"{n}/bias", "attn.in_proj_bias", lambda b, h: b.reshape(h, -1),
       lambda b, h: b.reshape(-1)) for n in ("query", "key", "value")),
    ("out/kernel", "attn.out_proj.weight",
     lambda w, h: w.T.reshape(h, -1, w.shape[0]),  # [C, H·D] -> [H, D, C]
     lambda w, h: w.reshape(-1, w.shape[-1]).T),
    ("out/bias", "attn.out_proj.bias", _same, _same),
    ("ln_2/scale", "ln_2.weight", _same, _same),
    ("ln_2/bias", "ln_2.bias", _same, _same),
    ("c_fc/kernel", "mlp.c_fc.weight", _linear, _linear),
    ("c_fc/bias", "mlp.c_fc.bias", _same, _same),
    ("c_proj/kernel", "mlp.c_proj.weight", _linear, _linear),
    ("c_proj/bias", "mlp.c_proj.bias", _same, _same),
)


class _Row(NamedTuple):
  path: str  # Ours, '/'-joined.
  keys: list[str]  # open_clip's: one, or one per layer for `blocks/` (stacked on axis 0).
  part: int  # Which of `parts` equal slices of the key's first axis.
  parts: int
  to_ours: _Fn
  to_theirs: _Fn


def _rows(cfg: vit.ViTConfig) -> list[_Row]:
  rows = []
  for table, prefix in ((_TOP, ""), (_BLOCK, "blocks/")):
    for path, key, to_ours, to_theirs in table:
      if path.startswith("ln_pre/") and not cfg.ln_pre:
        continue
      sharing = [p for p, k, _, _ in table if k == key]
      keys = ([f"transformer.resblocks.{i}.{key}" for i in range(cfg.layers)] if prefix
              else [key])
      rows.append(_Row(prefix + path, keys, sharing.index(path), len(sharing), to_ours,
                       to_theirs))
  return rows


def abstract_params(cfg: vit.ViTConfig) -> dict:
  """The ViT's parameter shapes (nested ShapeDtypeStructs); nothing is allocated."""
  images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
  model = vit.VisionTransformer(cfg)
  return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), images))["params"]


def convert(state: Mapping[str, Any], cfg: vit.ViTConfig) -> dict:
  """`cfg`'s VisionTransformer params (nested numpy) from `model.visual.state_dict()` or a whole
  CLIP state dict. One ValueError lists every parameter not filled, key not used, shape mismatch.
  """
  if any(k.startswith(_PREFIX) for k in state):
    state = {k.removeprefix(_PREFIX): v for k, v in state.items() if k.startswith(_PREFIX)}
  spec = {}
  for row in _rows(cfg):
    def fn(*arrays, row=row):
      out = [row.to_ours(np.split(a, row.parts)[row.part], cfg.heads) for a in arrays]
      return np.stack(out) if row.path.startswith("blocks/") else out[0]
    spec[row.path] = (row.keys, fn)
  depth = {int(m.group(1)) + 1 for k in state if (m := _BLOCK_KEY.match(k))}
  problems = ([f"the checkpoint has {max(depth)} resblocks; the config has layers={cfg.layers}"]
              if depth and max(depth) != cfg.layers else [])
  return strict.fill(spec, state, abstract_params(cfg), "OpenCLIP ViT checkpoint",
                     problems=problems)


def export(cfg: vit.ViTConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of `convert`: {key of `model.visual.state_dict()`: array}, exact."""
  flat = strict.flat_params(nn.meta.unbox(params), abstract_params(cfg), "ViTConfig")
  pieces: dict[str, list[np.ndarray]] = {}
  for row in _rows(cfg):
    value = np.asarray(flat[row.path])
    for i, key in enumerate(row.keys):
      layer = value[i] if row.path.startswith("blocks/") else value
      pieces.setdefault(key, []).append(row.to_theirs(layer, cfg.heads))
  return {k: np.ascontiguousarray(np.concatenate(p) if len(p) > 1 else p[0])
          for k, p in pieces.items()}


# vision_cfg keys of an OpenCLIP model-config JSON: ours, or the value that changes nothing.
_JSON_FIELDS = {"image_size": "image_size", "layers": "layers", "width": "width",
                "patch_size": "patch_size", "mlp_ratio": "mlp_ratio"}
_JSON_NEUTRAL = {"head_width": None, "no_ln_pre": None, "patch_dropout": 0.0,
                 "ls_init_value": None, "attentional_pool": False, "pool_type": "tok",
                 "final_ln_after_pool": False, "output_tokens": False, "timm_model_name": None}


def model_config(model: str) -> vit.ViTConfig:
  """The ViTConfig of an OpenCLIP model name (`vit.NAMES`) or of an OpenCLIP model-config JSON
  file (as in open_clip/model_configs/, for custom or fine-tuned architectures). Every vision_cfg
  key that changes the forward pass is honoured or refused by name."""
  if not model.endswith(".json"):
    return vit.vit_config(model)
  with open(model) as f:
    spec = json.load(f)
  vision = dict(spec.get("vision_cfg") or {})
  if not vision:
    raise ValueError(f"{model}: no 'vision_cfg'; expected an OpenCLIP model-config JSON.")
  unknown = sorted(k for k in vision if k not in _JSON_FIELDS and k not in _JSON_NEUTRAL)
  changing = sorted(k for k, v in vision.items() if k in _JSON_NEUTRAL and k not in
                    ("head_width", "no_ln_pre", "patch_dropout") and v != _JSON_NEUTRAL[k])
  if unknown or changing:
    raise ValueError(f"{model}: vision_cfg {unknown + changing} not supported by models/vit.py "
                     f"(supported: {sorted(_JSON_FIELDS)}, head_width, no_ln_pre).")
  fields = {ours: vision[k] for k, ours in _JSON_FIELDS.items() if k in vision}
  fields["heads"] = vision.get("width", 768) // vision.get("head_width", 64)
  fields["ln_pre"] = not vision.get("no_ln_pre", False)
  fields["activation"] = "quick_gelu" if spec.get("quick_gelu") else "gelu"
  fields["output_dim"] = spec.get("embed_dim", 512)
  pre = spec.get("preprocess_cfg") or {}
  fields |= {k: tuple(pre[k]) for k in ("mean", "std") if k in pre}
  return vit.vit_config(None, **fields)


def load(spec: str) -> tuple[vit.ViTConfig, dict]:
  """(config, params) from "open_clip:MODEL:PATH": MODEL an OpenCLIP model name or model-config
  JSON (`model_config`), PATH a .safetensors file (or directory) or a torch .pt/.bin state dict
  of a CLIP model or of its visual tower."""
  kind, _, rest = spec.partition(":")
  name, _, path = rest.partition(":")
  if kind != "open_clip" or not name or not path:
    raise ValueError(f"spec: expected {SPEC_FORM}, got {spec!r}.")
  cfg = model_config(paths.resolve(name) if name.endswith(".json") else name)
  return cfg, convert(state_dict.read(paths.resolve(path)), cfg)
