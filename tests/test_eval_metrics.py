"""Metrics: VQAv2 accuracy and normalisation, CIDEr-D (hand-computed and against coco-caption)."""
import math

import numpy as np
import pytest

from flamingo_jax.eval import metrics


@pytest.mark.parametrize("raw,want", [
    ("Two dogs.", "2 dogs"), ("the Red", "red"), ("dont know", "don't know"), ("yes!", "yes"),
    ("1,000", "1000"), ("black and-white", "black and white"), (" a\tcat ", "cat"),
    ("3.5", "3.5"), ("none", "0"),
])
def test_vqa_normalisation(raw, want):
  assert metrics.normalize_vqa_answer(raw) == want


@pytest.mark.parametrize("matches,want", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0),
                                          (10, 1.0)])
def test_vqa_accuracy_is_the_official_leave_one_out_average(matches, want):
  # k of 10 humans agree: each subset of 9 scores min(#agreeing / 3, 1); hand-averaged, e.g.
  # k=2: (2 · 1/3 + 8 · 2/3) / 10 = 0.6.
  answers = ["Two"] * matches + ["three"] * (10 - matches)
  assert metrics.vqa_accuracy("2.", answers) == pytest.approx(want)


def test_vqa_accuracy_with_few_answers_is_a_match_against_any():
  assert metrics.vqa_accuracy("Red", ["red"]) == 1.0
  assert metrics.vqa_accuracy("blue", ["red", "crimson"]) == 0.0
  with pytest.raises(ValueError, match="answers"):
    metrics.vqa_accuracy("red", [])


def test_cider_d_hand_computed():
  # Image 2's caption shares nothing with image 1, so every n-gram has df = 1 and weight log 2.
  refs = [["a b c"], ["d e f g"]]
  # Exact matches: cosine 1 per order that has n-grams ("a b c" has no 4-gram), no penalty.
  mean, scores = metrics.cider_d(["a b c", "d e f g"], refs)
  np.testing.assert_allclose(scores, [10 * 3 / 4, 10.0])
  assert mean == pytest.approx(8.75)
  # "a a": the unigram 'a' is clipped to the reference's count: (min(2L, L) · L) / (2L · √3 L);
  # no shared bigram; the bigram counts differ by 1: penalty exp(-1 / (2 · 6²)).
  _, scores = metrics.cider_d(["a a", "x"], refs)
  want = 10 * (1 / (2 * math.sqrt(3))) * math.exp(-1 / 72) / 4
  np.testing.assert_allclose(scores, [want, 0.0])


def test_cider_d_properties():
  refs = [["a man rides a horse", "a person riding a horse"], ["two cats on a sofa"],
          ["a red bus on the street", "a bus parked"]]
  perfect, _ = metrics.cider_d([r[0] for r in refs], refs)
  worse, scores = metrics.cider_d(["a horse", "a sofa", "the street"], refs)
  assert perfect > worse > 0 and (scores >= 0).all()
  longer, _ = metrics.cider_d([r[0] + " today in the sun" for r in refs], refs)
  assert longer < perfect  # The length penalty.
  with pytest.raises(ValueError, match="references"):
    metrics.cider_d(["a"], [[]])


@pytest.mark.parity
def test_cider_d_matches_coco_caption():
  from pycocoevalcap.cider import cider  # pylint: disable=g-import-not-at-top  (test extra)
  refs = [["A man rides a horse.", "a person riding a brown horse", "man on horse"],
          ["two cats sleep on a sofa", "cats on the couch"],
          ["a red bus on the street", "a bus parked by the road", "red double decker bus"],
          ["a plate of food", "food on a white plate"]]
  preds = ["a man riding a horse", "a cat on a sofa", "a red bus", "a plate"]
  preds, refs = ([metrics.caption_tokens(p) for p in preds],
                 [[metrics.caption_tokens(r) for r in rs] for rs in refs])
  want_mean, want = cider.Cider().compute_score(
      {i: rs for i, rs in enumerate(refs)}, {i: [p] for i, p in enumerate(preds)})
  mean, scores = metrics.cider_d(preds, refs)
  np.testing.assert_allclose(scores, want, rtol=1e-9)
  assert mean == pytest.approx(want_mean)


def test_caption_tokens():
  got = metrics.caption_tokens("A man, riding a T-shirt -- horse.")
  assert got == "a man riding a t-shirt horse"


def test_classification_and_retrieval():
  assert metrics.exact_match([" Dax", "zup"], ["dax", "blick"]) == 0.5
  assert metrics.accuracy([1, 2, 3], [1, 0, 3]) == pytest.approx(2 / 3)
  scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.5, 0.5, 0.1]])
  got = metrics.recall_at_k(scores, np.array([0, 0, 1]), ks=(1, 2))
  assert got == {"recall@1": pytest.approx(2 / 3), "recall@2": pytest.approx(2 / 3)}
  with pytest.raises(ValueError, match="targets"):
    metrics.recall_at_k(scores, np.array([0, 1]))
