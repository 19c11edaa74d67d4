"""Documents of text and media -> Flamingo token sequences (paper §2.3, Appendix A.3).

The model consumes, per dataset, a batch with these fields (`build_sequence` makes one example; the
batch stacks them on a leading B axis):
  images     [B, N, T, H, W, 3] float32  media; T = 1 for still images; zeros where padded.
  tokens     [B, L] int32    text with <image> and <EOC> tokens, padded with pad_id.
  media_idx  [B, L] int32    1-based index of the last <image> at or before each token, 0 = none;
                             the <image> token itself carries its own index; 0 on padding.
  loss_mask  [B, L] float32  1 where tokens[:, t] is a target: the trainer's loss at t is that of
                             logits[:, t-1] predicting tokens[:, t], weighted by loss_mask[:, t].
                             0 for padding, BOS and <image> tokens.
  media_mask [B, N] bool     True for real media, False for padding.

Format: `<BOS>text0<EOC><image>text1<EOC>...<image>textN<EOC><EOS>`, the paper's
"<BOS>Cute pics of my pets!<EOC><image>My puppy sitting in the grass.<EOC><image>...". Every
non-empty text chunk is followed by <EOC> and an empty one emits nothing, so a document that opens
with an image reads `<BOS><image>text1<EOC>...` and a pair is `<BOS><image>caption<EOC><EOS>`.

Truncation keeps the first L tokens, and at most N media by cutting before the (N+1)-th <image>;
it then drops trailing <image> tokens (an image with no token after it conditions nothing) and the
media after the last kept <image>. A truncated sequence has no <EOS>.

M3W's p_next: with probability p_next the whole document attaches each text chunk to the *next*
image instead of the previous one: [t0, I1, t1, ..., IN, tN] is laid out as
[I1, t0, I2, t1, ..., IN, t(N-1), tN], so each chunk's tokens see (via media_idx) the image that
follows it in the source. The last chunk has no next image and stays after IN.
"""
from typing import Sequence

import numpy as np

from flamingo_jax.data import tokenizer as tokenizer_lib

_IMAGE = -1  # Marks a media item in a document's layout; texts are their chunk indices.


def _layout(num_media: int, attach_next: bool) -> list[int]:
  """Order of text chunks (by index) and media (`_IMAGE`) in the sequence."""
  if not attach_next:
    return [0] + [x for k in range(1, num_media + 1) for x in (_IMAGE, k)]
  return [x for k in range(1, num_media + 1) for x in (_IMAGE, k - 1)] + [num_media]


def build_sequence(texts: Sequence[str | bytes], media: np.ndarray,
                   tokenizer: tokenizer_lib.Tokenizer, *, max_len: int, max_media: int,
                   p_next: float = 0.0,
                   rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
  """One document -> the batch fields above (without B).

  Args:
    texts: N + 1 chunks: texts[0] precedes the first media item, texts[i] follows item i.
    media: [N, T, H, W, C] the document's media in order (T frames; 1 for still images).
    tokenizer: supplies the text ids and the special tokens.
    max_len: L, the sequence length; at least 3 (<BOS>, <image>, one text token).
    max_media: N of the output, the most media kept.
    p_next: probability of attaching text to the next image (M3W augmentation); needs `rng`.
    rng: the example's generator (drawn from only when p_next > 0).
  """
  media = np.asarray(media)
  if media.ndim != 5:
    raise ValueError(f"media must be [N, T, H, W, C]; got shape {media.shape}.")
  num_media = media.shape[0]
  if len(texts) != num_media + 1:
    raise ValueError(
        f"document has {num_media} media but {len(texts)} text chunks; expected "
        f"{num_media + 1}: one before the first <image> and one after each.")
  if max_len < 3:
    raise ValueError(f"max_len={max_len} is too small: a sequence needs at least 3 tokens "
                     "(<BOS>, <image> and one text token).")
  if max_media < 1:
    raise ValueError(f"max_media={max_media}; expected at least 1.")
  if not 0.0 <= p_next <= 1.0:
    raise ValueError(f"p_next={p_next}; expected a probability in [0, 1].")
  if p_next > 0 and rng is None:
    raise ValueError(f"p_next={p_next} needs the example's rng.")
  chunks = [tokenizer.encode(t) for t in texts]
  if not any(chunks):
    raise ValueError(f"empty document: its {len(texts)} text chunks have no tokens.")

  tokens, media_idx, loss_mask = [tokenizer.bos_id], [0], [0.0]
  count = 0
  for item in _layout(num_media, attach_next=p_next > 0 and rng.random() < p_next):
    if item == _IMAGE:
      count += 1
      tokens.append(tokenizer.image_id)
      media_idx.append(count)
      loss_mask.append(0.0)
    elif chunks[item]:
      ids = chunks[item] + [tokenizer.eoc_id]
      tokens += ids
      media_idx += [count] * len(ids)
      loss_mask += [1.0] * len(ids)
  tokens.append(tokenizer.eos_id)
  media_idx.append(count)
  loss_mask.append(1.0)

  cut = min(len(tokens), max_len)
  if num_media > max_media:
    cut = min(cut, media_idx.index(max_media + 1))
  while tokens[cut - 1] == tokenizer.image_id:
    cut -= 1
  kept = media_idx[cut - 1]

  out_tokens = np.full([max_len], tokenizer.pad_id, np.int32)
  out_idx = np.zeros([max_len], np.int32)
  out_mask = np.zeros([max_len], np.float32)
  out_tokens[:cut], out_idx[:cut], out_mask[:cut] = tokens[:cut], media_idx[:cut], loss_mask[:cut]
  images = np.zeros([max_media, *media.shape[1:]], media.dtype)
  images[:kept] = media[:kept]
  return {"images": images, "tokens": out_tokens, "media_idx": out_idx, "loss_mask": out_mask,
          "media_mask": np.arange(max_media) < kept}
