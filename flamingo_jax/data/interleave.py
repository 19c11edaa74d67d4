"""Documents of text and media -> Flamingo token sequences (paper §2.3, §2.4, Appendix A.3).

The model consumes, per dataset, a batch with these fields (`build_sequence` makes one example; the
batch stacks them on a leading B axis):
  images     [B, N, T, H, W, 3] float32  media; T = 1 for still images; zeros where padded.
  tokens     [B, L] int32    text with <image> and <EOC> tokens, padded with pad_id.
  media_idx  [B, L] int32    1-based index of the image each token attends to (the paper's φ),
                             0 = none; 0 on padding.
  loss_mask  [B, L] float32  1 where tokens[:, t] is a target: the trainer's loss at t is that of
                             logits[:, t-1] predicting tokens[:, t], weighted by loss_mask[:, t].
                             0 for padding, BOS and <image> tokens.
  media_mask [B, N] bool     True for real media, False for padding.

Format: `<BOS>text0<EOC><image>text1<EOC>...<image>textN<EOC><EOS>`, the paper's
"<BOS>Cute pics of my pets!<EOC><image>My puppy sitting in the grass.<EOC><image>...". Every
non-empty text chunk is followed by <EOC> and an empty one emits nothing, so a document that opens
with an image reads `<BOS><image>text1<EOC>...` and a pair is `<BOS><image>caption<EOC><EOS>`.

Window: <BOS> then L - 1 consecutive tokens of the document: its first ones (pairs, video, eval),
or with `random_window` a window starting anywhere (M3W: "a random subsequence of L = 256
tokens"). A cut sequence has no <EOS>. The first `max_media` <image> tags in the window keep their
media; "further images are discarded": their tags stay (the window is the document's tokens as
they are) but no token attends to them (OpenFlamingo writes no tag for them, so their text sees
the last kept image: another image's). A trailing <image> that no token attends to is dropped,
with its media (an image with nothing after it conditions nothing).

φ: the window's <image> tags split it into chunks, chunk k running from tag k to before tag k + 1
(<BOS> and any text before the first tag are chunk 0). A token attends to its chunk's image k, so
text before the first image in the window sees none. With M3W's p_next, drawn once per document,
every token attends to the image *after* its chunk (k + 1) instead: only φ changes, never the
tokens. Either way a chunk whose image is discarded or outside the window attends to nothing.
"""
from typing import Sequence

import numpy as np

from flamingo_jax.data import tokenizer as tokenizer_lib


def build_sequence(texts: Sequence[str | bytes], media: np.ndarray,
                   tokenizer: tokenizer_lib.Tokenizer, *, max_len: int, max_media: int,
                   p_next: float = 0.0, random_window: bool = False,
                   rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
  """One document -> the batch fields above (without B).

  Args:
    texts: N + 1 chunks: texts[0] precedes the first media item, texts[i] follows item i.
    media: [N, T, H, W, C] the document's media in order (T frames; 1 for still images).
    tokenizer: supplies the text ids and the special tokens.
    max_len: L, the sequence length; at least 3 (<BOS>, <image>, one text token).
    max_media: N of the output, the most media kept.
    p_next: probability that the document's tokens attend to the next image (M3W); needs `rng`.
    random_window: cut a longer document at a random start instead of its first tokens; needs
      `rng`.
    rng: the example's generator (drawn from only for p_next > 0 or random_window).
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
  if (p_next > 0 or random_window) and rng is None:
    raise ValueError(f"p_next={p_next}, random_window={random_window} needs the example's rng.")
  chunks = [tokenizer.encode(t) for t in texts]
  if not any(chunks):
    raise ValueError(f"empty document: its {len(texts)} text chunks have no tokens.")

  # The document after <BOS>; media_of: the 1-based media item of each <image> tag, else 0.
  body, media_of = [], []
  for k, ids in enumerate(chunks):
    if k:
      body.append(tokenizer.image_id)
      media_of.append(k)
    if ids:
      body += ids + [tokenizer.eoc_id]
      media_of += [0] * (len(ids) + 1)
  body.append(tokenizer.eos_id)
  media_of.append(0)

  prefix = tokenizer.prefix  # <BOS>, or nothing for an LM trained without (tokenizer.py).
  span = max_len - len(prefix)
  start = 0
  if random_window and len(body) > span:
    start = int(rng.integers(len(body) - span + 1))
  tokens = np.array(prefix + body[start:start + span], np.int32)
  media_of = np.array([0] * len(prefix) + media_of[start:start + span])
  attach_next = p_next > 0 and rng.random() < p_next

  is_tag = media_of > 0
  chunk = np.cumsum(is_tag)  # Tag k opens chunk k; <BOS> is in chunk 0.
  kept = min(int(is_tag.sum()), max_media)
  target = chunk + int(attach_next)
  media_idx = np.where((target >= 1) & (target <= kept), target, 0)
  cut = len(tokens)
  while is_tag[cut - 1] and chunk[cut - 1] not in media_idx[:cut - 1]:
    cut -= 1
  kept = int(media_idx[:cut].max())  # The attended images are 1..kept.

  out_tokens = np.full([max_len], tokenizer.pad_id, np.int32)
  out_idx = np.zeros([max_len], np.int32)
  out_mask = np.zeros([max_len], np.float32)
  out_tokens[:cut], out_idx[:cut] = tokens[:cut], media_idx[:cut]
  out_mask[1:cut] = ~is_tag[1:cut]
  images = np.zeros([max_media, *media.shape[1:]], media.dtype)
  images[:kept] = media[media_of[is_tag][:kept] - 1]
  return {"images": images, "tokens": out_tokens, "media_idx": out_idx, "loss_mask": out_mask,
          "media_mask": np.arange(max_media) < kept}
