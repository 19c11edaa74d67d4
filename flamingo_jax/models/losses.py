"""The next-token log-likelihood, one definition for training (the loss) and for scoring (few-shot
ranking, the copying probe), so the two can never disagree on shifting, masking or precision."""
import jax
import jax.numpy as jnp


def next_token_logprobs(logits, tokens):
  """log p(tokens[:, t] | logits[:, t-1]) in float32: [B, L, V], [B, L] -> [B, L-1]."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def next_token_nll(logits, tokens, loss_mask):
  """Sum of -log p(tokens[:, t] | logits[:, t-1]) weighted by loss_mask[:, t]. [B, L, V] -> []."""
  return -jnp.sum(next_token_logprobs(logits, tokens) * loss_mask[:, 1:])
