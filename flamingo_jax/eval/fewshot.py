"""Few-shot evaluation (paper §3, App. B.1.5): k-shot prompts, random or RICES support selection,
open-ended tasks by generation and close-ended tasks by log-likelihood ranking.

A k-shot prompt is `<BOS>(<image>shot<EOC>)×k<image>query` (interleave.py's format, left open for
the answer). Zero-shot follows the paper: two text-only shots, then the query with its image.
`data` is {'train': support examples, 'test': queries} as numpy dicts ('image', 'captions' or
'question'/'answers'). Tasks that use these pieces are registered by name in tasks.py: the demo's
(TEMPLATES' wording, which its shapes data were trained on) and the published benchmarks'
(protocol.py, whose prompt texts carry their <image>/<EOC> tags and go through `prompt_ids`).
"""
import collections
import functools
import logging
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.eval import decode
from flamingo_jax.eval import metrics
from flamingo_jax.models import lm as lm_lib
from flamingo_jax.models import losses

SHOTS = (0, 4, 8, 16, 32)
ZERO_SHOT_TEXTS = 2  # Text-only examples in a zero-shot prompt (paper §3).
EOC_TAGS = ("<EOC>", "<|endofchunk|>")  # <EOC> in prompt texts: ours, OpenFlamingo's.
TEMPLATES = {  # task: (shot, query); fields from `_fields`.
    "captioning": ("Output: {caption}", "Output:"),
    "vqa": ("Question: {question} Short answer: {answer}", "Question: {question} Short answer:"),
}


def template_corpus() -> list[str]:
  """The prompts' own words, fields left empty (e.g. 'Question:  Short answer:'): a tokenizer
  trained on the data's text alone would map their capitals to <unk>."""
  return [t.format_map(collections.defaultdict(str)) for pair in TEMPLATES.values() for t in pair]


def text(value) -> str:
  """A TFDS text field (bytes) or str as str."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _fields(task: str, example: dict) -> dict[str, str]:
  if task == "captioning":
    return {"caption": text(example["captions"][0])}
  return {"question": text(example["question"]), "answer": text(example["answers"][0])}


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [-1, 1], as the training pp's value_range(-1, 1)."""
  return np.asarray(images, np.float32) / 127.5 - 1.0


def build_prompt(tokenizer, shots: Sequence[str], query: str,
                 shot_images: bool = True) -> list[int]:
  """<BOS>(<image>shot<EOC>)*<image>query ids; shot_images=False drops the shots' <image>.

  <BOS> is the tokenizer's prefix: none for a model trained without one (OpenFlamingo-MPT)."""
  ids = list(tokenizer.prefix)
  for text in shots:
    ids += [tokenizer.image_id] * shot_images + tokenizer.encode(text) + [tokenizer.eoc_id]
  return ids + [tokenizer.image_id] + tokenizer.encode(query)


def prompt_ids(tokenizer, text: str) -> list[int]:
  """The prefix, then `text` with its tags as their ids: the image tag, and "<EOC>",
  OpenFlamingo's "<|endofchunk|>" and the tokenizer's own end-of-chunk string as <EOC>. The text
  between tags is encoded piece by piece, as build_prompt does and as HF tokenizers split on
  their special tokens."""
  tags = {tokenizer.image_token: tokenizer.image_id,
          **dict.fromkeys((*EOC_TAGS, tokenizer.eoc_token), tokenizer.eoc_id)}
  ids = list(tokenizer.prefix)
  for piece in re.split("(" + "|".join(map(re.escape, tags)) + ")", text):
    ids += [tags[piece]] if piece in tags else tokenizer.encode(piece) if piece else []
  return ids


def random_support(rng: np.random.Generator, num_support: int, num_queries: int,
                   k: int) -> np.ndarray:
  """[Q, k] distinct support indices drawn independently for each query."""
  return np.stack([rng.choice(num_support, k, replace=False) for _ in range(num_queries)])


def rices_support(support_emb, query_emb, k: int) -> np.ndarray:
  """RICES: the k supports most cosine-similar to each query, [Q, k], the most similar LAST."""
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  sim = unit(np.asarray(query_emb)) @ unit(np.asarray(support_emb)).T  # [Q, S]
  return np.argsort(sim, axis=1, kind="stable")[:, -k:]


@functools.partial(jax.jit, static_argnums=0)
def _embed(model, params, images):
  def pooled(m, x):  # NFNet gives a grid [M, h, w, C], a ViT tokens [M, S, C].
    features = m.vision_encoder(x, train=False)
    return features.reshape(features.shape[0], -1, features.shape[-1]).mean(axis=1)
  return model.apply({"params": params}, images, method=pooled)


def image_embeddings(model, params, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """images [M, H, W, 3] -> mean-pooled frozen vision-encoder features [M, C] (for RICES)."""
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]),
                                             chunk.dtype)])  # One shape, one compile.
    out.append(np.asarray(_embed(model, params, padded))[:len(chunk)])
  return np.concatenate(out)


@functools.partial(jax.jit, static_argnames="lm")
def sequence_logprob(lm: lm_lib.LM, params, visual, tokens, media_idx, target_mask):
  """Sum over t of log p(tokens[t] | tokens[<t]) where target_mask[t]: [B]. Right-padded rows."""
  logits = lm.apply({"params": params}, tokens, visual, media_idx)  # [B, L, V]
  return (losses.next_token_logprobs(logits, tokens) * target_mask[:, 1:]).sum(-1)


def continuations(tokenizer, prompt: Sequence[int], conts: Sequence[Sequence[int]],
                  pad_multiple: int = 16):
  """(tokens, media_idx, target mask) [len(conts), W]: `prompt` + each continuation (see
  `pair_tokens`)."""
  return pair_tokens(tokenizer, [(prompt, cont) for cont in conts], pad_multiple)


def pair_tokens(tokenizer, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                pad_multiple: int = 16):
  """(tokens, media_idx, target mask) [len(pairs), W]: each prompt + its continuation,
  right-padded to a multiple of pad_multiple (few widths, few compiles); the mask marks the
  continuation."""
  width = -(-max(len(p) + len(c) for p, c in pairs) // pad_multiple) * pad_multiple
  tokens = np.full((len(pairs), width), tokenizer.pad_id, np.int32)
  target = np.zeros(tokens.shape, np.float32)
  for row, (prompt, cont) in enumerate(pairs):
    tokens[row, :len(prompt) + len(cont)] = list(prompt) + list(cont)
    target[row, len(prompt):len(prompt) + len(cont)] = 1.0
  return tokens, np.cumsum(tokens == tokenizer.image_id, axis=1).astype(np.int32), target


def score_continuations(model, params, tokenizer, prompts: Sequence[Sequence[int]], images,
                        conts: Sequence[Sequence[int]], normalize: bool = False,
                        pad_multiple: int = 64) -> np.ndarray:
  """Log-likelihood of each continuation after each prompt: [Q, C]; the mean per token with
  `normalize` (OpenFlamingo's rank classification, normalize_length=True), else the sum.

  prompts: Q id lists (their shots drawn per query, so their lengths vary: a coarse pad_multiple
  keeps the compiles few); images [Q, N, T, H, W, 3] each prompt's media in order.
  """
  pairs = [(p, c) for p in prompts for c in conts]
  tokens, media_idx, target = pair_tokens(tokenizer, pairs, pad_multiple)
  visual = jnp.repeat(decode.visual_tokens(model, params, images), len(conts), axis=0)
  scores = sequence_logprob(lm_lib.LM(model.lm), params["lm"], visual, tokens, media_idx, target)
  scores = np.asarray(scores).reshape(len(prompts), len(conts))
  return scores / np.array([len(c) for c in conts]) if normalize else scores


def score_choices(model, params, tokenizer, shot_texts: Sequence[str], shot_visual, query_visual,
                  choices: Sequence[str], template: str, pad_multiple: int = 16) -> np.ndarray:
  """Log-likelihood of each query's continuation template.format(choice) + <EOC>: [Q, C].

  shot_visual [k, R, D]: the shots' visual tokens (k = 0: text-only shots); query_visual [Q, R, D].
  """
  k, q = len(shot_visual), len(query_visual)
  if k and k != len(shot_texts):
    raise ValueError(f"score_choices: {len(shot_texts)} shot texts but {k} shot images.")
  prompt = build_prompt(tokenizer, shot_texts, "", shot_images=k > 0)
  conts = [tokenizer.encode(template.format(c)) + [tokenizer.eoc_id] for c in choices]
  tokens, media_idx, target = continuations(tokenizer, prompt, conts * q, pad_multiple)
  shots = jnp.broadcast_to(shot_visual, (q, *shot_visual.shape))  # [Q, k, R, D]
  visual = jnp.concatenate([shots, query_visual[:, None]], 1)  # [Q, k + 1, R, D]
  visual = jnp.repeat(visual, len(choices), axis=0)  # [Q * C, k + 1, R, D]
  scores = sequence_logprob(lm_lib.LM(model.lm), params["lm"], visual, tokens, media_idx, target)
  return np.asarray(scores).reshape(q, len(choices))


def shot_count(k: int) -> int:
  """Shots in a k-shot prompt: k, or the paper's text-only examples at k = 0."""
  return k or ZERO_SHOT_TEXTS


def choose_support(selection: str, rng: np.random.Generator, num_support: int, num_queries: int,
                   n: int, embeddings=None) -> np.ndarray:
  """[Q, n] support indices per query: at random (`rng`) or by RICES on (support, query)
  `embeddings` (the most similar last)."""
  if selection == "rices":
    return rices_support(*embeddings, n)
  return random_support(rng, num_support, num_queries, n)


def fits(model, prompts: Sequence[Sequence[int]], extra: int) -> bool:
  """Whether every prompt plus `extra` tokens fits the LM's context."""
  return max(map(len, prompts)) + extra <= model.lm.max_len


def generate_texts(model, params, tokenizer, prompts: Sequence[Sequence[int]],
                   media: Callable[[Sequence[int]], np.ndarray], *, batch_size: int,
                   beam_size: int, max_new_tokens: int, length_penalty: float = 1.0) -> list[str]:
  """Generated text per prompt, batch_size prompts at a time; media(rows) -> those rows' images
  [B, N, T, H, W, 3]."""
  out = []
  for start in range(0, len(prompts), batch_size):
    rows = range(start, min(start + batch_size, len(prompts)))
    ids = decode.generate(model, params, tokenizer, media(rows), [prompts[i] for i in rows],
                          max_new_tokens=max_new_tokens, beam_size=beam_size,
                          length_penalty=length_penalty)
    out += [tokenizer.decode(x, skip_special=True).strip() for x in ids]
  return out


def evaluate_open_ended(task: str, model, params, tokenizer, data, shots: Sequence[int] = SHOTS,
                        *, selection: str = "random", seed: int = 0, batch_size: int = 8,
                        beam_size: int = 3, max_new_tokens: int = 20,
                        preprocess: Callable = to_model_range) -> dict[str, float]:
  """Captioning (CIDEr-D) or VQA (VQA accuracy) by generation, per k.

  Supports come from data['train'], chosen per query at random or by RICES (`selection`); k that
  do not fit the LM's context or the support set are left out (logged). Generations are cut as
  OpenFlamingo's eval cuts them (metrics.postprocess_*: the text before the model's next turn).
  """
  if task not in TEMPLATES:
    raise ValueError(f"task={task!r}; expected one of {sorted(TEMPLATES)}.")
  if selection not in ("random", "rices"):
    raise ValueError(f"selection={selection!r}; expected 'random' or 'rices'.")
  support, queries = list(data["train"]), list(data["test"])
  shot_fmt, query_fmt = TEMPLATES[task]
  shot_texts = [shot_fmt.format(**_fields(task, ex)) for ex in support]
  query_texts = [query_fmt.format(**_fields(task, ex)) for ex in queries]
  images = lambda examples: preprocess(np.stack([ex["image"] for ex in examples]))
  embeddings = None
  if selection == "rices":
    embeddings = (image_embeddings(model, params, images(support)),
                  image_embeddings(model, params, images(queries)))
  rng = np.random.default_rng(seed)
  name = "cider" if task == "captioning" else "vqa_accuracy"
  results = {}
  for k in shots:
    n = shot_count(k)
    if n > len(support):
      logging.info("%s: %d-shot left out: only %d support examples.", task, k, len(support))
      continue
    chosen = choose_support(selection, rng, len(support), len(queries), n, embeddings)
    prompts = [build_prompt(tokenizer, [shot_texts[j] for j in chosen[i]], query_texts[i], k > 0)
               for i in range(len(queries))]
    if not fits(model, prompts, max_new_tokens):
      logging.info("%s: %d-shot left out: prompts exceed max_len.", task, k)
      continue
    media = lambda rows: np.stack([  # [B, k + 1, 1, H, W, 3]
        images([support[j] for j in chosen[i]][:k] + [queries[i]]) for i in rows])[:, :, None]
    predictions = generate_texts(model, params, tokenizer, prompts, media, batch_size=batch_size,
                                 beam_size=beam_size, max_new_tokens=max_new_tokens)
    if task == "captioning":
      refs = [[metrics.ptb_tokenize(text(c)) for c in ex["captions"]] for ex in queries]
      results[f"{name}/{k}shot"] = metrics.cider_d(
          [metrics.ptb_tokenize(metrics.postprocess_caption(p)) for p in predictions], refs)[0]
    else:
      results[f"{name}/{k}shot"] = float(np.mean([
          vqa_score(metrics.postprocess_vqa(p), [text(a) for a in ex["answers"]])
          for p, ex in zip(predictions, queries)]))
  return results


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
  """VQA accuracy against the human answers; with a single reference answer (the demo's synthetic
  questions) exact match after the official normalisation, since the official formula scores a
  prediction by the *other* annotators who agree and so gives 0 to every single-answer question."""
  if len(answers) == 1:
    normalise = metrics.normalize_vqa_answer
    return float(normalise(prediction) == normalise(answers[0]))
  return metrics.vqa_accuracy(prediction, answers)
