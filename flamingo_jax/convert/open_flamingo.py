"""Converts OpenFlamingo checkpoints into `models.flamingo.Flamingo` parameters.

OpenFlamingo is a frozen CLIP ViT → PerceiverResampler → a frozen HF causal LM with a
GatedCrossAttentionBlock before decoder layer i iff (i + 1) % n == 0 (our placement
'open_flamingo'). The frozen LM comes from its HF directory (`convert/hf.py`); the checkpoint gives
the resampler, the xattn blocks and the trained, resized token embeddings whose last rows are the
new tokens (`<|endofchunk|>`, `<image>` and, for tokenizers without one, `<PAD>`). The ViT is not
converted: run the model on precomputed CLIP patch tokens (OpenFlamingo's `vision_encoder(x)[1]`).

A resampler built with `max_num_frames` / `max_num_media` (video) converts its `frame_embs` and
`media_time_embs` too. Head counts are arguments, never defaults (see `convert`).

`export` goes back: an OpenFlamingo `Flamingo.state_dict()` (the frozen LM and ViT from their own
state dicts) that `load_state_dict(strict=True)` takes, by the same tables inverted;
`save_checkpoint` writes it as OpenFlamingo's training script does.

Usage:
  model, params = load("checkpoint.pt", "path/to/hf_lm", resampler_heads=8, xattn_heads=8,
                       num_new_tokens=3)
  logits = model.apply({"params": params}, None, tokens, media_idx, features=features)
  save_checkpoint(export(model, params, vision_state, lm_state=safetensors_io.load(
      "path/to/hf_lm")), "out.pt")
with features [B, N, T, S, C] and media_idx = cumsum(tokens == <image>) (OpenFlamingo's
`media_locations.cumsum(-1)`).
"""
import dataclasses
import re
from typing import Callable, Mapping, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.convert import hf
from flamingo_jax.convert import model_dir
from flamingo_jax.convert import open_clip_vit
from flamingo_jax.convert import safetensors_io
from flamingo_jax.convert import state_dict
from flamingo_jax.convert import strict
from flamingo_jax.models import flamingo
from flamingo_jax.models import lm as lm_lib
from flamingo_jax.models import nfnet
from flamingo_jax.models import perceiver
from flamingo_jax.models import xattn as xattn_lib

# The CLIP ViT is not converted (the model takes precomputed features); `load` skips it by default.
VISION_KEYS = r"^vision_encoder\."
# Head counts are never guessed: a state dict holds only heads·dim_head, and a wrong split converts
# without error but computes something else. OpenFlamingo's released code hard-codes 8 for both.
_HEADS_HINT = "OpenFlamingo's released code hard-codes 8 heads in its resampler and xattn blocks"

_XATTN_KEY = re.compile(
    r"^lang_encoder\.(?:gated_cross_attn_layers\.(\d+)|.+\.(\d+)\.gated_cross_attn_layer)\.(.+)$")
_DECODER_KEY = re.compile(r"^lang_encoder\.(.+\.)(\d+)\.decoder_layer\.(.+)$")
_OLD_DECODER_KEY = re.compile(r"^lang_encoder\.old_decoder_blocks\.(\d+)\.(.+)$")
_INPUT_EMBEDS = ("model.embed_tokens.weight", "transformer.wte.weight", "gpt_neox.embed_in.weight",
                 "model.decoder.embed_tokens.weight")
_OUTPUT_EMBEDS = ("lm_head.weight", "embed_out.weight")
_NO_LM_HEAD = ("The LM is untied and the checkpoint lacks its output embedding, so the output rows "
               "of the new tokens are unknown (OpenFlamingo's trainable-only checkpoints drop a "
               "frozen lm_head; its new rows were random when OpenFlamingo loaded it).")

# torch -> ours for one layer's tensor; h is the head count.
_Fn = Callable[[np.ndarray, int], np.ndarray]
_same: _Fn = lambda a, h: a
_linear: _Fn = lambda w, h: w.T  # [out, in] -> [in, out]
_heads_in: _Fn = lambda w, h: w.T.reshape(w.shape[1], h, -1)  # [H·Dh, D] -> [D, H, Dh]
_heads_out: _Fn = lambda w, h: w.T.reshape(h, -1, w.shape[0])  # [D, H·Dh] -> [H, Dh, D]
_k: _Fn = lambda w, h: _heads_in(np.split(w, 2)[0], h)  # to_kv rows are concat(k, v).
_v: _Fn = lambda w, h: _heads_in(np.split(w, 2)[1], h)
_scalar: _Fn = lambda a, h: a.reshape(())
_ident = lambda a: a
_media = lambda a: a.reshape(a.shape[0], -1)  # media_time_embs [M, 1, D] -> [M, D]

# Their inverses (ours -> torch; the head split is in our shapes, so no h). A torch tensor split
# into several of ours (to_kv) is the concatenation of their inverses.
_INVERSE = {_same: _ident, _linear: lambda w: w.T, _scalar: lambda a: a.reshape(1),
            **dict.fromkeys((_heads_in, _k, _v), lambda w: w.reshape(w.shape[0], -1).T),
            _heads_out: lambda w: w.reshape(-1, w.shape[-1]).T}


def _attn(p: str, **norms: str) -> dict:
  """Table of OpenFlamingo's (Masked)CrossAttention at `p`; norms: {their LayerNorm: ours}."""
  return {**{f"{p}{theirs}.{t}": [(f"attn/{ours}/{o}", _same)] for theirs, ours in norms.items()
             for t, o in (("weight", "scale"), ("bias", "bias"))},
          f"{p}to_q.weight": [("attn/query/kernel", _heads_in)],
          f"{p}to_kv.weight": [("attn/key/kernel", _k), ("attn/value/kernel", _v)],
          f"{p}to_out.weight": [("attn/out/kernel", _heads_out)]}


def _ffw(p: str) -> dict:
  """Table of OpenFlamingo's FeedForward (LayerNorm, Linear, GELU, Linear) at `p`."""
  return {f"{p}0.weight": [("ffw/norm/scale", _same)], f"{p}0.bias": [("ffw/norm/bias", _same)],
          f"{p}1.weight": [("ffw/wi/kernel", _linear)],
          f"{p}3.weight": [("ffw/wo/kernel", _linear)]}


# Tables: OpenFlamingo suffix within a layer -> [(our path within the layer, conversion)].
_RESAMPLER_LAYER = {**_attn("0.", norm_media="norm_media", norm_latents="norm_latents"),
                    **_ffw("1.")}
_XATTN_BLOCK = {**_attn("attn.", norm="norm_q"), **_ffw("ff."),
                "attn_gate": [("attn_gate", _scalar)], "ff_gate": [("ffw_gate", _scalar)]}


def _ffw_mult(w: np.ndarray, what: str) -> int:
  hidden, dim = w.shape
  if hidden % dim:
    raise ValueError(f"{what}: FFW width {hidden} is not a multiple of {dim}.")
  return hidden // dim


def _head_dim(w: np.ndarray, heads: int, arg: str) -> int:
  """heads·dim_head of a query weight [H·Dh, D] split by the head count passed as `arg`."""
  if isinstance(heads, bool) or not isinstance(heads, (int, np.integer)) or heads <= 0:
    raise ValueError(f"{arg}={heads!r}: expected a positive int, the checkpoint's head count "
                     f"({_HEADS_HINT}).")
  if w.shape[0] % heads:
    raise ValueError(f"{arg}={heads} does not divide the query width {w.shape[0]}: pass the "
                     f"checkpoint's head count ({_HEADS_HINT}).")
  return w.shape[0] // heads


def _canonical(state):
  """(tensors, origins, conflicts): xattn tensors renamed `xattn.{layer}.{suffix}`, others as is.

  A full state dict holds each xattn block twice (`gated_cross_attn_layers.i` and
  `<layers>.i.gated_cross_attn_layer`); both copies must agree. origins: name -> checkpoint keys.
  """
  tensors, origins, conflicts = {}, {}, []
  for key, value in state.items():
    m = _XATTN_KEY.match(key)
    name = f"xattn.{m.group(1) or m.group(2)}.{m.group(3)}" if m else key
    if name in tensors and not np.array_equal(tensors[name], value):
      conflicts.append(f"{key} differs from its copy {origins[name][0]}")
    tensors[name] = value
    origins.setdefault(name, []).append(key)
  return tensors, origins, conflicts


def _xattn_layers(tensors, num_layers: int) -> tuple[list[int], int]:
  """(LM layers with an xattn block, cross_attn_every_n_layers), checked against the placement."""
  at = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("xattn.")})
  if not at:
    raise ValueError("The checkpoint has no gated_cross_attn_layer tensors: not OpenFlamingo.")
  n = at[0] + 1
  expected = [i for i in range(num_layers) if (i + 1) % n == 0]
  if at != expected:
    raise ValueError(f"xattn blocks at LM layers {at} do not follow OpenFlamingo's placement "
                     f"((i + 1) % n == 0 over {num_layers} layers; n={n} gives {expected}).")
  return at, n


def _first_key(tensors, names: Sequence[str]) -> str | None:
  return next((f"lang_encoder.{k}" for k in names if f"lang_encoder.{k}" in tensors), None)


def _require(tensors, key: str, what: str) -> np.ndarray:
  if key not in tensors:
    raise ValueError(f"The checkpoint has no {key!r} ({what}); is it an OpenFlamingo checkpoint?")
  return tensors[key]


def _layer_spec(table, prefixes: Sequence[str], heads: int, path: str, stacked: bool) -> dict:
  """{our path: (checkpoint names, fn(*arrays))} for the layers at `prefixes` (stacked or one)."""
  spec = {}
  for suffix, targets in table.items():
    keys = [f"{p}{suffix}" for p in prefixes]
    for sub, fn in targets:
      if stacked:
        spec[path + sub] = (keys, lambda *a, fn=fn: np.stack([fn(x, heads) for x in a]))
      else:
        spec[path + sub] = (keys, lambda a, fn=fn: fn(a, heads))
  return spec


def resampler_config(tensors, *, resampler_heads: int, prefix: str = "perceiver.") -> dict:
  """`PerceiverResampler` kwargs of an OpenFlamingo resampler, sizes from shapes."""
  latents = _require(tensors, f"{prefix}latents", "resampler latents")
  depth = 1 + max(int(k[len(prefix):].split(".")[1]) for k in tensors
                  if k.startswith(f"{prefix}layers."))
  frames, media = tensors.get(f"{prefix}frame_embs"), tensors.get(f"{prefix}media_time_embs")
  return dict(
      dim=latents.shape[1], num_latents=latents.shape[0], num_layers=depth,
      num_heads=resampler_heads,
      head_dim=_head_dim(_require(tensors, f"{prefix}layers.0.0.to_q.weight", "resampler query"),
                         resampler_heads, "resampler_heads"),
      ffw_mult=_ffw_mult(_require(tensors, f"{prefix}layers.0.1.1.weight", "resampler FFW"),
                         "perceiver"),
      max_frames=1 if frames is None else frames.shape[0],
      max_media=0 if media is None else media.shape[0], activation="gelu")


def _resampler_spec(tensors, prefix: str, kwargs: dict) -> dict:
  spec = {"latents": ([f"{prefix}latents"], _ident),
          "norm/scale": ([f"{prefix}norm.weight"], _ident),
          "norm/bias": ([f"{prefix}norm.bias"], _ident)}
  if f"{prefix}frame_embs" in tensors:
    spec["time_embed"] = ([f"{prefix}frame_embs"], _ident)
  else:  # OpenFlamingo's default adds no frame embedding.
    spec["time_embed"] = ([], lambda: np.zeros((1, kwargs["dim"]), np.float32))
  if kwargs["max_media"]:
    spec["media_embed"] = ([f"{prefix}media_time_embs"], _media)
  spec.update(_layer_spec(
      _RESAMPLER_LAYER, [f"{prefix}layers.{i}." for i in range(kwargs["num_layers"])],
      kwargs["num_heads"], "layers/", stacked=True))
  return spec


def convert_resampler(state: Mapping[str, np.ndarray], *, resampler_heads: int
                      ) -> tuple[dict, dict]:
  """(PerceiverResampler kwargs, params) from an OpenFlamingo `PerceiverResampler.state_dict()`.

  resampler_heads: its `heads` (the state dict does not say; OpenFlamingo's code uses 8).
  """
  state = {k: np.asarray(v) for k, v in state.items()}
  kwargs = resampler_config(state, resampler_heads=resampler_heads, prefix="")
  module = perceiver.PerceiverResampler(**kwargs)
  features = jax.ShapeDtypeStruct((1, 1, 1, 1, kwargs["dim"]), jnp.float32)
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), features))["params"]
  return kwargs, strict.fill(
      _resampler_spec(state, "", kwargs), state, shapes,
      "OpenFlamingo PerceiverResampler state dict")


def convert_xattn_block(state: Mapping[str, np.ndarray], *, xattn_heads: int) -> dict:
  """`GatedXattnDense` params (norm_kv=False, activation='gelu', `xattn_heads` heads) from an
  OpenFlamingo `GatedCrossAttentionBlock.state_dict()` (whose code uses 8 heads)."""
  state = {k: np.asarray(v) for k, v in state.items()}
  q, kv = _require(state, "attn.to_q.weight", "query"), _require(state, "attn.to_kv.weight", "kv")
  module = xattn_lib.GatedXattnDense(xattn_lib.XattnConfig(
      num_heads=xattn_heads, head_dim=_head_dim(q, xattn_heads, "xattn_heads"), norm_kv=False,
      ffw_mult=_ffw_mult(_require(state, "ff.1.weight", "FFW"), "xattn"), activation="gelu"),
      num_latents=1)
  args = (jax.ShapeDtypeStruct((1, 1, q.shape[1]), jnp.float32),
          jax.ShapeDtypeStruct((1, 1, 1, kv.shape[1]), jnp.float32),
          jax.ShapeDtypeStruct((1, 1), jnp.int32))
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args))["params"]
  return strict.fill(_layer_spec(_XATTN_BLOCK, [""], xattn_heads, "", stacked=False), state, shapes,
                     "OpenFlamingo GatedCrossAttentionBlock state dict")


def _configs(tensors, lm_cfg, num_new_tokens, only_attend_immediate, resampler_heads,
             xattn_heads):
  """(resampler kwargs, LMConfig with xattn and new tokens), sizes inferred from shapes."""
  embed_key = _first_key(tensors, _INPUT_EMBEDS)
  if embed_key is None:
    raise ValueError("The checkpoint has no LM input embedding; expected one of " +
                     ", ".join(f"lang_encoder.{k}" for k in _INPUT_EMBEDS) + ".")
  rows = tensors[embed_key].shape[0]
  num_new = rows - lm_cfg.vocab_size if num_new_tokens is None else num_new_tokens
  if not 0 < num_new < rows:
    raise ValueError(f"{embed_key} has {rows} rows and the HF LM's vocab_size is "
                     f"{lm_cfg.vocab_size}: pass num_new_tokens (OpenFlamingo adds 2 tokens, 3 "
                     "with <PAD>).")
  resampler = resampler_config(tensors, resampler_heads=resampler_heads)
  at, every = _xattn_layers(tensors, lm_cfg.num_layers)
  xattn = xattn_lib.XattnConfig(
      every=every, placement="open_flamingo", num_heads=xattn_heads, activation="gelu",
      head_dim=_head_dim(_require(tensors, f"xattn.{at[0]}.attn.to_q.weight", "xattn query"),
                         xattn_heads, "xattn_heads"),
      ffw_mult=_ffw_mult(_require(tensors, f"xattn.{at[0]}.ff.1.weight", "xattn FFW"), "xattn"),
      only_attend_immediate=only_attend_immediate, norm_kv=False)
  cfg = dataclasses.replace(lm_cfg, vocab_size=rows - num_new, num_new_tokens=num_new, xattn=xattn,
                            num_latents=resampler["num_latents"])
  return resampler, cfg


def _spec(tensors, resampler, cfg) -> dict:
  """{our parameter path: (checkpoint names, fn(*arrays))} for the parts the checkpoint gives."""
  vocab = cfg.vocab_size
  embed_key, out_key = _first_key(tensors, _INPUT_EMBEDS), _first_key(tensors, _OUTPUT_EMBEDS)
  spec = {f"resampler/{k}": v for k, v in _resampler_spec(tensors, "perceiver.", resampler).items()}
  spec["lm/token_embed"] = ([embed_key], lambda a: a[:vocab])
  spec["lm/new_token_embed"] = ([embed_key], lambda a: a[vocab:])
  _, groups, tail = lm_lib.xattn_layout(cfg.num_layers, cfg.xattn.every, "open_flamingo")
  blocks = [f"xattn.{i}." for i in lm_lib.xattn_layer_indices(cfg)]
  spec.update(_layer_spec(_XATTN_BLOCK, blocks[:groups], cfg.xattn.num_heads,
                          "lm/groups/xattn/", stacked=True))
  if tail:
    spec.update(_layer_spec(_XATTN_BLOCK, blocks[-1:], cfg.xattn.num_heads, "lm/tail/xattn/",
                            stacked=False))
  if not cfg.tied_embeddings:  # Without an output embedding, new_lm_head is reported not filled.
    if out_key:
      spec["lm/lm_head/kernel"] = ([out_key], lambda a: a[:vocab].T)
    spec["lm/new_lm_head/kernel"] = ([out_key or f"lang_encoder.{_OUTPUT_EMBEDS[0]}"],
                                     lambda a: a[vocab:].T)
  return spec


def _frozen_lm(tensors, cfg, lm_params, hf_state):
  """(spec of the `lm` params HF gives, checkpoint names used, problems).

  The frozen LM comes from HF; copies of its weights in a full state dict must equal HF's.
  """
  tree = {k: v for k, v in lm_lib.to_layout(lm_params, cfg).items() if k != "token_embed"}
  if "lm_head" in tree:  # Untied, if the checkpoint lacks it: HF's rows of the old tokens.
    tree["lm_head"] = {"kernel": np.asarray(tree["lm_head"]["kernel"])[:, :cfg.vocab_size]}
  spec = {f"lm/{k}": ([], lambda v=v: np.asarray(v))
          for k, v in traverse_util.flatten_dict(tree, sep="/").items()}

  used, problems = set(), []
  embed_key, out_key = _first_key(tensors, _INPUT_EMBEDS), _first_key(tensors, _OUTPUT_EMBEDS)
  if cfg.tied_embeddings and out_key:  # The same table under a second name.
    used.add(out_key)
    if not np.array_equal(tensors[out_key], tensors[embed_key]):
      problems.append(f"{out_key} differs from {embed_key} but the LM ties them")
  layers_attr = next((m.group(1) for k in tensors if (m := _DECODER_KEY.match(k))), None)
  for key, value in tensors.items():
    if not key.startswith("lang_encoder.") or key in (embed_key, out_key):
      continue
    hf_key = key.removeprefix("lang_encoder.")
    if m := _DECODER_KEY.match(key):
      hf_key = f"{m.group(1)}{m.group(2)}.{m.group(3)}"
    elif (m := _OLD_DECODER_KEY.match(key)) and layers_attr:
      hf_key = f"{layers_attr}{m.group(1)}.{m.group(2)}"
    if hf_state is not None and hf_key in hf_state:
      used.add(key)
      if not np.allclose(value, hf_state[hf_key], rtol=1e-2, atol=1e-6):
        problems.append(f"{key} (a frozen LM weight) differs from the HF LM's {hf_key}")
  return spec, used, problems


def convert(state: Mapping[str, np.ndarray], lm_cfg: lm_lib.LMConfig, lm_params: dict, *,
            resampler_heads: int, xattn_heads: int,
            hf_state: Mapping[str, np.ndarray] | None = None, num_new_tokens: int | None = None,
            only_attend_immediate: bool = True, skip: Sequence[str] = (VISION_KEYS,),
            ) -> tuple[flamingo.Flamingo, dict]:
  """(model, params) for an OpenFlamingo state dict on top of a plain HF-converted LM.

  lm_cfg, lm_params: the frozen LM as `hf.load_hf_lm(path, num_new_tokens=0)` gives it.
  resampler_heads, xattn_heads: the head counts, which a state dict does not hold (it gives only
    heads·dim_head, and any divisor converts but computes something else); OpenFlamingo's released
    code hard-codes 8 for both.
  hf_state: that LM's raw HF tensors; needed only when the checkpoint also holds the frozen LM
    weights (a full `model.state_dict()`), which must then equal them.
  num_new_tokens: the new tokens at the end of the checkpoint's resized embedding; default: its
    rows - lm_cfg.vocab_size. Pass it when the HF table was larger than the tokenizer (MPT: 50432
    rows, 50277 tokens). Our vocab_size becomes rows - num_new_tokens, so ids match OpenFlamingo's.
  Sizes (depths, widths, latents, FFW multipliers, every-n, frame and media embeddings) come from
  shapes; head counts and `only_attend_immediate` (OpenFlamingo's `only_attend_immediate_media`)
  from the arguments.
  Raises one ValueError listing every model parameter not filled, every checkpoint key not used
  (unless it matches a regex in `skip`), every shape mismatch and inconsistency.
  """
  if lm_cfg.xattn is not None or lm_cfg.num_new_tokens:
    raise ValueError("lm_cfg must be the plain HF LM (xattn=None, num_new_tokens=0).")
  state = {k: np.asarray(v) for k, v in state.items()}
  tensors, origins, problems = _canonical(state)
  resampler, cfg = _configs(tensors, lm_cfg, num_new_tokens, only_attend_immediate,
                            resampler_heads, xattn_heads)
  model = flamingo.Flamingo(vision=nfnet.NFNetConfig(),
                            connector=perceiver.connector_config(resampler), lm=cfg,
                            dtype=cfg.dtype, param_dtype=cfg.param_dtype)
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  features = jax.ShapeDtypeStruct((1, 1, 1, 1, resampler["dim"]), jnp.float32)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), None, ids, ids,
                                        features=features))["params"]
  spec, used, inconsistent = _frozen_lm(tensors, cfg, lm_params, hf_state)
  # Converted from the first copy of each tensor; the others were checked equal to it.
  spec |= {name: ([origins.get(k, [k])[0] for k in keys], fn)
           for name, (keys, fn) in _spec(tensors, resampler, cfg).items()}
  used |= {k for keys in origins.values() for k in keys[1:]}
  hints = {"new_lm_head": _NO_LM_HEAD}
  if hf_state is None:
    hints[f"{_DECODER_KEY.pattern}|{_OLD_DECODER_KEY.pattern}"] = (
        "Frozen LM weights in a checkpoint are checked against the HF LM: pass hf_state "
        "(load() does).")
  return model, strict.fill(spec, state, shapes, "OpenFlamingo checkpoint", ignore=skip,
                            used=used, problems=problems + inconsistent, hints=hints)


def load(checkpoint: str, lm_path: str, *, resampler_heads: int, xattn_heads: int, **kwargs
         ) -> tuple[flamingo.Flamingo, dict]:
  """`convert` on a checkpoint file (.pt or safetensors) and an HF LM directory, whose weights are
  read as float32 (as OpenFlamingo evaluates), whatever dtype they are stored in."""
  return _convert_on_hf(state_dict.read(checkpoint), lm_path, resampler_heads=resampler_heads,
                        xattn_heads=xattn_heads, **kwargs)


def _convert_on_hf(state, lm_path: str, *, resampler_heads: int, xattn_heads: int, **kwargs):
  lm_cfg, lm_params = hf.load_hf_lm(lm_path, num_new_tokens=0, dtype="float32")
  full = any(_DECODER_KEY.match(k) or _OLD_DECODER_KEY.match(k) for k in state)
  return convert(state, lm_cfg, lm_params, hf_state=safetensors_io.load(lm_path) if full else None,
                 resampler_heads=resampler_heads, xattn_heads=xattn_heads, **kwargs)


# OpenFlamingo's factory adds these to the LM's tokenizer, in this order (<PAD> if it has none).
_NEW_TOKENS = ("<|endofchunk|>", "<image>", "<PAD>")


def write_model_dir(out: str, checkpoint: str, lm_path: str, vision: str, *,
                    resampler_heads: int, xattn_heads: int, **kwargs) -> flamingo.Flamingo:
  """Converts an OpenFlamingo release into a model directory (`model_dir.py`) that predict, eval
  and fine-tuning (configs/converted.py) run from: its checkpoint, the HF LM directory it was
  trained on (weights and tokenizer) and its vision encoder, `open_clip:MODEL_NAME:PATH`.

  A full state dict also holds the ViT (`vision_encoder.*`): it must equal the one given.
  kwargs: `convert`'s (num_new_tokens, only_attend_immediate).
  """
  state = state_dict.read(checkpoint)
  model, params = _convert_on_hf(state, lm_path, resampler_heads=resampler_heads,
                                 xattn_heads=xattn_heads, **kwargs)
  vit_cfg, vit_params = open_clip_vit.load(vision)
  if vit_cfg.width != model.connector.dim:
    raise ValueError(f"--vision {vision!r} gives {vit_cfg.width}-wide features; the checkpoint's "
                     f"resampler takes {model.connector.dim} (another OpenCLIP model?).")
  stored = {k[len("vision_encoder."):]: v for k, v in state.items()
            if k.startswith("vision_encoder.")}
  if stored:
    given = open_clip_vit.export(vit_cfg, vit_params)
    differ = sorted(k for k in stored.keys() | given.keys()
                    if k not in stored or k not in given or not np.array_equal(stored[k], given[k]))
    if differ:
      raise ValueError(f"{checkpoint} holds a vision encoder that differs from --vision "
                       f"{vision!r} at {differ[:5]} ({len(differ)} tensors).")
  new = _NEW_TOKENS[:model.lm.num_new_tokens]
  if len(new) < 2 or model.lm.num_new_tokens > len(_NEW_TOKENS):
    raise ValueError(f"The checkpoint adds {model.lm.num_new_tokens} tokens; OpenFlamingo adds "
                     f"{_NEW_TOKENS[:2]} and <PAD> when the tokenizer has none (2 or 3).")
  roles = {"image": "<image>", "eoc": "<|endofchunk|>"} | ({"pad": "<PAD>"} if len(new) == 3
                                                            else {})
  model = dataclasses.replace(model, vision=vit_cfg)
  model_dir.write(out, model, {**params, "vision": vit_params},
                  tokenizer_dir=lm_path,
                  new_tokens={"new_tokens": list(new), **roles},
                  source={"checkpoint": checkpoint, "lm": lm_path, "vision": vision})
  return model


# An HF key's first dotted integer is its decoder layer (model.layers.3., transformer.h.3., ...).
_HF_LAYER_KEY = re.compile(r"^(\D*?\.)(\d+)\.(.+)$")
# A tied LLaMA or GPT-2 still has an lm_head module, so its state dict holds the shared table twice
# (HF's safetensors drop the copy); MPT (transformer.blocks.) multiplies by wte and has none.
_TIED_HEAD_EMBEDS = ("model.embed_tokens.weight", "transformer.wte.weight")
_NO_HEAD_LAYERS = "transformer.blocks."


def _export_layers(table, prefixes: Sequence[str], path: str, stacked: bool) -> dict:
  """{torch key: (our paths, fn(*arrays))}: `_layer_spec` inverted, for the layers at prefixes."""
  def fn(targets, j):
    def inverse(*arrays):
      parts = [_INVERSE[f](a[j] if stacked else a) for (_, f), a in zip(targets, arrays)]
      return parts[0] if len(parts) == 1 else np.concatenate(parts)
    return inverse
  return {f"{p}{suffix}": ([path + sub for sub, _ in targets], fn(targets, j))
          for j, p in enumerate(prefixes) for suffix, targets in table.items()}


def _check_exportable(model: flamingo.Flamingo):
  """A ValueError naming each config field whose computation OpenFlamingo's modules lack."""
  if model.lm.xattn is None:
    raise ValueError("model.lm.xattn is None: an LM without xattn blocks is not a Flamingo.")
  c, x = model.connector, model.lm.xattn
  wrong = [f"{name}={value!r} (OpenFlamingo's is {want!r})" for name, value, want in (
      ("connector.kind", c.kind, "perceiver"), ("connector.activation", c.activation, "gelu"),
      ("lm.xattn.placement", x.placement, "open_flamingo"),
      ("lm.xattn.activation", x.activation, "gelu"), ("lm.xattn.norm_kv", x.norm_kv, False))
      if value != want]
  if wrong:
    raise ValueError("The model cannot be exported to OpenFlamingo: " + "; ".join(wrong) + ".")


def _lm_layers(lm_state: Mapping[str, np.ndarray], num_layers: int) -> str:
  """The HF key prefix of the decoder layers (`model.layers.`), checked against num_layers."""
  prefixes = {m.group(1) for k in lm_state if (m := _HF_LAYER_KEY.match(k))}
  if len(prefixes) != 1:
    raise ValueError(f"lm_state: expected the decoder layers under one prefix, found "
                     f"{sorted(prefixes) or 'none'}; pass the HF state dict the model came from.")
  prefix = prefixes.pop()
  count = len({k[len(prefix):].split(".")[0] for k in lm_state if k.startswith(prefix)})
  if count != num_layers:
    raise ValueError(f"lm_state has {count} decoder layers under {prefix!r}; the model has "
                     f"lm.num_layers={num_layers}.")
  return prefix


def export(model: flamingo.Flamingo, params: Mapping, vision_state: Mapping | None = None, *,
           lm_state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """OpenFlamingo's `Flamingo.state_dict()` of a model made by `convert` (or trained like one).

  Inverts the conversion tables: resampler, xattn blocks (under both names OpenFlamingo's state
  dict holds them), the resized token embeddings and lm head from `params`; the frozen LM from
  lm_state, its raw HF tensors (`safetensors_io.load(hf_dir)` of the directory it was converted
  from; params' copies of them are not read, the LM being frozen), under OpenFlamingo's
  `decoder_layer` / `old_decoder_blocks` names; vision_state (the open_clip visual tower's
  state_dict) under `vision_encoder.`. Without vision_state, load it with strict=False.
  A trained frame embedding is exported as `perceiver.frame_embs` (all zeros: none, as
  OpenFlamingo's `Flamingo` builds it); a media embedding as `perceiver.media_time_embs`.
  The state dict has no head counts: the torch model must be built with the model's
  (`connector.num_heads`, `lm.xattn.num_heads`; OpenFlamingo's `Flamingo` hard-codes 8).
  Raises a ValueError naming any model field or parameter OpenFlamingo has no place for.
  """
  _check_exportable(model)
  cfg, flat = model.lm, traverse_util.flatten_dict(params, sep="/")
  layers = _lm_layers(lm_state, cfg.num_layers)
  embed_key = next((k for k in _INPUT_EMBEDS if k in lm_state), None)
  if embed_key is None:
    raise ValueError("lm_state has no input embedding; expected one of "
                     f"{', '.join(_INPUT_EMBEDS)}.")
  out_keys = [k for k in _OUTPUT_EMBEDS if k in lm_state]
  if (cfg.tied_embeddings and not out_keys and embed_key in _TIED_HEAD_EMBEDS
      and layers != _NO_HEAD_LAYERS):
    out_keys = ["lm_head.weight"]

  embeds = lambda a, b: np.concatenate([a, b])
  spec = {f"lang_encoder.{embed_key}": (["lm/token_embed", "lm/new_token_embed"], embeds)}
  for key in out_keys:
    spec[f"lang_encoder.{key}"] = spec[f"lang_encoder.{embed_key}"] if cfg.tied_embeddings else (
        ["lm/lm_head/kernel", "lm/new_lm_head/kernel"], lambda a, b: np.concatenate([a, b], 1).T)
  spec["perceiver.latents"] = (["resampler/latents"], _ident)
  spec["perceiver.norm.weight"] = (["resampler/norm/scale"], _ident)
  spec["perceiver.norm.bias"] = (["resampler/norm/bias"], _ident)
  if np.any(np.asarray(flat.get("resampler/time_embed", 0))):
    spec["perceiver.frame_embs"] = (["resampler/time_embed"], _ident)
  if model.connector.max_media:
    spec["perceiver.media_time_embs"] = (["resampler/media_embed"], lambda a: a[:, None])
  spec |= _export_layers(_RESAMPLER_LAYER, [f"perceiver.layers.{i}."
                                            for i in range(model.connector.num_layers)],
                         "resampler/layers/", stacked=True)
  _, groups, tail = lm_lib.xattn_layout(cfg.num_layers, cfg.xattn.every, "open_flamingo")
  at = lm_lib.xattn_layer_indices(cfg)
  for names in ([f"lang_encoder.gated_cross_attn_layers.{i}." for i in at],
                [f"lang_encoder.{layers}{i}.gated_cross_attn_layer." for i in at]):
    spec |= _export_layers(_XATTN_BLOCK, names[:groups], "lm/groups/xattn/", stacked=True)
    if tail:
      spec |= _export_layers(_XATTN_BLOCK, names[-1:], "lm/tail/xattn/", stacked=False)

  ours = {path for paths, _ in spec.values() for path in paths}
  frozen = re.compile(r"^lm/(?!token_embed$|new_token_embed$|lm_head/|new_lm_head/|"
                      r"(groups|tail)/xattn/)")
  unexported = sorted(p for p in flat if p not in ours and not frozen.match(p)
                      and not (p == "resampler/time_embed" and "perceiver.frame_embs" not in spec))
  missing = sorted(p for p in ours if p not in flat)
  if unexported or missing:
    raise ValueError("params do not match an OpenFlamingo model: " + "; ".join(
        [f"no OpenFlamingo tensor for {', '.join(unexported)}"] * bool(unexported) +
        [f"missing {', '.join(missing)}"] * bool(missing)) + ".")
  state = {key: np.asarray(fn(*[np.asarray(flat[p], np.float32) for p in paths]))
           for key, (paths, fn) in spec.items()}

  layer_key = re.compile(rf"^{re.escape(layers)}(\d+)\.(.+)$")
  for key, value in lm_state.items():
    if key == embed_key or key in out_keys:
      continue
    if m := layer_key.match(key):
      state[f"lang_encoder.{layers}{m.group(1)}.decoder_layer.{m.group(2)}"] = value
      state[f"lang_encoder.old_decoder_blocks.{m.group(1)}.{m.group(2)}"] = value
    else:
      state[f"lang_encoder.{key}"] = value
  state |= {f"vision_encoder.{k}": np.asarray(v) for k, v in (vision_state or {}).items()}
  return state


def save_checkpoint(state: Mapping[str, np.ndarray], path: str):
  """Writes `state` as OpenFlamingo's training script does: torch.save({'model_state_dict': ...}),
  tensors only, so `torch.load(weights_only=True)` (and `state_dict.read`) read it."""
  import torch  # pylint: disable=g-import-not-at-top  (a peer, needed only for .pt files)
  torch.save({"model_state_dict": {k: torch.tensor(np.ascontiguousarray(v))
                                   for k, v in state.items()}}, path)
