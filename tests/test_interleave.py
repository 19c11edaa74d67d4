"""Golden tests of the Flamingo sequence format, truncation and the M3W p_next augmentation."""
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


def test_at_most_max_media_cuts_before_the_next_image(tok):
  out = _build(tok, PETS, 2, max_media=1)
  tokens = [BOS, *T0, EOC, IMG, *T1, EOC]
  np.testing.assert_array_equal(out["tokens"], tokens + [PAD] * (32 - len(tokens)))
  np.testing.assert_array_equal(out["media_mask"], [True])
  # Two images in a row and room for one: the kept one would be trailing, so none is kept.
  out = _build(tok, ["", "", "My cat"], 2, max_media=1, max_len=8)
  np.testing.assert_array_equal(out["tokens"], [BOS] + [PAD] * 7)
  assert not out["loss_mask"].any() and not out["media_mask"].any()


def test_p_next_one_attaches_text_to_the_next_image(tok):
  rng = np.random.default_rng(0)
  out = _build(tok, PETS, 2, p_next=1.0, rng=rng)
  tokens = [BOS, IMG, *T0, EOC, IMG, *T1, EOC, *T2, EOC, EOS]
  np.testing.assert_array_equal(out["tokens"], tokens + [PAD] * (32 - len(tokens)))
  np.testing.assert_array_equal(out["media_idx"], [0] + [1] * 8 + [2] * 17 + [0] * 6)
  np.testing.assert_array_equal(
      out["loss_mask"], [0, 0] + [1] * 7 + [0] + [1] * 16 + [0] * 6)
  # A pair reads the same either way.
  a = _build(tok, ["", "My puppy"], 1, p_next=1.0, rng=rng)
  b = _build(tok, ["", "My puppy"], 1)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_p_next_zero_and_half(tok):
  rng = np.random.default_rng(0)
  plain = _build(tok, PETS, 2)
  zero = _build(tok, PETS, 2, p_next=0.0, rng=rng)
  np.testing.assert_array_equal(zero["tokens"], plain["tokens"])
  firsts = [_build(tok, PETS, 2, p_next=0.5, rng=rng)["tokens"][1] for _ in range(1000)]
  fraction = np.mean(np.array(firsts) == IMG)  # The next-image layout opens with <image>.
  assert 0.45 < fraction < 0.55
  # Seeded: the same generator state gives the same layouts.
  again = [_build(tok, PETS, 2, p_next=0.5, rng=np.random.default_rng(7))["tokens"][1]
           for _ in range(2)]
  assert again[0] == again[1]


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
  with pytest.raises(ValueError, match="p_next=1.5"):
    _build(tok, PETS, 2, p_next=1.5, rng=np.random.default_rng(0))
  with pytest.raises(ValueError, match="max_media=0"):
    _build(tok, PETS, 2, max_media=0)
