"""Batched greedy, sampled and beam-search decoding with a fixed-size KV cache (paper: beam 3, stop
at <EOC>).

Prompts of different lengths are left-padded to one length P: row b's prompt fills the last
lengths[b] slots, a key mask hides the pads and positions count from each row's first real token.
The prompt's call fills the self-attention caches and projects the visual keys/values once; every
new token is then one cached LM step inside a `jax.lax.while_loop`, so a given (batch, P,
max_new_tokens) compiles once, whatever lengths are generated. The loop stops when every row (every
beam) has emitted a stop token or after max_new_tokens.

Greedy and sampled decoding take `Controls`: logits processors as Hugging Face `generate` defines
them (repetition penalty, no-repeat n-grams, then temperature, top-k, top-p), each a jnp function of
the logits and the tokens so far, applied inside the loop.
"""
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flamingo_jax.models import lm as lm_lib

# XLA:CPU hands matmuls to YNNPACK by default. A decoding step's (a few rows against each weight:
# reading the weights is the work) run faster as Eigen's: 4-17% less time per step, the prompt's
# pass 2-8% more (`python benchmarks/cpu_matmuls.py`, benchmarks/RESULTS.md). The train step is
# the same either way and keeps XLA's default.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def eigen_matmuls(lm: lm_lib.LM) -> bool:
  """Whether a search with `lm` compiles with CPU_COMPILER_OPTIONS: on a CPU, unless the LM's head
  is tied. A tied head reads its [V, D] embedding table transposed, which Eigen's kernel reads
  ~6x slower than a [D, V] head: a decoding step 1.8x (V=8192) to 4x (V=32768) slower than with
  YNNPACK's (benchmarks/RESULTS.md, `python benchmarks/cpu_matmuls.py --tied`)."""
  return jax.default_backend() == "cpu" and not lm.cfg.tied_embeddings


class _Jit:
  """jax.jit of a search whose first argument is the LM: compiled with CPU_COMPILER_OPTIONS where
  `eigen_matmuls(lm)`, else as XLA chooses.

  Chosen per call, not at import (which must not start a backend); other backends get none, as
  an XLA:CPU option means nothing to them.
  """

  def __init__(self, fn, **jit_kwargs):
    self._by_eigen = {eigen: jax.jit(fn, compiler_options=CPU_COMPILER_OPTIONS if eigen else None,
                                     **jit_kwargs) for eigen in (False, True)}
    functools.update_wrapper(self, fn)

  def _jitted(self, args, kwargs):
    return self._by_eigen[eigen_matmuls(args[0] if args else kwargs["lm"])]

  def __call__(self, *args, **kwargs):
    return self._jitted(args, kwargs)(*args, **kwargs)

  def lower(self, *args, **kwargs):
    return self._jitted(args, kwargs).lower(*args, **kwargs)


@functools.partial(jax.jit, static_argnums=0)
def visual_tokens(model, params, images) -> jax.Array:
  """images [B, N, T, H, W, 3] -> the resampler's visual tokens [B, N, R, D] (the LM's keys)."""
  return model.apply({"params": params}, images, method=model.encode_images)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, image_id: int,
             multiple: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Prompts (id lists) -> tokens [B, P], media_idx [B, P], lengths [B]; P a multiple of `multiple`.

  Rounding P up bounds how many prompt lengths get compiled.
  """
  if not prompts or not all(len(p) for p in prompts):
    raise ValueError("left_pad: expected a non-empty list of non-empty prompts.")
  lengths = np.array([len(p) for p in prompts], np.int32)
  width = -(-int(lengths.max()) // multiple) * multiple
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  for row, p in zip(tokens, prompts):
    row[width - len(p):] = p
  media_idx = np.cumsum(tokens == image_id, axis=1).astype(np.int32)
  return tokens, media_idx, lengths


def _cache_shapes(lm, batch, length, visual):
  """Shapes of the decode cache for `batch` rows and `length` slots (nothing is computed)."""
  zeros = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  v = jax.ShapeDtypeStruct((batch, *visual.shape[1:]), visual.dtype)
  mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_)
  return jax.eval_shape(functools.partial(lm.init, jax.random.PRNGKey(0)), zeros, v, zeros, zeros,
                        mask)["cache"]


def _batch_axes(lm, length, visual):
  """Per cache leaf, the axis that indexes batch rows (None: shared, e.g. the cache index)."""
  one, two = (_cache_shapes(lm, b, length, visual) for b in (1, 2))
  def axis(a, b):
    diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
    return diff[0] if diff else None
  return jax.tree_util.tree_map(axis, one, two)


def _prefill(lm, params, visual, tokens, media_idx, lengths, max_new_tokens):
  """Runs the prompts -> last logits [B, V], the filled cache, key_mask [B, P + new tokens]."""
  b, p = tokens.shape
  pad = p - lengths  # [B]
  key_mask = jnp.arange(p + max_new_tokens)[None] >= pad[:, None]
  positions = jnp.maximum(jnp.arange(p)[None] - pad[:, None], 0)
  cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 _cache_shapes(lm, b, p + max_new_tokens, visual))
  logits, state = lm.apply({"params": params, "cache": cache}, tokens, visual, media_idx,
                           positions, key_mask, last_only=True, mutable=["cache"])
  return logits[:, -1], state["cache"], key_mask


def _per_layer(lm):
  """(hold, read): how the decoding loop keeps the LM's parameters and cache, and rebuilds them.

  With unrolled layer stacks (`unroll_layers`) the loop holds every stacked array as one array per
  layer (`hold`): the parameters split once before the loop, the cache in the loop's state. Inside
  a step `read` stacks them again for the LM, which XLA folds away (a slice of a concatenate is
  its operand), so no step copies a weight, and each layer's cache is updated in place. Held
  stacked, every step copied each weight and each layer's cache out of its stack (and the cache
  back). A rolled loop slices by its index either way: both are the identity there.
  """
  if not lm.cfg.unroll_layers:
    return (lambda tree: tree), (lambda held: held)
  split = lambda x, n: x if n == 0 else [split(x[i], n - 1) for i in range(x.shape[0])]
  join = lambda x, n: x if n == 0 else jnp.stack([join(p, n - 1) for p in x])
  hold = lambda tree: {path: split(x, lm_lib.stack_axes(path))
                       for path, x in traverse_util.flatten_dict(tree, sep="/").items()}
  read = lambda held: traverse_util.unflatten_dict(
      {path: join(x, lm_lib.stack_axes(path)) for path, x in held.items()}, sep="/")
  return hold, read


def _step(lm, params, cache, token, position, media_idx, key_mask):
  """One cached LM call on token [B] -> next logits [B, V], the updated cache."""
  logits, state = lm.apply({"params": params, "cache": cache}, token[:, None], None,
                           media_idx[:, None], position[:, None], key_mask, mutable=["cache"])
  return logits[:, 0], state["cache"]


@dataclasses.dataclass(frozen=True)
class Controls:
  """Logits processors of greedy and sampled decoding; the defaults change nothing.

  repetition_penalty > 1 discourages every token already in the prompt or the output;
  no_repeat_ngram_size n > 0 bans each token that would repeat an n-gram of them; temperature,
  top_k (0: all) and top_p (1: all) shape the distribution that sampling draws from.
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  no_repeat_ngram_size: int = 0

  def __post_init__(self):
    checks = {"temperature": self.temperature > 0, "top_k": self.top_k >= 0,
              "top_p": 0 < self.top_p <= 1, "repetition_penalty": self.repetition_penalty > 0,
              "no_repeat_ngram_size": self.no_repeat_ngram_size >= 0}
    bad = [f"{k}={getattr(self, k)!r}" for k, ok in checks.items() if not ok]
    if bad:
      raise ValueError(f"decoding controls out of range: {', '.join(bad)} (temperature > 0, "
                       "top_k >= 0, 0 < top_p <= 1, repetition_penalty > 0, "
                       "no_repeat_ngram_size >= 0).")

  @property
  def shapes_distribution(self) -> bool:
    """Whether temperature, top-k or top-p are set: they matter to sampling only."""
    return (self.temperature, self.top_k, self.top_p) != (1.0, 0, 1.0)

  @property
  def penalises_repetition(self) -> bool:
    return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0


def repetition_penalty(logits, seen, penalty):
  """logits [B, V] of the tokens in `seen` [B, V] divided by `penalty` where positive and
  multiplied by it where negative (CTRL, Keskar et al. 2019; Hugging Face's definition)."""
  return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def no_repeat_ngram(logits, history, start, length, n: int):
  """-inf at each token that would complete an n-gram already in history[b, start[b]:length].

  history [B, W] holds each row's tokens left-padded from start[b]; `length` (a scalar, the
  same for every row) counts the slots filled so far, the next token goes to slot `length`.
  """
  b, width = history.shape
  if n > width:  # No n-gram fits.
    return logits
  windows = jnp.stack([history[:, j:width - n + 1 + j] for j in range(n)], -1)  # [B, W-n+1, n]
  last = jax.lax.dynamic_slice_in_dim(history, length - (n - 1), n - 1, axis=1)  # [B, n-1]
  first = jnp.arange(width - n + 1)[None]
  match = ((windows[..., :-1] == last[:, None]).all(-1) & (first >= start[:, None])
           & (first + n <= length) & (length - (n - 1) >= start[:, None]))
  banned = jnp.zeros(logits.shape, bool).at[jnp.arange(b)[:, None], windows[..., -1]].max(match)
  return jnp.where(banned, -jnp.inf, logits)


def top_k(logits, k: int):
  """-inf below the k-th largest logit of each row (ties with it kept)."""
  kth = jax.lax.top_k(logits, k)[0][:, -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def top_p(logits, p: float):
  """Nucleus: keeps the most likely tokens until their probability reaches p (at least one)."""
  order = jnp.argsort(-logits, axis=-1)
  probs = jax.nn.softmax(jnp.take_along_axis(logits, order, -1), -1)
  before = jnp.cumsum(probs, -1) - probs  # Mass of the more likely tokens.
  keep = jnp.zeros(logits.shape, bool).at[jnp.arange(len(logits))[:, None], order].set(before < p)
  return jnp.where(keep, logits, -jnp.inf)


def _process(controls: Controls, logits, seen, history, start, length):
  """The processors that `controls` sets, in Hugging Face's order."""
  if controls.repetition_penalty != 1.0:
    logits = repetition_penalty(logits, seen, controls.repetition_penalty)
  if controls.no_repeat_ngram_size:
    logits = no_repeat_ngram(logits, history, start, length, controls.no_repeat_ngram_size)
  if controls.temperature != 1.0:
    logits = logits / controls.temperature
  if controls.top_k:
    logits = top_k(logits, min(controls.top_k, logits.shape[-1]))
  if controls.top_p < 1.0:
    logits = top_p(logits, controls.top_p)
  return logits


@functools.partial(_Jit, static_argnames=("lm", "max_new_tokens", "controls"))
def greedy_search(lm: lm_lib.LM, params, visual, tokens, media_idx, lengths, stop_ids, pad_id, *,
                  max_new_tokens: int, controls: Controls = Controls(), rng=None):
  """Greedy decoding, or sampling with an rng -> (generated ids [B, T] with the stop token then
  pad_id, log-probs [B]).

  lm: the LM in decode mode (`lm_lib.LM(model.lm, decode=True)`), params its parameters;
  visual [B, N, R, D]; tokens/media_idx [B, P] left-padded (`left_pad`); lengths [B];
  stop_ids [S]. Each token is the argmax of the logits after `controls`' processors, or drawn
  from them with jax.random.fold_in(rng, step). The log-prob sums the generated tokens' under the
  model (unprocessed), stop token included.
  """
  logits, cache, key_mask = _prefill(lm, params, visual, tokens, media_idx, lengths,
                                     max_new_tokens)
  b, p = tokens.shape
  media = media_idx[:, -1]  # New tokens see the prompt's last image.
  start = p - lengths
  history = jnp.concatenate([tokens, jnp.full((b, max_new_tokens), pad_id, jnp.int32)], 1)
  seen = jnp.zeros(logits.shape, bool).at[jnp.arange(b)[:, None], tokens].max(key_mask[:, :p])
  hold, read = _per_layer(lm)
  held_params = hold(params)

  def body(state):
    t, cache, logits, history, seen, score, done = state
    processed = _process(controls, logits, seen, history, start, p + t)
    choice = (jnp.argmax(processed, -1) if rng is None else
              jax.random.categorical(jax.random.fold_in(rng, t), processed))
    token = jnp.where(done, pad_id, choice)
    logprobs = jax.nn.log_softmax(logits)
    score = score + jnp.where(done, 0.0, jnp.take_along_axis(logprobs, token[:, None], 1)[:, 0])
    done = done | jnp.isin(token, stop_ids)
    history = history.at[:, p + t].set(token)
    seen = seen.at[jnp.arange(b), token].set(True)
    logits, cache = _step(lm, read(held_params), read(cache), token, lengths + t, media, key_mask)
    cache = hold(cache)
    return t + 1, cache, logits, history, seen, score, done

  state = (0, hold(cache), logits, history, seen, jnp.zeros(b), jnp.zeros(b, bool))
  state = jax.lax.while_loop(lambda s: (s[0] < max_new_tokens) & ~s[-1].all(), body, state)
  return state[3][:, p:], state[5]


@functools.partial(_Jit, static_argnames=("lm", "max_new_tokens", "beam_size"))
def beam_search(lm: lm_lib.LM, params, visual, tokens, media_idx, lengths, stop_ids, pad_id, *,
                max_new_tokens: int, beam_size: int = 3, length_penalty: float = 1.0):
  """Beam search per row -> (best generated ids [B, T], its raw log-prob [B]).

  Arguments as `greedy_search`. Beams are ranked by log-prob / (generated length)^length_penalty:
  1.0 (default, as Hugging Face `generate`, which OpenFlamingo's evaluation uses) is the mean
  token log-prob, 0.0 the raw log-prob. A finished beam stays in the pool with its score (it
  extends only by pad, at no cost) until the loop ends; the best beam is returned.
  """
  b, k = tokens.shape[0], beam_size
  logits, cache, key_mask = _prefill(lm, params, visual, tokens, media_idx, lengths,
                                     max_new_tokens)
  logprobs = jax.nn.log_softmax(logits)
  axes = _batch_axes(lm, tokens.shape[1] + max_new_tokens, visual)
  gather = lambda tree, rows: jax.tree_util.tree_map(
      lambda x, ax: x if ax is None else jnp.take(x, rows, axis=ax), tree, axes)
  beams = jnp.repeat(jnp.arange(b), k)  # [B*K] row of each beam
  cache, logprobs, key_mask = gather(cache, beams), logprobs[beams], key_mask[beams]
  lengths, media = lengths[beams], media_idx[beams, -1]
  v = logprobs.shape[-1]
  pad_only = jnp.where(jnp.arange(v) == pad_id, 0.0, -jnp.inf)  # A finished beam's one extension.
  hold, read = _per_layer(lm)
  held_params = hold(params)

  def rank(score, length):
    return score / jnp.maximum(length, 1).astype(jnp.float32) ** length_penalty

  def body(state):
    t, cache, logprobs, seqs, score, length, done = state  # seqs [B, K, T]; others [B, K]
    ext = jnp.where(done[..., None], pad_only, logprobs.reshape(b, k, v))
    cand = (score[..., None] + ext).reshape(b, k * v)
    cand_len = jnp.repeat(length + ~done, v, axis=1)  # [B, K*V]
    _, best = jax.lax.top_k(rank(cand, cand_len), k)  # [B, K]
    parent, token = best // v, best % v
    score = jnp.take_along_axis(cand, best, 1)
    length = jnp.take_along_axis(cand_len, best, 1)
    done = jnp.take_along_axis(done, parent, 1) | jnp.isin(token, stop_ids)
    seqs = jnp.take_along_axis(seqs, parent[..., None], 1).at[:, :, t].set(token)
    rows = (jnp.arange(b)[:, None] * k + parent).reshape(-1)  # [B*K]
    logits, cache = _step(lm, read(held_params), gather(read(cache), rows), token.reshape(-1),
                          lengths + t, media, key_mask)
    cache = hold(cache)
    return t + 1, cache, jax.nn.log_softmax(logits), seqs, score, length, done

  score = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf)[None].repeat(b, 0)  # One live beam at first.
  state = (0, hold(cache), logprobs, jnp.full((b, k, max_new_tokens), pad_id, jnp.int32), score,
           jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), bool))
  state = jax.lax.while_loop(lambda s: (s[0] < max_new_tokens) & ~s[-1].all(), body, state)
  _, _, _, seqs, score, length, _ = state
  top = jnp.argmax(rank(score, length), axis=1)  # [B]
  return seqs[jnp.arange(b), top], score[jnp.arange(b), top]


def generate(model, params, tokenizer, images, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int = 20, beam_size: int = 3, length_penalty: float = 1.0,
             pad_multiple: int = 16, controls: Controls = Controls(),
             sample_seed: int | None = None) -> list[list[int]]:
  """Continues each prompt until <EOC> or <EOS>: the generated ids per prompt, stop token dropped.

  model/params: a Flamingo (any `decode` setting) and its parameters; images [B, N, T, H, W, 3] the
  media of each prompt in order; prompts: id lists with their <image> tokens (fewshot.py builds
  them). beam_size 1 is greedy; a sample_seed samples (beam_size unused). `controls` apply to
  greedy and sampling; temperature, top-k and top-p to sampling only.
  """
  sample, beam = sample_seed is not None, sample_seed is None and beam_size > 1
  if beam and (controls.shapes_distribution or controls.penalises_repetition):
    raise ValueError(f"beam search takes no decoding controls ({controls}); use greedy "
                     "(beam_size=1) or sampling for them.")
  if not sample and controls.shapes_distribution:
    raise ValueError(f"temperature, top_k and top_p apply to sampling only ({controls}).")
  lm = lm_lib.LM(model.lm, decode=True)
  tokens, media_idx, lengths = left_pad(prompts, tokenizer.pad_id, tokenizer.image_id,
                                        pad_multiple)
  if int(lengths.max()) + max_new_tokens > model.lm.max_len:
    raise ValueError(f"A prompt of {lengths.max()} tokens plus max_new_tokens={max_new_tokens} "
                     f"exceeds the LM's max_len={model.lm.max_len}; use fewer shots or tokens.")
  args = (lm, params["lm"], visual_tokens(model, params, images), tokens, media_idx, lengths,
          jnp.array([tokenizer.eoc_id, tokenizer.eos_id]), tokenizer.pad_id)
  if beam:
    out, _ = beam_search(*args, max_new_tokens=max_new_tokens, beam_size=beam_size,
                         length_penalty=length_penalty)
  else:
    out, _ = greedy_search(*args, max_new_tokens=max_new_tokens, controls=controls,
                           rng=jax.random.PRNGKey(sample_seed) if sample else None)
  stops = (tokenizer.eoc_id, tokenizer.eos_id)
  results = []
  for row in np.asarray(out).tolist():
    end = next((i for i, t in enumerate(row) if t in stops), len(row))
    results.append(row[:end])
  return results
