"""Evaluation metrics: VQA accuracy, CIDEr-D, exact match / accuracy and retrieval recall@k.

Plain Python/numpy on host-side strings and scores; no Java. VQA accuracy follows the official
VQAv2 evaluation code (vqaEval.py); CIDEr-D follows coco-caption's `cider_scorer.py` (the "CIDEr"
that COCO reports), including its quirks, so numbers are comparable with published ones.
"""
from collections import Counter
import re
from typing import Sequence

import numpy as np

# --- VQA accuracy (VQAv2 vqaEval.py) ---

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(["a", "an", "the"])
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
          ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # Sic: the official pattern.
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_vqa_answer(answer: str) -> str:
  """The official answer processing: punctuation, then lower case, number words, articles,
  contractions."""
  text = answer.replace("\n", " ").replace("\t", " ").strip()
  out = text
  for p in _PUNCT:  # Deleted next to spaces (or in '1,000'), otherwise a word break.
    if p + " " in text or " " + p in text or _COMMA_STRIP.search(text):
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  out = _PERIOD_STRIP.sub("", out, re.UNICODE)  # Sic: count=re.UNICODE, as the official code.
  words = [_NUMBERS.get(w, w) for w in out.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """VQAv2 accuracy: min(#other humans who gave the answer / 3, 1), averaged over leave-one-out.

  With the usual 10 answers this averages the 10 subsets of 9, as the official code. Differences:
  both sides are always normalised (the official code skips it when all answers agree, which
  scores a raw 'Red.' against ten 'red' as 0); and with fewer than 4 answers, where no subset can
  reach 3 votes, the score is 1 if the prediction matches any answer (e.g. single-answer data).
  """
  if not answers:
    raise ValueError("vqa_accuracy: answers is empty; expected the human answers.")
  pred = normalize_vqa_answer(prediction)
  matches = [normalize_vqa_answer(a) == pred for a in answers]
  if len(answers) < 4:
    return float(any(matches))
  total = sum(matches)
  return float(np.mean([min(1.0, (total - m) / 3.0) for m in matches]))


# --- CIDEr-D (coco-caption cider_scorer.py) ---

_PTB_PUNCT = re.compile(r"[.,?!:;\"`()\[\]{}]|''|--|-(?=\s|$)|(?<=\s)-|\.\.\.")


def caption_tokens(text: str) -> str:
  """Lower case, punctuation removed, words joined by single spaces.

  Approximates the PTB tokenizer that the COCO evaluation runs before CIDEr (Java, not used here):
  it drops the same punctuation but does not split clitics ("it's" stays one word).
  """
  return " ".join(_PTB_PUNCT.sub(" ", text.lower()).split())


def _ngrams(text: str, n: int) -> Counter:
  words = text.split()
  return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> tuple[float, np.ndarray]:
  """CIDEr-D of each prediction against its references: (corpus mean, per-example scores [P]).

  Per n-gram order: cosine of tf-idf vectors, with the prediction's counts clipped to the
  reference's, times a Gaussian length penalty exp(-Δ²/2σ²); averaged over orders and references,
  times 10. Document frequencies come from the references of all examples. As coco-caption, Δ is
  measured in bigram counts and texts are split on spaces (apply `caption_tokens` first).
  """
  if len(predictions) != len(references):
    raise ValueError(f"cider_d: {len(predictions)} predictions but {len(references)} reference "
                     "lists; expected one list per prediction.")
  if any(not refs for refs in references):
    raise ValueError("cider_d: an example has no references; expected at least one each.")
  refs = [[_ngrams(r, n) for r in rs] for rs in references]
  doc_freq = Counter(g for rs in refs for g in set().union(*rs))
  log_docs = np.log(float(len(refs)))

  def vectors(counts):
    vec = [{} for _ in range(n)]
    for gram, tf in counts.items():
      vec[len(gram) - 1][gram] = tf * (log_docs - np.log(max(1.0, doc_freq[gram])))
    norms = [np.sqrt(sum(v * v for v in order.values())) for order in vec]
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)  # Sic: bigrams.
    return vec, norms, length

  def similarity(hyp, ref):
    (vh, nh, lh), (vr, nr, lr) = hyp, ref
    penalty = np.exp(-float(lh - lr) ** 2 / (2 * sigma ** 2))
    val = np.zeros(n)
    for k in range(n):
      val[k] = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
      if nh[k] and nr[k]:
        val[k] /= nh[k] * nr[k]
    return val * penalty

  scores = []
  for pred, rs in zip(predictions, refs):
    hyp = vectors(_ngrams(pred, n))
    total = sum(similarity(hyp, vectors(r)) for r in rs)
    scores.append(10.0 * np.mean(total) / len(rs))
  scores = np.asarray(scores, np.float64)
  return float(scores.mean()) if len(scores) else 0.0, scores


# --- Classification and retrieval ---


def exact_match(predictions: Sequence[str], targets: Sequence[str]) -> float:
  """Fraction of predictions equal to their target after stripping and lower-casing."""
  if len(predictions) != len(targets):
    raise ValueError(f"exact_match: {len(predictions)} predictions but {len(targets)} targets.")
  return float(np.mean([p.strip().lower() == t.strip().lower()
                        for p, t in zip(predictions, targets)]))


def accuracy(predicted, labels) -> float:
  """Fraction of predicted class ids [N] equal to labels [N]."""
  predicted, labels = np.asarray(predicted), np.asarray(labels)
  if predicted.shape != labels.shape:
    raise ValueError(f"accuracy: predicted {predicted.shape} and labels {labels.shape} differ.")
  return float(np.mean(predicted == labels))


def recall_at_k(scores, targets, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Retrieval recall@k: scores [Q, C] (higher = better), targets [Q] the correct candidate.

  A query counts as retrieved at k when fewer than k candidates score strictly higher than its
  target (ties favour the target).
  """
  scores, targets = np.asarray(scores), np.asarray(targets)
  if scores.ndim != 2 or targets.shape != scores.shape[:1]:
    raise ValueError(f"recall_at_k: scores must be [Q, C] and targets [Q]; got {scores.shape} "
                     f"and {targets.shape}.")
  target_scores = np.take_along_axis(scores, targets[:, None], axis=1)  # [Q, 1]
  rank = (scores > target_scores).sum(axis=1)  # [Q] 0-based
  return {f"recall@{k}": float(np.mean(rank < k)) for k in ks}
