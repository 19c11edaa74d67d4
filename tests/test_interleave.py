"""Golden tests of the Flamingo sequence format, windows, discarded images and the M3W p_next
augmentation (which image each token attends to, φ)."""
import dataclasses

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from flamingo_jax.data import interleave
from flamingo_jax.data import tokenizer as tokenizer_lib

WORDS = ["[UNK]", "Cute", "pics", "of", "my", "pets", "!", "My", "puppy", "sitting", "in", "the",
         "grass", ".", "cat", "looking", "very", "dignified"]
IMG, EOC, BOS, EOS, PAD = 18, 19, 20, 21, 22  # Added after the 18 words.
# The paper's example document (§2.3).
PETS = ["Cute pics of my pets!", "My puppy sitting in the grass.", "My cat looking very dignified."]
T0, T1, T2 = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13], [7, 14, 15, 16, 17, 13]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  hf = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, "[UNK]"))
  hf.pre_tokenizer = pre_tokenizers.Whitespace()
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  hf.save(str(path))
  tok = tokenizer_lib.load_tokenizer(str(path))
  assert (tok.image_id, tok.eoc_id, tok.bos_id, tok.eos_id, tok.pad_id) == (IMG, EOC, BOS, EOS, PAD)
  return tok


def _media(n, t=1):
  """n media items whose pixels equal their 1-based index."""
  return np.arange(1, n + 1, dtype=np.float32).reshape(n, 1, 1, 1, 1) * np.ones([n, t, 2, 2, 3])


def _build(tok, texts, n, **kw):
  kw = {"max_len": 32, "max_media": 3, **kw}
  return interleave.build_sequence(texts, _media(n), tok, **kw)


def test_paper_document(tok):
  out = _build(tok, PETS, 2)
  tokens = [BOS, *T0, EOC, IMG, *T1, EOC, IMG, *T2, EOC, EOS]
  np.testing.assert_array_equal(out["tokens"], tokens + [PAD] * (32 - len(tokens)))
  np.testing.assert_array_equal(out["media_idx"], [0] * 8 + [1] * 9 + [2] * 9 + [0] * 6)
  np.testing.assert_array_equal(
      out["loss_mask"], [0] + [1] * 7 + [0] + [1] * 8 + [0] + [1] * 8 + [0] * 6)
  np.testing.assert_array_equal(out["media_mask"], [True, True, False])
  np.testing.assert_array_equal(out["images"][:, 0, 0, 0, 0], [1, 2, 0])
  assert out["tokens"].dtype == np.int32 and out["media_idx"].dtype == np.int32
  assert out["loss_mask"].dtype == np.float32 and out["images"].shape == (3, 1, 2, 2, 3)
  assert tok.decode(out["tokens"]) == (
      "<BOS>Cute pics of my pets !<EOC><image>My puppy sitting in the grass .<EOC><image>My cat "
      "looking very dignified .<EOC><EOS>" + "<PAD>" * 6)


def test_pair_and_empty_first_chunk(tok):
  out = _build(tok, ["", "My puppy"], 1, max_len=8, max_media=1)
  np.testing.assert_array_equal(out["tokens"], [BOS, IMG, 7, 8, EOC, EOS, PAD, PAD])
  np.testing.assert_array_equal(out["media_idx"], [0, 1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(out["loss_mask"], [0, 0, 1, 1, 1, 1, 0, 0])


def test_empty_middle_chunk_emits_nothing(tok):
  out = _build(tok, ["", "", "My cat"], 2, max_len=7)
  np.testing.assert_array_equal(out["tokens"], [BOS, IMG, IMG, 7, 14, EOC, EOS])
  np.testing.assert_array_equal(out["media_idx"], [0, 1, 2, 2, 2, 2, 2])


def test_video_is_one_media_item_of_t_frames(tok):
  out = interleave.build_sequence(["", "My cat"], _media(1, t=4), tok, max_len=8, max_media=1)
  assert out["images"].shape == (1, 4, 2, 2, 3)
  np.testing.assert_array_equal(out["tokens"][:5], [BOS, IMG, 7, 14, EOC])


def test_truncation_keeps_an_image_with_a_token_after_it(tok):
  out = _build(tok, PETS, 2, max_len=10)
  np.testing.assert_array_equal(out["tokens"], [BOS, *T0, EOC, IMG, 7])  # No EOS when cut.
  np.testing.assert_array_equal(out["media_idx"], [0] * 8 + [1, 1])
  np.testing.assert_array_equal(out["media_mask"], [True, False, False])
  np.testing.assert_array_equal(out["images"][:, 0, 0, 0, 0], [1, 0, 0])


def test_truncation_drops_a_trailing_image_and_its_media(tok):
  out = _build(tok, PETS, 2, max_len=9)
  np.testing.assert_array_equal(out["tokens"], [BOS, *T0, EOC, PAD])
  np.testing.assert_array_equal(out["loss_mask"], [0] + [1] * 7 + [0])
  np.testing.assert_array_equal(out["media_idx"], [0] * 9)
  assert not out["media_mask"].any() and not out["images"].any()


def test_further_images_keep_their_tag_but_no_media(tok):
  out = _build(tok, PETS, 2, max_media=1)
  full = _build(tok, PETS, 2)
  np.testing.assert_array_equal(out["tokens"], full["tokens"])  # The tokens stay as they are.
  np.testing.assert_array_equal(out["loss_mask"], full["loss_mask"])
  np.testing.assert_array_equal(out["media_idx"], [0] * 8 + [1] * 9 + [0] * 15)
  np.testing.assert_array_equal(out["media_mask"], [True])
  np.testing.assert_array_equal(out["images"][:, 0, 0, 0, 0], [1])
  # Two images in a row and room for one: the second's text sees nothing.
  out = _build(tok, ["", "", "My cat"], 2, max_media=1, max_len=8)
  np.testing.assert_array_equal(out["tokens"], [BOS, IMG, IMG, 7, 14, EOC, EOS, PAD])
  np.testing.assert_array_equal(out["media_idx"], [0, 1, 0, 0, 0, 0, 0, 0])


def test_p_next_changes_which_image_not_the_tokens(tok):
  plain = _build(tok, PETS, 2)
  out = _build(tok, PETS, 2, p_next=1.0, rng=np.random.default_rng(0))
  np.testing.assert_array_equal(out["tokens"], plain["tokens"])
  np.testing.assert_array_equal(out["loss_mask"], plain["loss_mask"])
  # Each chunk (from its <image>) sees the image after it; the last chunk has none after it.
  np.testing.assert_array_equal(out["media_idx"], [1] * 8 + [2] * 9 + [0] * 15)
  np.testing.assert_array_equal(out["media_mask"], [True, True, False])
  zero = _build(tok, PETS, 2, p_next=0.0, rng=np.random.default_rng(0))
  np.testing.assert_array_equal(zero["media_idx"], plain["media_idx"])


def test_p_next_half_is_drawn_per_document_from_its_rng(tok):
  rng = np.random.default_rng(0)
  nexts = [_build(tok, PETS, 2, p_next=0.5, rng=rng)["media_idx"][0] == 1 for _ in range(1000)]
  assert 0.45 < np.mean(nexts) < 0.55  # <BOS> sees image 1 only when attending to the next.
  again = [_build(tok, PETS, 2, p_next=0.5, rng=np.random.default_rng(s))["media_idx"]
           for s in (7, 7)]
  np.testing.assert_array_equal(*again)


# Random documents whose chunk k is word k + 1 repeated: a token names the chunk it is in, and an
# image's pixels (its 1-based index) name the chunk after it.
def _document(rng, num_media):
  return [" ".join([WORDS[k + 1]] * int(rng.integers(k == 0, 12))) for k in range(num_media + 1)]


def _check_phi(out, next_image: bool, max_media: int):
  """φ from the paper's definition, recomputed from the output tokens alone."""
  tokens, n = out["tokens"], int((out["tokens"] != PAD).sum())
  tags = np.flatnonzero(tokens[:n] == IMG)
  kept = int(out["media_mask"].sum())
  assert kept == min(len(tags), max_media)
  for j, pos in enumerate(tags[:kept], 1):  # Image j is that of the window's j-th <image>.
    if pos + 1 < n and tokens[pos + 1] not in (IMG, EOC, EOS):
      assert out["images"][j - 1, 0, 0, 0, 0] == tokens[pos + 1] - 1
  assert not out["images"][kept:].any()
  for t in range(n):
    before = int((tokens[:t + 1] == IMG).sum())  # Tags at or before t: t's chunk.
    want = before + 1 if next_image else before
    assert out["media_idx"][t] == (want if 1 <= want <= kept else 0), (t, out)
  assert not out["media_idx"][n:].any()


@pytest.mark.parametrize("p_next", [0.0, 1.0])
def test_random_windows_attend_only_to_images_inside_them(tok, p_next):
  rng = np.random.default_rng(0)
  for _ in range(200):
    num_media = int(rng.integers(1, 9))
    texts = _document(rng, num_media)
    full = _build(tok, texts, num_media, max_len=200, max_media=num_media)
    doc = full["tokens"][1:(full["tokens"] != PAD).sum()]
    out = _build(tok, texts, num_media, max_len=16, max_media=3, p_next=p_next,
                 random_window=True, rng=rng)
    _check_phi(out, next_image=p_next == 1.0, max_media=3)
    window = out["tokens"][1:(out["tokens"] != PAD).sum()]
    starts = [s for s in range(len(doc)) if np.array_equal(doc[s:s + len(window)], window)]
    assert out["tokens"][0] == BOS and starts  # A contiguous piece of the document...
    if len(doc) >= 15 and len(window) < 15:  # ... and a full one, but for a dropped trailing tag.
      assert any(doc[s + len(window)] == IMG for s in starts)


def test_random_window_start_varies_and_is_reproducible(tok):
  texts = _document(np.random.default_rng(1), 6)
  build = lambda seed: _build(tok, texts, 6, max_len=12, max_media=5, random_window=True,
                              rng=np.random.default_rng(seed))
  starts = {tuple(build(s)["tokens"][1:4]) for s in range(50)}
  assert len(starts) > 10
  for field, value in build(3).items():
    np.testing.assert_array_equal(value, build(3)[field])
  first = _build(tok, texts, 6, max_len=12, max_media=5)  # Without: the document's start.
  assert first["tokens"][1] == 1 and first["media_idx"][1] == 0


def test_errors(tok):
  with pytest.raises(ValueError, match="2 media but 2 text chunks; expected 3"):
    _build(tok, PETS[:2], 2)
  with pytest.raises(ValueError, match="1 media but 3 text chunks; expected 2"):
    _build(tok, PETS, 1)
  with pytest.raises(ValueError, match="empty document"):
    _build(tok, ["", " "], 1)
  with pytest.raises(ValueError, match="max_len=2 is too small"):
    _build(tok, PETS, 2, max_len=2)
  with pytest.raises(ValueError, match=r"media must be \[N, T, H, W, C\]"):
    interleave.build_sequence(PETS, np.zeros([2, 2, 2, 3]), tok, max_len=8, max_media=2)
  with pytest.raises(ValueError, match="needs the example's rng"):
    _build(tok, PETS, 2, p_next=0.5)
  with pytest.raises(ValueError, match="random_window=True needs the example's rng"):
    _build(tok, PETS, 2, random_window=True)
  with pytest.raises(ValueError, match="p_next=1.5"):
    _build(tok, PETS, 2, p_next=1.5, rng=np.random.default_rng(0))
  with pytest.raises(ValueError, match="max_media=0"):
    _build(tok, PETS, 2, max_media=0)


def test_a_model_trained_without_bos_gets_none(tok):
  """OpenFlamingo-MPT's tokenizer adds no BOS (tokenizer.py `add_bos`): text comes first."""
  plain = _build(tok, PETS, 2)
  bare = _build(dataclasses.replace(tok, add_bos=False), PETS, 2)
  np.testing.assert_array_equal(bare["tokens"][:31], plain["tokens"][1:])
  np.testing.assert_array_equal(bare["media_idx"][:31], plain["media_idx"][1:])
  np.testing.assert_array_equal(bare["loss_mask"][1:31], plain["loss_mask"][2:])
