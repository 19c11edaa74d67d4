"""Metrics against the community's code: VQAv2 accuracy (open_flamingo's vqa_metric.py), PTB
tokenisation and CIDEr-D (pycocoevalcap, with its Java tokenizer), OpenFlamingo's post-processing,
ROC-AUC (sklearn)."""
import importlib.util
import json
import math
import os
import shutil

import numpy as np
import pytest

from flamingo_jax.eval import metrics


def _open_flamingo_module(name):
  """open_flamingo/eval/<name>.py by file path: the package's __init__ would import torch."""
  spec = importlib.util.find_spec("open_flamingo")
  if spec is None:
    pytest.skip("open-flamingo is not installed (test extra).")
  path = os.path.join(os.path.dirname(spec.origin), "eval", f"{name}.py")
  module_spec = importlib.util.spec_from_file_location(f"_of_{name}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


# --- VQA ---


@pytest.mark.parametrize("raw,want", [
    ("Two dogs.", "2 dogs"), ("the Red", "red"), ("dont know", "don't know"), ("yes!", "yes"),
    ("1,000", "1000"), ("black and-white", "black and white"), (" a\tcat ", "cat"),
    ("3.5", "3.5"), ("none", "0"),
])
def test_vqa_normalisation(raw, want):
  assert metrics.normalize_vqa_answer(raw) == want


@pytest.mark.parametrize("matches,want", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0),
                                          (9, 1.0)])
def test_vqa_accuracy_is_the_official_leave_one_out_average(matches, want):
  # k of 10 humans agree: each subset of 9 scores min(#agreeing / 3, 1); hand-averaged, e.g.
  # k=2: (2 · 1/3 + 8 · 2/3) / 10 = 0.6.
  answers = ["Two"] * matches + ["three"] * (10 - matches)
  assert metrics.vqa_accuracy("2.", answers) == pytest.approx(want)


def test_vqa_accuracy_normalises_only_when_the_answers_disagree():
  # The official quirk: ten identical answers are compared verbatim (after stripping).
  assert metrics.vqa_accuracy("2.", ["Two"] * 10) == 0.0
  assert metrics.vqa_accuracy(" Two\n", ["Two"] * 10) == 1.0
  assert metrics.vqa_accuracy("2.", ["Two"] * 10, always_process=True) == 1.0  # OpenFlamingo.
  # One answer: nobody else can agree, so the official score is 0 whatever the prediction.
  assert metrics.vqa_accuracy("red", ["red"]) == 0.0
  with pytest.raises(ValueError, match="answers"):
    metrics.vqa_accuracy("red", [])
  with pytest.raises(ValueError, match="predictions"):
    metrics.vqa_dataset_accuracy(["a"], [["a"], ["b"]])


# (prediction, ten answers): punctuation, number words, articles, contractions, yes/no, answers
# that all agree (verbatim comparison in the official code) and that do not.
VQA_CASES = [
    ("yes", ["yes"] * 10),
    ("Yes", ["yes"] * 10),
    ("yes.", ["yes"] * 8 + ["no"] * 2),
    ("No", ["no"] * 6 + ["yes"] * 3 + ["No."]),
    ("two", ["2"] * 7 + ["two"] * 2 + ["3"]),
    ("2", ["Two"] * 10),
    ("the red one", ["red"] * 4 + ["red one"] * 3 + ["the red one"] * 3),
    ("dont know", ["don't know"] * 5 + ["dont know"] * 2 + ["unknown"] * 3),
    ("1,000", ["1000"] * 4 + ["1,000"] * 4 + ["one thousand"] * 2),
    ("3.5", ["3.5"] * 5 + ["3"] * 5),
    ("black and-white", ["black and white"] * 6 + ["black/white"] * 2 + ["gray"] * 2),
    ("a cat!", ["cat"] * 9 + ["kitten"]),
    ("Cat", ["cat"] * 10),
    ("tennis racket", ["tennis racket"] * 2 + ["racket"] * 8),
    ("frisbee", ["frisbee"] * 10),
    ("its raining", ["it's raining"] * 3 + ["raining"] * 5 + ["rain"] * 2),
    ("none", ["0"] * 4 + ["none"] * 4 + ["zero"] * 2),
    ("left", ["right"] * 10),
    ("on the table.", ["table"] * 3 + ["on table"] * 4 + ["on the table"] * 3),
    ("10 : 30", ["10:30"] * 5 + ["10:30 am"] * 3 + ["morning"] * 2),
    ("hes happy", ["he's happy"] * 4 + ["happy"] * 6),
    ("  blue\t", ["blue"] * 3 + ["Blue"] * 3 + ["navy"] * 4),
]


def _vqa_files(tmp_path, cases):
  """The official layout: questions, annotations and results JSON."""
  info = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
          "data_subtype": "val2014", "license": {}}
  questions = dict(info, questions=[
      {"question_id": i, "image_id": 100 + i, "question": f"q{i}?"} for i in range(len(cases))])
  annotations = dict(info, annotations=[
      {"question_id": i, "image_id": 100 + i, "question_type": "what", "answer_type": "other",
       "multiple_choice_answer": answers[0],
       "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                   for j, a in enumerate(answers)]}
      for i, (_, answers) in enumerate(cases)])
  results = [{"question_id": i, "answer": p} for i, (p, _) in enumerate(cases)]
  paths = {}
  for name, data in [("questions", questions), ("annotations", annotations),
                     ("results", results)]:
    paths[name] = str(tmp_path / f"{name}.json")
    with open(paths[name], "w") as f:
      json.dump(data, f)
  return paths


def _reference_vqa_accuracy(vqa_metric, paths, official):
  """Per-question accuracy from open_flamingo's VQAEval (unrounded).

  OpenFlamingo's copy always normalises; the official vqaEval.py (GT-Vision-Lab/VQA,
  PythonEvaluationTools/vqaEvaluation/vqaEval.py) normalises both the answers and the prediction
  only `if len(set(gtAnswers)) > 1`. With `official`, the questions whose stripped answers all
  agree are therefore scored by the same loop with both normalisations switched off.
  """
  raw = {}

  class Eval(vqa_metric.VQAEval):
    def setEvalQA(self, quesId, acc):
      raw[quesId] = acc

  def run(ids, process):
    vqa = vqa_metric.VQA(paths["annotations"], paths["questions"])
    res = vqa.loadRes(paths["results"], paths["questions"])
    evaluator = Eval(vqa, res, n=2)
    if not process:
      evaluator.processPunctuation = evaluator.processDigitArticle = lambda text: text
    if ids:
      evaluator.evaluate(ids)

  vqa = vqa_metric.VQA(paths["annotations"], paths["questions"])
  agree = [q for q, ann in vqa.qa.items()
           if len({a["answer"].strip() for a in ann["answers"]}) == 1]
  if official:
    run([q for q in vqa.qa if q not in agree], True)
    run(agree, False)
  else:
    run(list(vqa.qa), True)
  return raw


@pytest.mark.parity
@pytest.mark.parametrize("always_process", [False, True])
def test_vqa_accuracy_matches_open_flamingo_vqa_metric(tmp_path, capsys, always_process):
  vqa_metric = _open_flamingo_module("vqa_metric")
  paths = _vqa_files(tmp_path, VQA_CASES)
  want = _reference_vqa_accuracy(vqa_metric, paths, official=not always_process)
  for i, (prediction, answers) in enumerate(VQA_CASES):
    got = metrics.vqa_accuracy(prediction, answers, always_process=always_process)
    assert abs(got - want[i]) <= 1e-9, (i, prediction, answers, got, want[i])
  overall = metrics.vqa_dataset_accuracy(*zip(*VQA_CASES), always_process=always_process)
  assert abs(overall - 100 * sum(want.values()) / len(want)) <= 1e-9
  if always_process:  # OpenFlamingo's whole-dataset entry point: round(100 · mean, 2).
    score = vqa_metric.compute_vqa_accuracy(paths["results"], paths["questions"],
                                            paths["annotations"])
    assert round(overall, 2) == score
  capsys.readouterr()  # The reference prints progress.
  # The fixture exercises both branches, and they disagree somewhere.
  plain = [metrics.vqa_accuracy(p, a) for p, a in VQA_CASES]
  always = [metrics.vqa_accuracy(p, a, always_process=True) for p, a in VQA_CASES]
  assert plain != always


@pytest.mark.parity
def test_postprocessing_matches_open_flamingo():
  vqa_metric = _open_flamingo_module("vqa_metric")
  coco_metric = _open_flamingo_module("coco_metric")
  texts = ["red", "red Question: what", "Short answer: yes", "two, maybe three", "blue, Answer: x",
           "a, b, c", "Answer", "", " yes\nQuestion", "no Output: x", "A dog.Output:A cat Output",
           "questions, answers", "Shorts and Answers"]
  for text in texts:
    assert metrics.postprocess_vqa(text) == vqa_metric.postprocess_vqa_generation(text), text
    assert metrics.postprocess_caption(text) == (
        coco_metric.postprocess_captioning_generation(text)), text


# --- PTB tokenisation and CIDEr-D ---

# Captions per image: clitics, punctuation, numbers, quotes, hyphens, abbreviations, unicode.
CAPTION_REFS = [
    ["A man riding a wave on top of a surfboard.", "It's a surfer -- riding a big wave!",
     "A surfer (in a wetsuit) rides the wave..."],
    ["Two dogs don't want to share the frisbee.", "The dogs' owner can't get the frisbee back.",
     "A dog's toy; the other dog won't let go."],
    ["A 3-year-old boy eats 1,000 grapes at 10:30 a.m.", "The boy, about 3.5 years old, eats $5 of "
     "fruit.", "A kid eating fruit: grapes, apples, etc."],
    ['A sign reads "STOP" at the corner of 5th St. and Main.', "The U.S. flag flies over a "
     "well-known building.", "A red stop sign in front of Mr. Smith's house."],
    ["A café with naïve art — “smart” décor…", "People sit at tables in a cozy café.",
     "A coffee shop with ‘quirky’ paintings on the walls."],
    ["I'm looking at a T-shirt that says 'I ❤ NY'.", "A white t-shirt with a heart on it.",
     "They're selling shirts [cheap] at the stand {sale}."],
    ["A plate of food: rice, beans & salad.", "Food on a white plate... 50% off?!",
     "A dinner plate with rice and beans"],
]
CAPTION_PREDICTIONS = [
    "A man riding a wave on a surfboard.", "Two dogs can't share a frisbee!",
    "A 3-year-old boy eating grapes at 10:30.", 'A "STOP" sign at the U.S. corner.',
    "A café with “smart” art.", "A T-shirt that's white (with a heart).",
    "A plate of rice & beans",
]
# Glued punctuation, smileys, hashtags, filenames: what the lexer's longer rules catch.
PTB_ODDITIES = ["dogs etc.A  cats", "one Inc.o'clock", "a=O'Neil b", "five 5.www.x.com",
                "so happy :) #sunset @bob", "see photo.jpg, C++ and (^_^)", "No. 5 and ca. 1990"]
# Where a caption's tokens depend on its neighbours in a pycocoevalcap batch: a one-letter
# abbreviation before a sentence-starting word on the next line, and the batch's last line, which
# has no newline after it.
PTB_BATCH_EFFECTS = [("a jar of vitamin C.", "a jar of vitamin c", "a jar of vitamin c."),
                     ("The pills and they're", "the pills and they re", "the pills and they 're")]


def _java_ptb(captions):
  """pycocoevalcap's PTBTokenizer (Java) on a list of captions, as one batch."""
  if shutil.which("java") is None:
    pytest.skip("java is not installed: pycocoevalcap's PTBTokenizer needs it.")
  tokenizer = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
  out = tokenizer.PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
  return [out[i][0] for i in range(len(captions))]


def test_ptb_tokenize_examples():
  assert metrics.ptb_tokenize("It's a T-shirt (red).") == "it 's a t-shirt -lrb- red -rrb-"
  assert metrics.ptb_tokenize("Don't, can't; won't!") == "do n't ca n't wo n't"
  assert metrics.ptb_tokenize('"Mr. Smith" paid $3.50 for 1,000...') == (
      "mr. smith paid $ 3.50 for 1,000")


@pytest.mark.parity
def test_ptb_tokenize_matches_pycocoevalcap_java():
  captions = [c for refs in CAPTION_REFS for c in refs] + CAPTION_PREDICTIONS + PTB_ODDITIES
  assert len(captions) >= 30
  want = _java_ptb(captions)
  assert metrics.ptb_tokenize_batch(captions) == want
  # No caption of this fixture is affected by its neighbours, so one at a time agrees too.
  assert [metrics.ptb_tokenize(c) for c in captions] == want


def _fuzzed_lines(n, seed=0):
  """Caption-like lines and punctuation soup, from pieces the lexer treats specially."""
  rng = np.random.default_rng(seed)
  pieces = ("a man dog it's don't can't cat's dogs' U.S. Mr. etc. 3.5 1,000 $5 5% 10:30 #1 1/2 ½ "
            "café T-shirt well-known O'Neil gonna cannot 'tis '90s y'all o'clock rock'n'roll "
            "www.a.com a@b.com :) (^_^) #tag @user C++ file.jpg 555-123-4567 No. ca. Co. I. A. "
            "The It x.y.z “ ” ‘ ’ … — – ( ) [ ] { } \" ' ` , . ! ? ; : - -- ... & * / < > = + ~ | "
            "é € £ ¢ °").split(" ")
  lines = []
  for _ in range(n):
    words = rng.choice(pieces, size=rng.integers(1, 14))
    seps = rng.choice([" ", " ", " ", "", "  "], size=len(words))
    lines.append("".join(w + sep for w, sep in zip(words, seps)).strip())
  return lines


@pytest.mark.parity
def test_ptb_tokenize_batch_matches_java_on_fuzzed_lines():
  lines = _fuzzed_lines(400)
  want = _java_ptb(lines)
  got = metrics.ptb_tokenize_batch(lines)
  assert [(line, g, w) for line, g, w in zip(lines, got, want) if g != w] == []


@pytest.mark.parity
def test_ptb_tokenize_batch_reproduces_neighbour_effects():
  texts = [t for t, _, _ in PTB_BATCH_EFFECTS]
  java = _java_ptb(texts)
  assert java == [j for _, j, _ in PTB_BATCH_EFFECTS]
  assert metrics.ptb_tokenize_batch(texts) == java
  # One caption at a time is read as a line followed by a newline and nothing else.
  assert [metrics.ptb_tokenize(t) for t in texts] == [o for _, _, o in PTB_BATCH_EFFECTS]


@pytest.mark.parity
def test_cider_d_of_our_pipeline_matches_pycocoevalcap():
  from pycocoevalcap.cider import cider  # pylint: disable=g-import-not-at-top  (test extra)
  # pycocoevalcap tokenises references and predictions in two batches.
  flat_refs = _java_ptb([c for refs in CAPTION_REFS for c in refs])
  java_preds = _java_ptb(CAPTION_PREDICTIONS)
  java_refs, start = [], 0
  for refs in CAPTION_REFS:
    java_refs.append(flat_refs[start:start + len(refs)])
    start += len(refs)
  want_mean, want = cider.Cider().compute_score(
      dict(enumerate(java_refs)), {i: [p] for i, p in enumerate(java_preds)})
  mean, scores = metrics.cider_d(
      [metrics.ptb_tokenize(p) for p in CAPTION_PREDICTIONS],
      [[metrics.ptb_tokenize(r) for r in refs] for refs in CAPTION_REFS])
  assert np.abs(scores - np.asarray(want)).max() <= 1e-6
  assert abs(mean - want_mean) <= 1e-6
  assert want_mean > 0.1  # Not a vacuous comparison.


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


# --- ROC-AUC, classification, retrieval ---


@pytest.mark.parity
def test_roc_auc_matches_sklearn_with_ties():
  roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
  rng = np.random.default_rng(0)
  for n in (2, 7, 50, 1000):
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    for scores in (rng.normal(size=n), rng.integers(0, 4, n) / 3.0,  # Many ties.
                   np.zeros(n)):
      assert abs(metrics.roc_auc(scores, labels) - roc_auc_score(labels, scores)) <= 1e-12
  assert metrics.roc_auc([0.1, 0.9, 0.5, 0.5], [0, 1, 0, 1]) == pytest.approx(0.875)


def test_roc_auc_errors():
  with pytest.raises(ValueError, match="positives and 0 negatives"):
    metrics.roc_auc([0.1, 0.2], [1, 1])
  with pytest.raises(ValueError, match="scores and labels"):
    metrics.roc_auc([0.1, 0.2], [0, 1, 1])
  with pytest.raises(ValueError, match="labels must be 0 or 1"):
    metrics.roc_auc([0.1, 0.2], [0, 2])
  with pytest.raises(ValueError, match="finite"):
    metrics.roc_auc([np.nan, 0.2], [0, 1])


def test_classification_and_retrieval():
  assert metrics.exact_match([" Dax", "zup"], ["dax", "blick"]) == 0.5
  assert metrics.accuracy([1, 2, 3], [1, 0, 3]) == pytest.approx(2 / 3)
  scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.5, 0.5, 0.1]])
  got = metrics.recall_at_k(scores, np.array([0, 0, 1]), ks=(1, 2))
  assert got == {"recall@1": pytest.approx(2 / 3), "recall@2": pytest.approx(2 / 3)}
  with pytest.raises(ValueError, match="targets"):
    metrics.recall_at_k(scores, np.array([0, 1]))
