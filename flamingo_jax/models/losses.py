"""The next-token log-likelihood, one definition for training (the loss) and for scoring (few-shot
ranking, the copying probe), so the two can never disagree on shifting, masking or precision."""
import jax
import jax.numpy as jnp


def next_token_logprobs(logits, tokens):
  """log p(tokens[:, t] | logits[:, t-1]) in float32: [B, L, V], [B, L] -> [B, L-1].

  `jax.nn.log_softmax`'s arithmetic, taken at the target only: the target's shifted logit is a
  select-and-sum, whose gradient XLA fuses into the softmax's, where `take_along_axis` scattered
  into a [B, L, V] buffer; and no [B, L-1, V] slice of the logits or log-probabilities is made
  (the last position's value, which has no target, is dropped after). Same values and gradients.
  """
  logits = logits.astype(jnp.float32)
  shifted = logits - jax.lax.stop_gradient(jnp.max(logits, -1, keepdims=True))
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))[..., None]
  target = jnp.sum(jnp.where(targets == jnp.arange(logits.shape[-1]), shifted, 0.0), -1)
  return (target - jnp.log(jnp.sum(jnp.exp(shifted), -1)))[:, :-1]


def next_token_nll(logits, tokens, loss_mask):
  """Sum of -log p(tokens[:, t] | logits[:, t-1]) weighted by loss_mask[:, t]. [B, L, V] -> []."""
  return -jnp.sum(next_token_logprobs(logits, tokens) * loss_mask[:, 1:])
