"""Converts Hugging Face causal LMs (config.json + safetensors) into `models.lm.LM` parameters.

Families: GPT-2, LLaMA (grouped-query attention included), GPT-NeoX and MPT. GPT-NeoX and MPT are
chosen over OPT because OpenFlamingo's released models use them (MPT-1B/7B; RedPajama-INCITE-3B is
a GPT-NeoX); OPT would also need a learned-position offset that `models/lm.py` does not have.

Only safetensors are read: pickled `.bin`/`.pt` checkpoints can run code when loaded, so they are
refused. Shapes are checked on `jax.eval_shape` of the model first, and one error lists every
checkpoint key not used, every parameter not filled and every shape mismatch (never a silent
partial load: OpenFlamingo issue #210).

Vocabulary: with a `tokenizer.json` beside the weights, `data/tokenizer.py` appends `<image>`,
`<EOC>` (and BOS/EOS/pad where the base lacks them) at ids tokenizer.vocab_size + k. Embedding rows
past the tokenizer's vocabulary (padding, e.g. GPT-NeoX's 50432 rows for 50277 tokens) are dropped,
so those ids land in the trainable `new_token_embed`, whose rows start at the mean base embedding.

Usage: `cfg, params = load_hf_lm("path/to/hf_dir")`; `LM(cfg).apply({"params": params}, tokens)`.
"""
import dataclasses
import json
import math
import os
import re
from typing import Callable

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

# A family maps our per-layer paths to sources: (checkpoint key, fn(array) -> the value as an
# [in, out] matrix (kernels), a table (embeddings) or a vector; `_fit` then reshapes it).
_same = lambda a: a
_t = lambda w: w.T  # torch Linear [out, in] -> [in, out]


def _part(j: int, n: int = 3, axis: int = -1) -> Callable[[np.ndarray], np.ndarray]:
  """The j-th of n equal chunks along `axis` (fused q|k|v tensors)."""
  return lambda a: np.split(a, n, axis)[j]


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
        out[f"attn/{name}/{o}"] = (p + f"attn.c_attn.{'weight' if o == 'kernel' else o}", _part(j))
    return out | _weights(p, (("attn/out", "attn.c_proj"), ("mlp/wi", "mlp.c_fc"),
                              ("mlp/wo", "mlp.c_proj")), _same)
  return cfg, top, layer


def _llama(c):
  """LLaMA: RMSNorm, rotary (rotate-half, as ours), SwiGLU, grouped-query attention."""
  _check(c, "llama", mlp_bias=c.get("attention_bias", False))
  d, h = c["hidden_size"], c["num_attention_heads"]
  cfg = dict(vocab_size=c["vocab_size"], dim=d, num_layers=c["num_hidden_layers"], num_heads=h,
             num_kv_heads=c.get("num_key_value_heads") or h, head_dim=c.get("head_dim") or d // h,
             mlp_dim=c["intermediate_size"], norm="rmsnorm", norm_bias=False,
             norm_eps=c.get("rms_norm_eps", 1e-6), position="rotary", **_rope(c, "llama"),
             max_len=c.get("max_position_embeddings", 2048),
             activation=_activation(c.get("hidden_act", "silu")), gated_mlp=True,
             use_bias=c.get("attention_bias", False),
             tied_embeddings=c.get("tie_word_embeddings", False))
  top = {"token_embed": "model.embed_tokens.weight", "norm_final/scale": "model.norm.weight",
         "lm_head/kernel": "lm_head.weight"}
  def layer(i):
    p = f"model.layers.{i}."
    return {"norm_attn/scale": (p + "input_layernorm.weight", _same),
            "norm_mlp/scale": (p + "post_attention_layernorm.weight", _same)} | _weights(
                p, (("attn/query", "self_attn.q_proj"), ("attn/key", "self_attn.k_proj"),
                    ("attn/value", "self_attn.v_proj"), ("attn/out", "self_attn.o_proj"),
                    ("mlp/wi", "mlp.gate_proj"), ("mlp/wi_up", "mlp.up_proj"),
                    ("mlp/wo", "mlp.down_proj")))
  return cfg, top, layer


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
  qkv = lambda j: (lambda w: w.reshape(nh, 3, -1, *w.shape[1:])[:, j].reshape(d, *w.shape[1:]).T)
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
      out[f"attn/{name}/kernel"] = (p + "attn.Wqkv.weight", lambda w, j=j: _part(j, axis=0)(w).T)
    return out
  return cfg, top, layer


FAMILIES = {"gpt2": _gpt2, "llama": _llama, "gpt_neox": _gpt_neox, "mpt": _mpt}


def _fit(value: np.ndarray, shape: tuple[int, ...], path: str) -> np.ndarray:
  """`value` (a kernel as [in, out] matrix, a vector or a table) reshaped to `shape` if it fits."""
  if path.endswith("kernel"):
    n_in = 2 if path.endswith("attn/out/kernel") else 1  # out: [H, Dh, D]; others [D, ...].
    want = (math.prod(shape[:n_in]), math.prod(shape[n_in:]))
  else:
    want = shape if path.endswith("embed") else (math.prod(shape),)  # Tables; flat vectors.
  return value.reshape(shape) if value.shape == want else value


def convert(state_dict: dict[str, np.ndarray], hf_config: dict, num_new_tokens: int = 2,
            vocab_size: int | None = None) -> tuple[lm_lib.LMConfig, dict]:
  """(LMConfig, plain-LM params) from an HF state dict and its config.json contents.

  `vocab_size` (default: the checkpoint's) keeps only the first rows of the token tables; the
  `num_new_tokens` rows after them start at the mean of the kept rows.
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
  cfg = lm_lib.make_config(dict(kwargs, vocab_size=vocab_size, num_new_tokens=num_new_tokens))
  head, embed = top["lm_head/kernel"], top["token_embed"]
  if cfg.tied_embeddings and head in state_dict and embed in state_dict and np.array_equal(
      state_dict[head], state_dict[embed]):
    state_dict = {k: v for k, v in state_dict.items() if k != head}  # A stored copy of the tie.
  rows = lambda w: w[:vocab_size] if w.shape[0] == hf_vocab else w  # Else: reported mismatch.
  top = {k: (v, {"token_embed": rows, "lm_head/kernel": lambda w: rows(w).T}.get(k, _same))
         for k, v in top.items()}

  shapes = traverse_util.flatten_dict(_abstract_params(cfg), sep="/")
  abstract = {k: s for k, s in shapes.items() if not k.startswith(("layers/", "new_"))}
  spec = dict(top)
  for i in range(cfg.num_layers):  # Per layer: the stacked shapes without their leading axis.
    spec |= {f"layers/{i}/{k}": v for k, v in layer(i).items()}
    abstract |= {f"layers/{i}/{k[7:]}": jax.ShapeDtypeStruct(s.shape[1:], s.dtype)
                 for k, s in shapes.items() if k.startswith("layers/")}
  params = strict.fill(spec, state_dict, abstract, f"{family} checkpoint", fit=_fit,
                       ignore=(_BUFFERS,))

  if num_new_tokens:  # New tokens start at the average pretrained row.
    params["new_token_embed"] = np.broadcast_to(
        params["token_embed"].mean(0), shapes["new_token_embed"].shape).copy()
    if not cfg.tied_embeddings:
      params["new_lm_head"] = {"kernel": np.broadcast_to(params["lm_head"]["kernel"].mean(
          1, keepdims=True), shapes["new_lm_head/kernel"].shape).copy()}
  layers = params.pop("layers")
  layer_trees = [layers[str(i)] for i in range(cfg.num_layers)]
  return cfg, {**params, "layers": jax.tree.map(lambda *a: np.stack(a), *layer_trees)}


def load_hf_lm(path: str, num_new_tokens: int | None = None) -> tuple[lm_lib.LMConfig, dict]:
  """(LMConfig, plain-LM params) of the HF causal LM in directory `path` (config.json +
  *.safetensors); one conversion serves every xattn placement (`lm.to_layout`).

  num_new_tokens: rows of `new_token_embed`; by default as many as the tokenizer in `path` adds
  (2, `<image>` and `<EOC>`, without a tokenizer.json).
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
  return convert(safetensors_io.load(path), hf_config,
                 2 if num_new_tokens is None else num_new_tokens, vocab_size)


def _abstract_params(cfg: lm_lib.LMConfig) -> dict:
  """ShapeDtypeStructs of the plain LM's parameters."""
  init = lambda key: lm_lib.LM(cfg).init(key, jnp.zeros((1, 1), jnp.int32))
  return nn.unbox(jax.eval_shape(init, jax.random.key(0)))["params"]


def save_converted(directory: str, cfg: lm_lib.LMConfig, params: dict):
  """Writes `params` (orbax, in directory/params) and the LMConfig (directory/lm_config.json):
  what `config.lm_init` takes (train/kinds/flamingo.py)."""
  directory = paths.resolve(directory)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, checkpoint_lib.LM_CONFIG), "w") as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2)
  checkpoint_lib.save_params(os.path.join(directory, checkpoint_lib.LM_PARAMS), params)


def load_converted(directory: str) -> tuple[lm_lib.LMConfig, dict]:
  """Inverse of `save_converted` for the plain LM that `convert hf` writes."""
  directory = paths.resolve(directory)
  cfg = checkpoint_lib.read_lm_config(directory)
  return cfg, checkpoint_lib.load_params(os.path.join(directory, checkpoint_lib.LM_PARAMS),
                                         _abstract_params(cfg))
