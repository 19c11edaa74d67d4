"""The in-context copying probe (eval/copying.py) on hand-built LMs whose answers are known."""
import numpy as np
import pytest

from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.eval import copying

V = 24


def tokenizer():
  return tokenizer_lib.Tokenizer(
      vocab_size=V, new_tokens=(tokenizer_lib.IMAGE, tokenizer_lib.EOC), bos_id=1, eos_id=2,
      pad_id=3, _encode=lambda s: [], _decode=lambda ids, skip: "")


def uniform_lm(tokens):
  return np.zeros((*tokens.shape, V + 2))


def copying_lm(tokens):
  """Predicts, from the second copy's first token on, the token that followed it last time."""
  length = (tokens.shape[1] - 1) // 2
  logits = np.zeros((*tokens.shape, V + 2))
  for t in range(length + 1, tokens.shape[1] - 1):
    logits[np.arange(len(tokens)), t, tokens[:, t + 1 - length]] = 60.0
  return logits


def test_repeated_tokens():
  tokens = copying.repeated_tokens(np.random.default_rng(0), 5, 7, [4, 9, 11], bos_id=1)
  assert tokens.shape == (5, 15) and tokens.dtype == np.int32
  assert (tokens[:, 0] == 1).all()
  np.testing.assert_array_equal(tokens[:, 1:8], tokens[:, 8:])
  assert set(np.unique(tokens[:, 1:])) <= {4, 9, 11}


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_seqs=2, length=5, ids=[4]), "at least 2"),
    (dict(num_seqs=2, length=1, ids=[4, 5]), "length=1"),
    (dict(num_seqs=0, length=5, ids=[4, 5]), "num_seqs=0"),
])
def test_repeated_tokens_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    copying.repeated_tokens(np.random.default_rng(0), bos_id=1, **kwargs)


def test_probe_separates_a_copying_lm_from_one_that_does_not_copy():
  ids = V - len(tokenizer().special_ids & set(range(V)))  # BOS, EOS, PAD are not drawn.
  uniform = copying.evaluate(uniform_lm, tokenizer(), num_seqs=4, length=10)
  np.testing.assert_allclose(
      [uniform["first_copy_nll"], uniform["second_copy_nll"], uniform["uniform_nll"]],
      np.log([V + 2, V + 2, ids]), rtol=1e-6)
  assert uniform["copy_gain"] == pytest.approx(0.0, abs=1e-9)
  copier = copying.evaluate(copying_lm, tokenizer(), num_seqs=4, length=10)
  assert copier["second_copy_nll"] < 1e-6
  assert copier["first_copy_nll"] == pytest.approx(np.log(V + 2))
  assert copier["copy_gain"] == pytest.approx(np.log(V + 2))
