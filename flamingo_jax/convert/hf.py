"""Converts Hugging Face causal LMs (config.json + safetensors) into `models.lm.LM` parameters.

Families: GPT-2, LLaMA (grouped-query attention included) and its kin Mistral (sliding window),
Qwen2 (q/k/v biases) and Gemma 1 (offset RMSNorm, scaled embeddings, GeGLU), GPT-NeoX and MPT.
GPT-NeoX and MPT are chosen over OPT because OpenFlamingo's released models use them (MPT-1B/7B;
RedPajama-INCITE-3B is a GPT-NeoX); OPT would also need a learned-position offset that
`models/lm.py` does not have. Gemma 2/3 (logit soft-capping, per-layer windows) are refused.
A config.json field that changes the forward pass is either honoured or refused by name.

Only safetensors are read: pickled `.bin`/`.pt` checkpoints can run code when loaded, so they are
refused. Shapes are checked on `jax.eval_shape` of the model first, and one error lists every
checkpoint key not used, every parameter not filled and every shape mismatch (never a silent
partial load: OpenFlamingo issue #210).

Vocabulary: with a `tokenizer.json` beside the weights, `data/tokenizer.py` appends `<image>`,
`<EOC>` (and BOS/EOS/pad where the base lacks them) at ids tokenizer.vocab_size + k. Embedding rows
past the tokenizer's vocabulary (padding, e.g. GPT-NeoX's 50432 rows for 50277 tokens) are dropped,
so those ids land in the trainable `new_token_embed`, whose rows start at the mean base embedding.

Usage: `cfg, params = load_hf_lm("path/to/hf_dir")`; `LM(cfg).apply({"params": params}, tokens)`.
`hf_export.py` writes an LM back in these layouts, inverting the same per-family tables.
"""
import dataclasses
import json
import math
import os
import re
from typing import Callable, Mapping

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax import paths
from flamingo_jax.convert import safetensors_io
from flamingo_jax.convert import strict
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.models import lm as lm_lib
from flamingo_jax.train import checkpoint as checkpoint_lib

# Buffers some checkpoints still carry (causal masks, rotary frequencies): not parameters.
_BUFFERS = re.compile(r"\.(attn|attention)\.(masked_)?bias$|rotary_emb\.inv_freq$")
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "relu": "relu", "silu": "silu", "swish": "silu"}
_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PARAM_DTYPES = ("bfloat16", "float16", "float32")  # What converted params may be stored as.

# A family maps our per-layer paths to sources: (checkpoint key, map), the map's call giving ours
# from the checkpoint's tensor as an [in, out] matrix (kernels), a table (embeddings) or a vector
# (`_fit` then reshapes it). Each map also inverts itself, so one table serves import (this module)
# and export (`hf_export.py`).


@dataclasses.dataclass(frozen=True)
class Map:
  """ours = map(theirs); theirs = map.invert(ours)."""
  read: Callable[[np.ndarray], np.ndarray]
  invert: Callable[[np.ndarray], np.ndarray]

  def __call__(self, a: np.ndarray) -> np.ndarray:
    return self.read(a)


_same = Map(lambda a: a, lambda a: a)
_t = Map(lambda w: w.T, lambda w: w.T)  # torch Linear [out, in] -> [in, out]


@dataclasses.dataclass(frozen=True)
class Part:
  """Part j of n of a fused tensor (q|k|v): split along `axis` of pre(theirs), then post.
  `join` inverts the n parts together."""
  j: int
  n: int = 3
  axis: int = -1
  pre: Map = _same
  post: Map = _same

  def __call__(self, a: np.ndarray) -> np.ndarray:
    return self.post(np.split(self.pre(a), self.n, self.axis)[self.j])

  def join(self, parts: list[np.ndarray]) -> np.ndarray:
    return self.pre.invert(np.concatenate([self.post.invert(p) for p in parts], self.axis))


def _weights(prefix: str, pairs, fn=_t, name: str = "kernel") -> dict:
  """Sources of (ours, theirs) layers: ours/name <- fn(theirs.weight), ours/bias <- theirs.bias."""
  return {f"{ours}/{o}": (f"{prefix}{theirs}.{t}", fn if o == name else _same)
          for ours, theirs in pairs for o, t in ((name, "weight"), ("bias", "bias"))}


def _check(c: dict, family: str, **supported):
  """Raises if config.json sets an option the converter (or LM) does not implement."""
  bad = {k: c[k] for k, v in supported.items() if c.get(k, v) != v}
  if bad:
    raise ValueError(f"{family} config.json sets {bad}; only {supported} is supported.")


def _rope(c: dict, family: str, theta_key: str = "rope_theta") -> dict:
  """The rotary base (and NeoX's rotary fraction) from config.json, in transformers 4.x layout
  (top-level `rope_theta`/`rotary_emb_base`, `rope_scaling`) or 5.x (`rope_parameters`). Scaled
  rotary embeddings (linear, dynamic, yarn, llama3, ...) are refused by name, never ignored."""
  params = dict(c.get("rope_parameters") or {})
  scaling = c.get("rope_scaling")
  if scaling:
    raise ValueError(f"{family} config.json rope_scaling={scaling}: scaled rotary embeddings are "
                     "not supported; only the default rope_type.")
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type != "default":
    raise ValueError(f"{family} config.json rope_parameters.rope_type={rope_type!r}: scaled "
                     f"rotary embeddings are not supported; only 'default' ({params}).")
  theta_new, theta_old = params.get("rope_theta"), c.get(theta_key)
  if theta_new is not None and theta_old is not None and float(theta_new) != float(theta_old):
    raise ValueError(f"{family} config.json sets rope_parameters.rope_theta={theta_new} and "
                     f"{theta_key}={theta_old}; which one the model was trained with is unclear.")
  theta = theta_new if theta_new is not None else theta_old
  out = {"rope_theta": float(theta if theta is not None else 10000.0)}
  if family == "gpt_neox":
    out["rotary_pct"] = float(params.get("partial_rotary_factor",
                                         c.get("rotary_pct", c.get("partial_rotary_factor", 0.25))))
  elif float(params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))) != 1.0:
    raise ValueError(f"{family} config.json sets partial_rotary_factor="
                     f"{params.get('partial_rotary_factor', c.get('partial_rotary_factor'))}; "
                     f"only 1.0 (every dimension rotated) is supported for {family}.")
  return out


def _activation(name: str) -> str:
  if name not in _ACTIVATIONS:
    raise ValueError(f"config.json activation {name!r} is not supported; expected one of "
                     f"{sorted(_ACTIVATIONS)}.")
  return _ACTIVATIONS[name]


def _gpt2(c):
  """GPT-2: Conv1D weights are already [in, out]; q|k|v fused along the output."""
  _check(c, "gpt2", scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)
  d = c["n_embd"]
  cfg = dict(vocab_size=c["vocab_size"], dim=d, num_layers=c["n_layer"], num_heads=c["n_head"],
             mlp_dim=c.get("n_inner") or 4 * d, norm_eps=c.get("layer_norm_epsilon", 1e-5),
             position="learned", max_len=c.get("n_positions", 1024),
             activation=_activation(c.get("activation_function", "gelu_new")), use_bias=True,
             tied_embeddings=c.get("tie_word_embeddings", True))
  top = {"token_embed": "transformer.wte.weight", "pos_embed": "transformer.wpe.weight",
         "norm_final/scale": "transformer.ln_f.weight", "norm_final/bias": "transformer.ln_f.bias",
         "lm_head/kernel": "lm_head.weight"}
  def layer(i):
    p = f"transformer.h.{i}."
    out = _weights(p, (("norm_attn", "ln_1"), ("norm_mlp", "ln_2")), _same, "scale")
    for j, name in enumerate(("query", "key", "value")):
      for o in ("kernel", "bias"):
        out[f"attn/{name}/{o}"] = (p + f"attn.c_attn.{'weight' if o == 'kernel' else o}", Part(j))
    return out | _weights(p, (("attn/out", "attn.c_proj"), ("mlp/wi", "mlp.c_fc"),
                              ("mlp/wo", "mlp.c_proj")), _same)
  return cfg, top, layer


def _llama(c, family: str = "llama", norm=_same, max_len: int = 2048, **overrides):
  """LLaMA and its kin: RMSNorm, rotary (rotate-half, as ours), gated MLP, grouped-query
  attention. The kin pass what differs: `norm` (fn of the RMSNorm weights), the default context
  length of their config class and LMConfig `overrides`."""
  d, h = c["hidden_size"], c["num_attention_heads"]
  cfg = dict(vocab_size=c["vocab_size"], dim=d, num_layers=c["num_hidden_layers"], num_heads=h,
             num_kv_heads=c.get("num_key_value_heads") or h, head_dim=c.get("head_dim") or d // h,
             mlp_dim=c["intermediate_size"], norm="rmsnorm", norm_bias=False,
             norm_eps=c.get("rms_norm_eps", 1e-6), position="rotary", **_rope(c, family),
             max_len=c.get("max_position_embeddings", max_len),
             activation=_activation(c.get("hidden_act", "silu")), gated_mlp=True,
             tied_embeddings=c.get("tie_word_embeddings", False)) | overrides
  top = {"token_embed": "model.embed_tokens.weight", "lm_head/kernel": "lm_head.weight",
         "norm_final/scale": ("model.norm.weight", norm)}
  def layer(i):
    p = f"model.layers.{i}."
    return {"norm_attn/scale": (p + "input_layernorm.weight", norm),
            "norm_mlp/scale": (p + "post_attention_layernorm.weight", norm)} | _weights(
                p, (("attn/query", "self_attn.q_proj"), ("attn/key", "self_attn.k_proj"),
                    ("attn/value", "self_attn.v_proj"), ("attn/out", "self_attn.o_proj"),
                    ("mlp/wi", "mlp.gate_proj"), ("mlp/wi_up", "mlp.up_proj"),
                    ("mlp/wo", "mlp.down_proj")))
  return cfg, top, layer


def _llama_family(c):
  """LLaMA: its biases are on all of attention and MLP or on none (ours: one `use_bias`)."""
  _check(c, "llama", mlp_bias=c.get("attention_bias", False))
  return _llama(c, use_bias=c.get("attention_bias", False))


def _mistral(c):
  """Mistral: LLaMA with a sliding-window mask (config class default 4096; null: none)."""
  return _llama(c, "mistral", max_len=4096 * 32, sliding_window=c.get("sliding_window", 4096))


def _qwen2(c):
  """Qwen2: LLaMA with biases on q/k/v only. Its sliding window applies to the layers that
  `layer_types` (else `max_window_layers`) marks 'sliding_attention', only with use_sliding_window;
  ours is one window for every layer, so a mix of windowed and full layers is refused."""
  window = c.get("sliding_window", 4096) if c.get("use_sliding_window", False) else None
  n = c["num_hidden_layers"]
  types = c.get("layer_types") or [
      "sliding_attention" if window is not None and i >= c.get("max_window_layers", 28)
      else "full_attention" for i in range(n)]
  unknown = set(types) - {"sliding_attention", "full_attention"}
  if unknown or len(types) != n:
    raise ValueError(f"qwen2 config.json layer_types={types}: expected {n} of 'full_attention' "
                     "or 'sliding_attention'.")
  windows = {window if t == "sliding_attention" else None for t in types}
  if len(windows) > 1:
    raise ValueError(
        f"qwen2 config.json use_sliding_window=true with sliding_window={window} on only some "
        f"layers (layer_types={types}; max_window_layers={c.get('max_window_layers', 28)}): a "
        "window on some layers and full attention on others is not supported.")
  return _llama(c, "qwen2", max_len=32768, qkv_bias=True, sliding_window=windows.pop())


_plus_one = Map(lambda w: w.astype(np.float32) + 1, lambda s: s - 1)  # Gemma's norm weights.


def _gemma(c):
  """Gemma (1): RMSNorm by (1 + weight), stored here as the scale (computed in float32; bfloat16
  params round it, so dtype='float32' matches transformers best); embeddings x sqrt(dim); GeGLU;
  head_dim set apart from dim / heads; tied embeddings. transformers 4.57 runs `hidden_act`, but
  config.json says `hidden_activation` overrides it, as in Google's release; it is read first."""
  _check(c, "gemma", attention_bias=False)  # Ours would put biases on the MLP too.
  act = c.get("hidden_activation") or c.get("hidden_act", "gelu_pytorch_tanh")
  return _llama(c, "gemma", norm=_plus_one, max_len=8192,
                head_dim=c.get("head_dim", 256), activation=_activation(act),
                tied_embeddings=c.get("tie_word_embeddings", True), scale_embeddings=True)


def _gpt_neox(c):
  """GPT-NeoX: partial rotary, parallel residual, q|k|v fused per head as [H, 3, Dh] rows."""
  _check(c, "gpt_neox", attention_bias=True)  # Its MLP always has biases.
  d, nh = c["hidden_size"], c["num_attention_heads"]
  cfg = dict(vocab_size=c["vocab_size"], dim=d, num_layers=c["num_hidden_layers"], num_heads=nh,
             mlp_dim=c["intermediate_size"], norm_eps=c.get("layer_norm_eps", 1e-5),
             position="rotary", **_rope(c, "gpt_neox", theta_key="rotary_emb_base"),
             max_len=c.get("max_position_embeddings", 2048),
             activation=_activation(c.get("hidden_act", "gelu")),
             parallel_residual=c.get("use_parallel_residual", True), use_bias=True,
             tied_embeddings=c.get("tie_word_embeddings", False))
  top = {"token_embed": "gpt_neox.embed_in.weight",
         "norm_final/scale": "gpt_neox.final_layer_norm.weight",
         "norm_final/bias": "gpt_neox.final_layer_norm.bias", "lm_head/kernel": "embed_out.weight"}
  heads = Map(lambda w: w.reshape(nh, 3, -1, *w.shape[1:]), lambda a: a.reshape(-1, *a.shape[3:]))
  flat = Map(lambda a: a.reshape(d, *a.shape[3:]).T,
             lambda m: m.T.reshape(nh, 1, -1, *m.shape[:-1]))
  qkv = lambda j: Part(j, axis=1, pre=heads, post=flat)
  def layer(i):
    p = f"gpt_neox.layers.{i}."
    out = _weights(p, (("norm_attn", "input_layernorm"), ("norm_mlp", "post_attention_layernorm")),
                   _same, "scale")
    for j, name in enumerate(("query", "key", "value")):
      out[f"attn/{name}/kernel"] = (p + "attention.query_key_value.weight", qkv(j))
      out[f"attn/{name}/bias"] = (p + "attention.query_key_value.bias", qkv(j))
    return out | _weights(p, (("attn/out", "attention.dense"), ("mlp/wi", "mlp.dense_h_to_4h"),
                              ("mlp/wo", "mlp.dense_4h_to_h")))
  return cfg, top, layer


def _mpt(c):
  """MPT: ALiBi, bias-free LayerNorms and linears, q|k|v fused along the output."""
  _check(c, "mpt", no_bias=True)
  attn = c.get("attn_config") or {}
  _check(attn, "mpt attn_config", clip_qkv=None, qk_ln=False, softmax_scale=None, alibi=True)
  d = c["d_model"]
  cfg = dict(vocab_size=c["vocab_size"], dim=d, num_layers=c["n_layers"], num_heads=c["n_heads"],
             mlp_dim=c.get("expansion_ratio", 4) * d, norm_eps=c.get("layer_norm_epsilon", 1e-5),
             norm_bias=False, position="alibi", alibi_bias_max=attn.get("alibi_bias_max", 8),
             max_len=c.get("max_seq_len", 2048), activation="gelu", use_bias=False,
             tied_embeddings=c.get("tie_word_embeddings", True))
  top = {"token_embed": "transformer.wte.weight", "norm_final/scale": "transformer.norm_f.weight",
         "lm_head/kernel": "lm_head.weight"}
  def layer(i):
    p = f"transformer.blocks.{i}."
    out = {"norm_attn/scale": (p + "norm_1.weight", _same),
           "norm_mlp/scale": (p + "norm_2.weight", _same),
           "attn/out/kernel": (p + "attn.out_proj.weight", _t),
           "mlp/wi/kernel": (p + "ffn.up_proj.weight", _t),
           "mlp/wo/kernel": (p + "ffn.down_proj.weight", _t)}
    for j, name in enumerate(("query", "key", "value")):
      out[f"attn/{name}/kernel"] = (p + "attn.Wqkv.weight", Part(j, axis=0, post=_t))
    return out
  return cfg, top, layer


FAMILIES = {"gpt2": _gpt2, "llama": _llama_family, "mistral": _mistral, "qwen2": _qwen2,
            "gemma": _gemma, "gpt_neox": _gpt_neox, "mpt": _mpt}


def top_spec(top: dict) -> dict:
  """A family's top-level sources with their maps: bare keys are stored as ours, but for the
  untied head (a torch Linear)."""
  return {k: v if isinstance(v, tuple) else (v, _t if k == "lm_head/kernel" else _same)
          for k, v in top.items()}


def map_shape(shape: tuple[int, ...], path: str) -> tuple[int, ...]:
  """The shape a family's map gives for our parameter `path` of `shape`: kernels as [in, out]
  matrices, tables as they are, other parameters as flat vectors."""
  if path.endswith("kernel"):
    n_in = 2 if path.endswith("attn/out/kernel") else 1  # out: [H, Dh, D]; others [D, ...].
    return (math.prod(shape[:n_in]), math.prod(shape[n_in:]))
  return shape if path.endswith("embed") else (math.prod(shape),)


def _fit(value: np.ndarray, shape: tuple[int, ...], path: str) -> np.ndarray:
  """`value` (a kernel as [in, out] matrix, a vector or a table) reshaped to `shape` if it fits."""
  return value.reshape(shape) if value.shape == map_shape(shape, path) else value


def _stored_dtype(state: Mapping[str, np.ndarray]) -> str:
  """The floating dtype of the checkpoint's parameters (buffers aside), from the headers of a
  `safetensors_io.Checkpoint`; float32 if there is none (`strict.fill` then reports them)."""
  dtype_of = (state.dtype if isinstance(state, safetensors_io.Checkpoint)
              else lambda k: np.asarray(state[k]).dtype)
  found = {}  # dtype name -> a tensor of that dtype
  for k in state:
    if not _BUFFERS.search(k) and jnp.issubdtype(dtype := np.dtype(dtype_of(k)), jnp.floating):
      found.setdefault(dtype.name, k)
  if len(found) > 1:
    raise ValueError(f"The checkpoint stores parameters in several dtypes ({found}, one tensor "
                     "of each): pass dtype= (convert hf --dtype) to choose the params' dtype.")
  return next(iter(found), "float32")


def convert(state_dict: Mapping[str, np.ndarray], hf_config: dict, num_new_tokens: int = 2,
            vocab_size: int | None = None,
            dtype: str | None = None) -> tuple[lm_lib.LMConfig, dict]:
  """(LMConfig, plain-LM params) from an HF state dict and its config.json contents.

  `vocab_size` (default: the checkpoint's) keeps only the first rows of the token tables; the
  `num_new_tokens` rows after them start at the mean of the kept rows. `dtype`: the params' (and
  LMConfig.param_dtype's), by default the checkpoint's. Tensors are read one at a time and copied
  into their layer stacks, so a lazy `state_dict` (`safetensors_io.Checkpoint`) is never held in
  memory whole.
  """
  family = hf_config.get("model_type")
  if family not in FAMILIES:
    raise ValueError(f"config.json model_type={family!r} is not supported; expected one of "
                     f"{sorted(FAMILIES)}.")
  kwargs, top, layer = FAMILIES[family](hf_config)
  hf_vocab = kwargs["vocab_size"]
  vocab_size = vocab_size or hf_vocab
  if vocab_size > hf_vocab:
    raise ValueError(f"The tokenizer has {vocab_size} tokens but the checkpoint embeds only "
                     f"{hf_vocab} (config.json vocab_size).")
  what = "dtype" if dtype else "The checkpoint's dtype (pass dtype= to cast)"
  dtype = dtype or _stored_dtype(state_dict)
  if dtype not in PARAM_DTYPES:
    raise ValueError(f"{what} {dtype!r}: expected one of {PARAM_DTYPES}.")
  cfg = lm_lib.make_config(dict(kwargs, vocab_size=vocab_size, num_new_tokens=num_new_tokens,
                                param_dtype=dtype))
  head, embed = top["lm_head/kernel"], top["token_embed"]
  tied_copy = (cfg.tied_embeddings and head in state_dict and embed in state_dict
               and np.array_equal(state_dict[head], state_dict[embed]))  # A stored copy of the tie.
  rows = lambda w: w[:vocab_size] if w.shape[0] == hf_vocab else w  # Else: reported mismatch.
  top = top_spec(top)
  for k in ("token_embed", "lm_head/kernel"):
    top[k] = (top[k][0], lambda w, fn=top[k][1]: fn(rows(w)))

  shapes = traverse_util.flatten_dict(_abstract_params(cfg), sep="/")
  abstract = {k: s for k, s in shapes.items() if not k.startswith(("layers/", "new_"))}
  spec = dict(top)
  for i in range(cfg.num_layers):  # Per layer: the stacked shapes without their leading axis.
    spec |= {f"layers/{i}/{k}": v for k, v in layer(i).items()}
    abstract |= {f"layers/{i}/{k[7:]}": jax.ShapeDtypeStruct(s.shape[1:], s.dtype)
                 for k, s in shapes.items() if k.startswith("layers/")}
  flat = {}
  def put(name, value):  # Layer i's value into row i of its stack, allocated at layer 0.
    if name.startswith("layers/"):
      _, i, name = name.split("/", 2)
      name = f"layers/{name}"
      if name not in flat:
        flat[name] = np.empty(shapes[name].shape, shapes[name].dtype)
      flat[name][int(i)] = value
    else:
      flat[name] = value
  strict.fill(spec, state_dict, abstract, f"{family} checkpoint", fit=_fit, ignore=(_BUFFERS,),
              used=[head] if tied_copy else [], put=put)

  if num_new_tokens:  # New tokens start at the average pretrained row (summed in float32).
    mean = lambda a, **kw: a.mean(dtype=np.float32, **kw).astype(a.dtype)
    flat["new_token_embed"] = np.broadcast_to(
        mean(flat["token_embed"], axis=0), shapes["new_token_embed"].shape).copy()
    if not cfg.tied_embeddings:
      flat["new_lm_head/kernel"] = np.broadcast_to(mean(
          flat["lm_head/kernel"], axis=1, keepdims=True), shapes["new_lm_head/kernel"].shape).copy()
  return cfg, traverse_util.unflatten_dict(flat, sep="/")


def load_hf_lm(path: str, num_new_tokens: int | None = None,
               dtype: str | None = None) -> tuple[lm_lib.LMConfig, dict]:
  """(LMConfig, plain-LM params) of the HF causal LM in directory `path` (config.json +
  *.safetensors); one conversion serves every xattn placement (`lm.to_layout`).

  num_new_tokens: rows of `new_token_embed`; by default as many as the tokenizer in `path` adds
  (2, `<image>` and `<EOC>`, without a tokenizer.json).
  dtype: of the params (and LMConfig.param_dtype), e.g. 'float32'; by default the checkpoint's,
  so a bfloat16 checkpoint stays bfloat16. Tensors are read one by one (`convert`).
  """
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"{config_file!r} does not exist; expected a Hugging Face model "
                            "directory (config.json + *.safetensors).")
  names = os.listdir(path)
  if not any(n.endswith(".safetensors") for n in names):
    pickles = sorted(n for n in names if n.endswith(_PICKLES))
    raise ValueError(
        f"{path!r} has no *.safetensors weights{f' (only pickled {pickles})' if pickles else ''}. "
        "Pickled checkpoints can run arbitrary code when loaded, so they are not read. Convert "
        "once, in a trusted environment: AutoModelForCausalLM.from_pretrained(src)"
        ".save_pretrained(dst, safe_serialization=True).")
  with open(config_file) as f:
    hf_config = json.load(f)
  vocab_size = None
  if os.path.isfile(os.path.join(path, "tokenizer.json")):
    tok = tokenizer_lib.load_tokenizer(path)
    vocab_size = tok.vocab_size
    num_new_tokens = tok.num_new_tokens if num_new_tokens is None else num_new_tokens
  return convert(safetensors_io.Checkpoint(path), hf_config,
                 2 if num_new_tokens is None else num_new_tokens, vocab_size, dtype)


def _abstract_params(cfg: lm_lib.LMConfig) -> dict:
  """ShapeDtypeStructs of the plain LM's parameters."""
  init = lambda key: lm_lib.LM(cfg).init(key, jnp.zeros((1, 1), jnp.int32))
  return nn.unbox(jax.eval_shape(init, jax.random.key(0)))["params"]


def save_converted(directory: str, cfg: lm_lib.LMConfig, params: dict, consume: bool = False):
  """Writes `params` (orbax, in directory/params) and the LMConfig (directory/lm_config.json):
  what `config.lm_init` takes (train/kinds/flamingo.py). `consume` empties `params` as its
  arrays are written (`checkpoint.save_params`), for a caller that is done with them."""
  directory = paths.resolve(directory)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, checkpoint_lib.LM_CONFIG), "w") as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2)
  checkpoint_lib.save_params(os.path.join(directory, checkpoint_lib.LM_PARAMS), params,
                            consume=consume)


def load_converted(directory: str) -> tuple[lm_lib.LMConfig, dict]:
  """Inverse of `save_converted` for the plain LM that `convert hf` writes."""
  directory = paths.resolve(directory)
  cfg = checkpoint_lib.read_lm_config(directory)
  return cfg, checkpoint_lib.load_params(os.path.join(directory, checkpoint_lib.LM_PARAMS),
                                         _abstract_params(cfg))
