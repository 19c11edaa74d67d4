"""In-context copying of a plain LM: the capacity Flamingo's frozen LM must bring to few-shot tasks.

Flamingo keeps the LM frozen, so its few-shot learning is the LM's: to name a shape from the
support examples, the LM has to find the earlier example and copy what followed it, which is what
induction heads do (Olsson et al., 2022, "In-context Learning and Induction Heads"). Their probe:
a random token sequence repeated once. An LM that copies in context predicts the second copy far
better than the first; one that does not scores both near ln(number of tokens drawn from).
`launch.py --mode=eval` runs it for `model_name='lm'` (the demo's stage 2).
"""
from typing import Callable, Sequence

import numpy as np

from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.models import losses

# logits_fn: tokens [B, L] int32 -> logits [B, L, V] (next-token scores at every position).
LogitsFn = Callable[[np.ndarray], np.ndarray]


def repeated_tokens(rng: np.random.Generator, num_seqs: int, length: int, ids: Sequence[int],
                    bos_id: int) -> np.ndarray:
  """[num_seqs, 1 + 2·length]: BOS, `length` ids drawn uniformly from `ids`, then them again."""
  if len(ids) < 2:
    raise ValueError(f"ids has {len(ids)} tokens to draw from; expected at least 2.")
  if length < 2 or num_seqs < 1:
    raise ValueError(f"length={length}, num_seqs={num_seqs}; expected length >= 2, num_seqs >= 1.")
  seqs = rng.choice(np.asarray(ids), size=(num_seqs, length))
  return np.concatenate([np.full((num_seqs, 1), bos_id), seqs, seqs], axis=1).astype(np.int32)


def repeat_nll(logits_fn: LogitsFn, tokens: np.ndarray) -> dict[str, float]:
  """Mean next-token NLL over the first and the second copy of `repeated_tokens` sequences.

  The first copy's first token is left out (it follows BOS, not a random token) and so is the
  second copy's, which no copying can predict either.
  """
  length = (tokens.shape[1] - 1) // 2
  logits = logits_fn(tokens)
  position = np.arange(tokens.shape[1])
  result = {}
  for name, start in (("first_copy_nll", 2), ("second_copy_nll", length + 2)):
    mask = (position >= start) & (position < start + length - 1)  # Target positions.
    mask = np.broadcast_to(mask, tokens.shape).astype(np.float32)
    result[name] = float(losses.next_token_nll(logits, tokens, mask) / mask.sum())
  return result


def evaluate(logits_fn: LogitsFn, tokenizer: tokenizer_lib.Tokenizer, *, num_seqs: int = 16,
             length: int = 40, seed: int = 0) -> dict[str, float]:
  """The probe over the tokenizer's ordinary (non-special) ids.

  Returns the first/second-copy NLLs, `uniform_nll` = ln(number of ids) beside them, and
  `copy_gain` = first - second (nats per token; 0 = no in-context copying).
  """
  ids = tokenizer.text_ids
  tokens = repeated_tokens(np.random.default_rng(seed), num_seqs, length, ids, tokenizer.bos_id)
  result = repeat_nll(logits_fn, tokens)
  result["uniform_nll"] = float(np.log(len(ids)))
  result["copy_gain"] = result["first_copy_nll"] - result["second_copy_nll"]
  return result
