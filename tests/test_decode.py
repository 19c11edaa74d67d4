"""Decoding: cached greedy equals full forwards, beam search, stopping, one compile per shape."""
import dataclasses
import functools
import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.eval import decode
from flamingo_jax.models import lm as lm_lib
from tests import model_utils

V = 64  # tiny config's base vocabulary; <image> = 64, <EOC> = 65.


def char_tokenizer():
  """A stand-in tokenizer over the tiny model's vocabulary: one id per character."""
  return tokenizer_lib.Tokenizer(
      vocab_size=V, new_tokens=(tokenizer_lib.IMAGE, tokenizer_lib.EOC), bos_id=1, eos_id=2,
      pad_id=3, _encode=lambda s: [4 + ord(c) % (V - 4) for c in s],
      _decode=lambda ids, skip: "".join(chr(i - 4 + 32) for i in ids))


@functools.lru_cache(maxsize=None)
def tiny_setup(placement: str = "paper"):
  """The tiny Flamingo (xattn.placement `placement`) with open gates and its params (shared with
  test_fewshot.py)."""
  model, _ = model_utils.tiny_model(**{"lm.xattn.placement": placement})
  images, tokens, media_idx = model_utils.random_inputs(0)
  return model, model_utils.set_gates(model_utils.init(model, images, tokens, media_idx), 0.8)


@functools.lru_cache(maxsize=None)
def full_forward():
  """The tiny model's jitted full forward: (params, images, tokens, media_idx) -> logits."""
  model, _ = tiny_setup()
  return jax.jit(lambda p, i, t, m: model.apply({"params": p}, i, t, m))


def logprobs(params, images, seqs, width=16):
  """Full-forward log-probs [B, width, V] of token lists, right-padded to `width` (one compile)."""
  tokens = np.full((len(seqs), width), 3, np.int32)
  for row, seq in zip(tokens, seqs):
    row[:len(seq)] = seq
  media_idx = model_utils.media_idx_from_tokens(tokens, V)
  return jax.nn.log_softmax(full_forward()(params, images, tokens, media_idx))


@pytest.fixture(scope="module")
def setup():
  model, params = tiny_setup()
  images = model_utils.random_inputs(0)[0]
  # Two prompts of different lengths (so left padding matters), each with 2 images.
  prompts = [[1, V, 10, 11, 12, V, 13, 14, 15], [1, 20, V, 21, V, 22]]
  return model, params, images, prompts


def decode_args(model, params, images, prompts, stop_ids=(V + 1, 2)):
  tokens, media_idx, lengths = decode.left_pad(prompts, 3, V, multiple=4)
  visual = decode.visual_tokens(model, params, images)
  return (lm_lib.LM(model.lm, decode=True), params["lm"], visual, tokens, media_idx, lengths,
          jnp.array(stop_ids), 3)


def full_forward_greedy(params, images, prompts, steps):
  """Greedy by repeated full forwards of the whole sequences: (ids [B][steps], log-probs [B])."""
  seqs, scores = [list(p) for p in prompts], np.zeros(len(prompts))
  for _ in range(steps):
    logp = logprobs(params, images, seqs)
    for b, seq in enumerate(seqs):
      token = int(jnp.argmax(logp[b, len(seq) - 1]))
      scores[b] += float(logp[b, len(seq) - 1, token])
      seq.append(token)
  return [s[len(p):] for s, p in zip(seqs, prompts)], scores


def test_cached_greedy_equals_greedy_by_full_forwards(setup):
  model, params, images, prompts = setup
  out, scores = decode.greedy_search(*decode_args(model, params, images, prompts, (-1,)),
                                     max_new_tokens=6)
  want, want_scores = full_forward_greedy(params, images, prompts, 6)
  assert np.asarray(out).tolist() == want
  np.testing.assert_allclose(scores, want_scores, rtol=1e-4)


def test_stops_at_a_stop_token_and_compiles_once(setup, monkeypatch):
  model, params, images, prompts = setup
  traces = []
  step = decode._step
  monkeypatch.setattr(decode, "_step", lambda *a: traces.append(1) or step(*a))
  free, _ = decode.greedy_search(*decode_args(model, params, images, prompts, (-1,)),
                                 max_new_tokens=7)
  free = np.asarray(free)
  for t in (0, 3):  # Stop at the token row 0 emits at step t: several generation lengths.
    stop = int(free[0, t])
    out, _ = decode.greedy_search(*decode_args(model, params, images, prompts, (stop,)),
                                  max_new_tokens=7)
    out = np.asarray(out)
    np.testing.assert_array_equal(out[0, :t + 1], free[0, :t + 1])
    assert (out[0, t + 1:] == 3).all()  # pad after the stop token.
  assert len(traces) == 1  # The step is traced once: a while_loop, not a Python loop.


def test_generate_stops_at_eoc(setup):
  model, params, images, prompts = setup
  head = params["lm"]["new_lm_head"]["kernel"]  # Raise <EOC>'s logit so it comes up early.
  params = {**params, "lm": {**params["lm"], "new_lm_head": {"kernel": head.at[:, 1].add(5.0)}}}
  free, _ = decode.greedy_search(*decode_args(model, params, images, prompts, (-1,)),
                                 max_new_tokens=6)
  free = np.asarray(free).tolist()
  want = [row[:row.index(V + 1)] for row in free]  # Up to the first <EOC>.
  assert all(len(w) < 4 for w in want)
  kw = dict(max_new_tokens=6, pad_multiple=4)  # Shapes as decode_args: compiled once.
  assert decode.generate(model, params, char_tokenizer(), images, prompts, beam_size=1,
                         **kw) == want
  beams = decode.generate(model, params, char_tokenizer(), images, prompts, beam_size=3, **kw)
  assert all(len(b) < 6 and V + 1 not in b for b in beams)


def test_beam_size_one_is_greedy(setup):
  model, params, images, prompts = setup
  args = decode_args(model, params, images, prompts)
  greedy, g_score = decode.greedy_search(*args, max_new_tokens=6)
  beam, b_score = decode.beam_search(*args, max_new_tokens=6, beam_size=1, length_penalty=0.0)
  np.testing.assert_array_equal(beam, greedy)
  np.testing.assert_allclose(b_score, g_score, rtol=1e-5)


def test_beam_search_beats_or_ties_greedy_and_scores_are_true_logprobs(setup):
  model, params, images, prompts = setup
  args = decode_args(model, params, images, prompts, (-1,))
  # Over two steps the greedy path is always among the candidates, so beam search cannot lose to
  # it (over more steps a near-uniform random model can prune it; no guarantee exists there).
  _, g_score = decode.greedy_search(*args, max_new_tokens=2)
  _, b_score = decode.beam_search(*args, max_new_tokens=2, beam_size=3, length_penalty=0.0)
  assert (np.asarray(b_score) >= np.asarray(g_score) - 1e-5).all()
  beam, b_score = decode.beam_search(*args, max_new_tokens=6, beam_size=3, length_penalty=0.0)
  beam = np.asarray(beam).tolist()
  logp = logprobs(params, images, [p + b for p, b in zip(prompts, beam)])
  for b, prompt in enumerate(prompts):  # The returned score is the sequence's log-prob.
    want = sum(float(logp[b, len(prompt) - 1 + i, t]) for i, t in enumerate(beam[b]))
    np.testing.assert_allclose(b_score[b], want, rtol=1e-4)


def per_layer_shapes(tree):
  """Each stacked LM array's per-layer slice (params or cache): its dims in any order and as 2-D
  bitcasts, without dims of size 1."""
  shapes = set()
  for path, x in traverse_util.flatten_dict(tree, sep="/").items():
    layer = x.shape[lm_lib.stack_axes(path):]
    if lm_lib.stack_axes(path) and len(layer) >= 2:
      flat = [(layer[0], math.prod(layer[1:])), (math.prod(layer[:-1]), layer[-1])]
      shapes.update(tuple(d for d in dims if d != 1)
                    for dims in [*itertools.permutations(layer), *flat])
  return shapes


def loop_instructions(hlo, name_pattern, shapes):
  """Instructions of the decoding loop's body (and of the loops in it) whose name matches and
  whose f32 output, without dims of size 1, is in `shapes`."""
  computations, name = {}, None
  for line in hlo.splitlines():
    if (start := re.match(r"(ENTRY )?%(\S+) .*\{$", line)):
      name = "ENTRY" if start.group(1) else start.group(2)
      computations[name] = []
    elif line == "}":
      name = None
    elif name:
      computations[name].append(line)
  loops = [re.search(r"body=%([\w.\-]+)", l).group(1) for l in computations["ENTRY"]
           if " while(" in l]
  found, seen = [], set()
  while loops:
    body = loops.pop()
    seen.add(body)
    for line in computations[body]:
      loops += [b for b in re.findall(r"body=%([\w.\-]+)", line) if b not in seen]
      m = re.match(r"\s*(?:ROOT )?%(\S+) = f32\[([\d,]*)\]", line)
      if m and re.search(name_pattern, m.group(1)) and tuple(
          int(d) for d in m.group(2).split(",") if d and int(d) != 1) in shapes:
        found.append(line.strip()[:120])
  return found


# OpenFlamingo's placement splits the tiny LM's 4 layers into stacks of one (a plain layer, a
# group, the tail): JAX's scan keeps a stack of one as a loop unless asked to unroll it all.
@pytest.mark.parametrize("placement", ["paper", "open_flamingo"])
def test_unrolled_layers_decode_as_rolled_and_copy_no_weight_or_cache_per_step(setup, placement):
  _, _, images, prompts = setup
  model, params = tiny_setup(placement)
  args = decode_args(model, params, images, prompts, (-1,))
  unrolled = (lm_lib.LM(dataclasses.replace(model.lm, unroll_layers=True), decode=True),) + args[1:]
  for search in (decode.greedy_search, functools.partial(decode.beam_search, beam_size=3)):
    want, want_score = search(*args, max_new_tokens=6)
    got, got_score = search(*unrolled, max_new_tokens=6)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_score, want_score, rtol=1e-5)
  hlo = decode.greedy_search.lower(*unrolled, max_new_tokens=6).compile().as_text()
  # Each layer's weights are sliced out of their stacks before the loop, not at every step.
  assert not loop_instructions(hlo, "slice", per_layer_shapes(params["lm"]))
  # Each layer's cache is updated in place and read as stored (`layers.cache_layout`): no step
  # copies or transposes it.
  lm, _, visual, tokens = unrolled[:4]
  cache = decode._cache_shapes(lm, tokens.shape[0], tokens.shape[1] + 6, visual)
  assert not loop_instructions(hlo, "transpose|copy", per_layer_shapes(cache))


def test_decoding_compiles_with_eigen_matmuls_on_cpu_and_the_same_tokens(setup):
  """`decode.CPU_COMPILER_OPTIONS` reach both searches' compiles: XLA:CPU would hand their matmuls
  to YNNPACK (`__ynn_fusion`), they compile to Eigen's; tokens and scores do not change."""
  assert jax.default_backend() == "cpu"
  model, params, images, prompts = setup
  args = decode_args(model, params, images, prompts, (-1,))
  for search, static in ((decode.greedy_search, ("lm", "max_new_tokens", "controls")),
                         (decode.beam_search, ("lm", "max_new_tokens", "beam_size"))):
    xla_default = jax.jit(search.__wrapped__, static_argnames=static)
    compiled = {name: fn.lower(*args, max_new_tokens=5).compile()
                for name, fn in (("ours", search), ("xla_default", xla_default))}
    assert '"__ynn_fusion"' in compiled["xla_default"].as_text()
    assert '"__ynn_fusion"' not in compiled["ours"].as_text()
    (want, want_score), (got, got_score) = (compiled[n](*args[1:]) for n in ("xla_default", "ours"))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_score, want_score, rtol=1e-5)


def test_a_tied_head_decodes_with_xla_default_matmuls_on_cpu(setup):
  """Eigen's kernel reads a tied head's [V, D] table transposed, slower than YNNPACK's (a decoding
  step 1.8x slower at V=8192, benchmarks/RESULTS.md): a search whose LM ties its head to the
  input embeddings compiles as XLA chooses, an untied one with Eigen's."""
  model, params, images, prompts = setup
  lm, lm_params, *rest = decode_args(model, params, images, prompts, (-1,))
  tied = lm_lib.LM(dataclasses.replace(lm.cfg, tied_embeddings=True), decode=True)
  tied_params = {k: v for k, v in lm_params.items() if k not in ("lm_head", "new_lm_head")}
  assert decode.eigen_matmuls(lm) and not decode.eigen_matmuls(tied)
  for search in (decode.greedy_search, decode.beam_search):
    hlo = search.lower(tied, tied_params, *rest, max_new_tokens=3).compile().as_text()
    assert '"__ynn_fusion"' in hlo


def test_prompt_call_computes_the_head_at_the_last_position_only(setup):
  """The prompt's call needs the last position's logits only (`LM(..., last_only=True)`): its
  head's matmul has B rows, not B x P, and they equal the full forward's last logits."""
  model, params, images, prompts = setup
  args = decode_args(model, params, images, prompts, (-1,))
  lm_params, visual, tokens, media_idx = args[1:5]
  hlo = decode.greedy_search.lower(*args, max_new_tokens=3).compile().as_text()
  rows = [math.prod(int(d) for d in m.group(1).split(",")[:-1])
          for m in re.finditer(r"= f32\[([\d,]+)\]\S* [\w-]+\(.*op_name=\"([^\"]*)\"", hlo)
          if m.group(2).endswith("/lm_head/dot_general") and "while/body" not in m.group(2)]
  assert rows and all(r == tokens.shape[0] for r in rows), rows
  plain = lm_lib.LM(model.lm)
  full = plain.apply({"params": lm_params}, tokens, visual, media_idx)
  last = plain.apply({"params": lm_params}, tokens, visual, media_idx, last_only=True)
  np.testing.assert_allclose(last, full[:, -1:], rtol=1e-5, atol=1e-5)


def test_left_pad_and_context_error(setup):
  model, params, images, _ = setup
  tokens, media_idx, lengths = decode.left_pad([[1, V, 5], [1, 6]], 3, V, multiple=4)
  np.testing.assert_array_equal(tokens, [[3, 1, V, 5], [3, 3, 1, 6]])
  np.testing.assert_array_equal(media_idx, [[0, 0, 1, 1], [0, 0, 0, 0]])
  np.testing.assert_array_equal(lengths, [3, 2])
  with pytest.raises(ValueError, match="max_len"):
    decode.generate(model, params, char_tokenizer(), images, [[1, V, 5]] * 2, max_new_tokens=200)


def hf_processors():
  """transformers' logits processors, the definitions decode.Controls follows."""
  pytest.importorskip("torch")
  return pytest.importorskip("transformers")


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_and_repetition_penalty_equal_hugging_face(n):
  import torch  # pylint: disable=g-import-not-at-top
  hf = hf_processors()
  rng = np.random.default_rng(n)
  ids = rng.integers(0, 3, (4, 16))  # Few distinct ids: many repeated n-grams.
  logits = rng.normal(size=(4, 20)).astype(np.float32) * 3
  want = hf.NoRepeatNGramLogitsProcessor(n)(torch.tensor(ids), torch.tensor(logits)).numpy()
  got = decode.no_repeat_ngram(jnp.asarray(logits), jnp.asarray(ids), jnp.zeros(4, jnp.int32),
                               16, n)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  assert np.isinf(want).any() and not np.isinf(want).all()
  np.testing.assert_array_equal(np.where(np.isinf(want), 0, got), np.where(np.isinf(want), 0, want))
  seen = np.zeros(logits.shape, bool)
  seen[np.arange(4)[:, None], ids] = True
  want = hf.RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor(ids), torch.tensor(logits)).numpy()
  np.testing.assert_allclose(decode.repetition_penalty(logits, seen, 1.7), want, rtol=1e-6)


def test_no_repeat_ngram_skips_left_padding_and_unfilled_slots():
  """Row 1's pads (before start) and every slot from `length` on are not tokens."""
  history = jnp.array([[1, 2, 1, 2, 0, 0], [2, 1, 5, 1, 0, 0]])  # length 4: slots 4, 5 unfilled.
  got = decode.no_repeat_ngram(jnp.zeros((2, 8)), history, jnp.array([0, 2]), 4, 2)
  np.testing.assert_array_equal(np.isinf(got[0]), np.eye(8)[1].astype(bool))  # 2 1 then 2 -> 1.
  assert not np.isinf(got[1]).any()  # "2 1" of row 1 lies in its padding.


@pytest.mark.parametrize("k, p", [(1, 1.0), (5, 1.0), (0, 0.3), (0, 0.9), (7, 0.6)])
def test_top_k_and_top_p_equal_hugging_face(k, p):
  import torch  # pylint: disable=g-import-not-at-top
  hf = hf_processors()
  logits = np.random.default_rng(k).normal(size=(4, 30)).astype(np.float32) * 2
  want = torch.tensor(logits)
  got = jnp.asarray(logits)
  if k:
    want, got = hf.TopKLogitsWarper(k)(None, want), decode.top_k(got, k)
  if p < 1:
    want, got = hf.TopPLogitsWarper(p)(None, want), decode.top_p(got, p)
  want = want.numpy()
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  np.testing.assert_array_equal(np.where(np.isinf(want), 0, got), np.where(np.isinf(want), 0, want))


def test_greedy_with_repetition_controls_equals_hugging_face_on_full_forwards(setup):
  """In the cached loop, with left-padded prompts: the same tokens as HF's processors on full
  forwards of each row's real tokens."""
  import torch  # pylint: disable=g-import-not-at-top
  hf = hf_processors()
  model, params, images, prompts = setup
  controls = decode.Controls(repetition_penalty=1.8, no_repeat_ngram_size=2)
  out, _ = decode.greedy_search(*decode_args(model, params, images, prompts, (-1,)),
                                max_new_tokens=6, controls=controls)
  processors = hf.LogitsProcessorList([hf.RepetitionPenaltyLogitsProcessor(1.8),
                                       hf.NoRepeatNGramLogitsProcessor(2)])
  seqs = [list(p) for p in prompts]
  for _ in range(6):
    tokens = np.full((len(seqs), 16), 3, np.int32)
    for row, seq in zip(tokens, seqs):
      row[:len(seq)] = seq
    logits = full_forward()(params, images, tokens, model_utils.media_idx_from_tokens(tokens, V))
    for b, seq in enumerate(seqs):
      scores = torch.tensor(np.asarray(logits[b, len(seq) - 1]))[None]
      seq.append(int(processors(torch.tensor([seq]), scores).argmax()))
  assert np.asarray(out).tolist() == [s[len(p):] for s, p in zip(seqs, prompts)]
  plain, _ = decode.greedy_search(*decode_args(model, params, images, prompts, (-1,)),
                                  max_new_tokens=6)
  assert np.asarray(plain).tolist() != np.asarray(out).tolist()  # The controls did something.


def test_controls_out_of_range_are_named():
  for bad, field in ((dict(temperature=0.0), "temperature"), (dict(top_k=-1), "top_k"),
                     (dict(top_p=1.5), "top_p"), (dict(repetition_penalty=0.0),
                                                  "repetition_penalty"),
                     (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size")):
    with pytest.raises(ValueError, match=f"{field}="):
      decode.Controls(**bad)
