"""Writes an `models.lm.LM` back as a Hugging Face causal LM (config.json + model.safetensors).

The weights go through the same per-family tables that `hf.py` imports with, inverted (each map
inverts itself; fused q|k|v parts join), so the two directions cannot drift apart. The new-token
rows (`new_token_embed`, `new_lm_head`) are appended to the HF tables: vocab_size = base + new.
config.json is written per family and then read back through `hf.py`: a config whose forward pass
the family cannot express (a sliding window for LLaMA, q/k/v-only biases for GPT-2, ...) is refused
with the fields that differ, never written wrong.

Usage: `export(cfg, params, "out_dir", model_type="llama")`, then
`transformers.AutoModelForCausalLM.from_pretrained("out_dir")`.
"""
import dataclasses
import json
import os

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from flamingo_jax import paths
from flamingo_jax.convert import hf
from flamingo_jax.models import lm as lm_lib

_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu",
                   "silu": "silu"}


def _activation(cfg: lm_lib.LMConfig) -> str:
  if cfg.activation not in _HF_ACTIVATIONS:
    raise ValueError(f"lm.activation={cfg.activation!r} has no Hugging Face name; expected one of "
                     f"{sorted(_HF_ACTIVATIONS)}.")
  return _HF_ACTIVATIONS[cfg.activation]


def _llama_like(cfg: lm_lib.LMConfig) -> dict:
  return dict(hidden_size=cfg.dim, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
              head_dim=cfg.head_size, intermediate_size=cfg.mlp_dim, rms_norm_eps=cfg.norm_eps,
              rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_len,
              hidden_act=_activation(cfg), tie_word_embeddings=cfg.tied_embeddings)


def _qwen2(cfg: lm_lib.LMConfig) -> dict:
  window = cfg.sliding_window is not None
  return _llama_like(cfg) | dict(use_sliding_window=window, sliding_window=cfg.sliding_window,
                                 max_window_layers=0 if window else cfg.num_layers)


# model_type -> config.json of an LMConfig (vocab_size and model_type are added by `export`).
_CONFIGS = {
    "gpt2": lambda cfg: dict(
        n_embd=cfg.dim, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.mlp_dim,
        layer_norm_epsilon=cfg.norm_eps, n_positions=cfg.max_len,
        activation_function=_activation(cfg), tie_word_embeddings=cfg.tied_embeddings),
    "llama": lambda cfg: _llama_like(cfg) | dict(attention_bias=cfg.use_bias,
                                                 mlp_bias=cfg.use_bias),
    "mistral": lambda cfg: _llama_like(cfg) | dict(sliding_window=cfg.sliding_window),
    "qwen2": _qwen2,
    "gemma": lambda cfg: _llama_like(cfg) | dict(hidden_activation=_activation(cfg)),
    "gpt_neox": lambda cfg: dict(
        hidden_size=cfg.dim, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.mlp_dim, layer_norm_eps=cfg.norm_eps, rotary_pct=cfg.rotary_pct,
        rotary_emb_base=cfg.rope_theta, max_position_embeddings=cfg.max_len,
        hidden_act=_activation(cfg), use_parallel_residual=cfg.parallel_residual,
        tie_word_embeddings=cfg.tied_embeddings),
    "mpt": lambda cfg: dict(
        d_model=cfg.dim, n_heads=cfg.num_heads, n_layers=cfg.num_layers,
        expansion_ratio=cfg.mlp_dim // cfg.dim, layer_norm_epsilon=cfg.norm_eps,
        max_seq_len=cfg.max_len, attn_config={"alibi": True, "alibi_bias_max": cfg.alibi_bias_max},
        tie_word_embeddings=cfg.tied_embeddings),
}


def hf_config(cfg: lm_lib.LMConfig, model_type: str) -> dict:
  """config.json for `cfg` as a `model_type` model; raises, naming the fields, if reading it back
  (`hf.py`) would give an LM that computes something else."""
  if model_type not in _CONFIGS:
    raise ValueError(f"model_type={model_type!r} cannot be exported; expected one of "
                     f"{sorted(_CONFIGS)}.")
  vocab = cfg.vocab_size + cfg.num_new_tokens
  config = _CONFIGS[model_type](cfg) | {"model_type": model_type, "vocab_size": vocab,
                                        "torch_dtype": cfg.param_dtype}
  kwargs, _, _ = hf.FAMILIES[model_type](config)
  back = lm_lib.forward_fields(lm_lib.make_config(kwargs | {"num_new_tokens": 0}))
  want = lm_lib.forward_fields(dataclasses.replace(cfg, vocab_size=vocab, num_new_tokens=0,
                                                   xattn=None))
  differ = [f"lm.{k}={want[k]!r} (as {model_type}: {back.get(k)!r})"
            for k in want if back.get(k) != want[k]]
  if differ:
    raise ValueError(f"A {model_type} config.json cannot express this LM: "
                     + "; ".join(differ) + ".")
  return config


def hf_state_dict(cfg: lm_lib.LMConfig, params: dict, model_type: str) -> dict[str, np.ndarray]:
  """{checkpoint key: array} of the LM's parameters (any xattn layout) as `model_type` names them;
  raises if they are not `cfg`'s or one has no place in the family's table."""
  _, top, layer = hf.FAMILIES[model_type](hf_config(cfg, model_type))
  flat = {k: np.asarray(v) for k, v in
          traverse_util.flatten_dict(lm_lib.to_plain(params), sep="/").items()}
  init = lambda key: lm_lib.LM(dataclasses.replace(cfg, xattn=None)).init(
      key, jnp.zeros((1, 1), jnp.int32))
  shapes = {k: s.shape for k, s in traverse_util.flatten_dict(
      nn.unbox(jax.eval_shape(init, jax.random.key(0)))["params"], sep="/").items()}
  wrong = [f"{k}: {flat[k].shape if k in flat else 'missing'}, expected {s}"
           for k, s in shapes.items() if k not in flat or flat[k].shape != s]
  wrong += [f"{k}: not a parameter of this LM" for k in flat if k not in shapes]
  if wrong:
    raise ValueError("The params do not match the LMConfig:\n  " + "\n  ".join(sorted(wrong)))
  ours = {k: v for k, v in flat.items() if not k.startswith(("layers/", "new_"))}
  ours["token_embed"] = np.concatenate([flat["token_embed"]] + (
      [flat["new_token_embed"]] if "new_token_embed" in flat else []))
  if "lm_head/kernel" in flat:
    ours["lm_head/kernel"] = np.concatenate([flat["lm_head/kernel"]] + (
        [flat["new_lm_head/kernel"]] if "new_lm_head/kernel" in flat else []), 1)
  spec = hf.top_spec(top)
  for i in range(cfg.num_layers):
    spec |= {f"layers/{i}/{k}": v for k, v in layer(i).items()}
    ours |= {f"layers/{i}/{k[7:]}": x[i] for k, x in flat.items() if k.startswith("layers/")}
  unplaced = sorted(k for k in ours if k not in spec)
  if unplaced:
    raise ValueError(f"The {model_type} checkpoint has no place for parameters {unplaced}.")
  state, parts = {}, {}  # parts: fused key -> {j: (Part, value)}.
  for path, value in ours.items():
    key, fn = spec[path]
    value = value.reshape(hf.map_shape(value.shape, path))
    if isinstance(fn, hf.Part):
      parts.setdefault(key, {})[fn.j] = (fn, value)
    else:
      state[key] = fn.invert(value)
  for key, got in parts.items():
    fn = next(iter(got.values()))[0]
    if sorted(got) != list(range(fn.n)):
      raise ValueError(f"{key} fuses {fn.n} parameters; only parts {sorted(got)} are present.")
    state[key] = fn.join([got[j][1] for j in range(fn.n)])
  return {k: np.ascontiguousarray(v) for k, v in state.items()}


def export(cfg: lm_lib.LMConfig, params: dict, out_dir: str, model_type: str):
  """Writes out_dir/config.json and out_dir/model.safetensors, which
  `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads as the same LM."""
  config = hf_config(cfg, model_type)
  state = hf_state_dict(cfg, params, model_type)
  out_dir = paths.resolve(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  safetensors.numpy.save_file(state, os.path.join(out_dir, "model.safetensors"),
                              metadata={"format": "pt"})
