"""Evaluation metrics as the community computes them: VQA accuracy, CIDEr-D, ROC-AUC, recall@k.

Plain Python/numpy on host-side strings and scores; no Java, no torch. What matches what:

- `vqa_accuracy` / `vqa_dataset_accuracy`: the official VQAv2 evaluation (GT-Vision-Lab/VQA
  vqaEval.py), quirks included: answers and prediction are normalised only when the ten answers
  disagree. `always_process=True` is OpenFlamingo's copy (open_flamingo/eval/vqa_metric.py), which
  always normalises both sides. Both are tested per question against open_flamingo's VQAEval (the
  official variant by running its loop without normalisation on the questions whose answers agree).
- `ptb_tokenize` / `ptb_tokenize_batch`: Stanford CoreNLP 3.4.1's PTBTokenizer (-preserveLines
  -lowerCase, the jar pycocoevalcap ships) followed by pycocoevalcap's removal of punctuation
  tokens: PTBLexer.flex's rules ported to Python regexes with JFlex's longest-match choice. Tested
  against the Java on the fixture; outside the tests it agreed on 6,000 fuzzed lines (captions,
  punctuation soup) and on every BMP character. `ptb_tokenize_batch` is exact for a whole
  pycocoevalcap batch; `ptb_tokenize` (one caption) differs only where the lexer looks across
  lines (a one-letter abbreviation ending a caption before a line starting "The ...", and the
  batch's last caption, read without a newline after it). Not matched: captions containing CR,
  U+2028/U+2029 or other line breaks, which split the Java's lines (pycocoevalcap then misaligns
  captions); letters and digits newer than Unicode 14 (the lexer deletes the ones its tables lack;
  `_NEW_LETTERS` lists those up to Unicode 14, Python 3.11's version). "(" and ")" become
  "-lrb-"/"-rrb-" and stay: the Java lower-cases them before pycocoevalcap removes its upper-case
  "-LRB-" entries, so COCO numbers count them as words, and so do we.
- `cider_d`: coco-caption's cider_scorer.py (the "CIDEr" COCO reports; per example and mean agree
  with pycocoevalcap to 1e-6 on PTB-tokenised text).
- `postprocess_vqa` / `postprocess_caption`: OpenFlamingo's generation clean-up, character for
  character.
- `roc_auc`: sklearn.metrics.roc_auc_score for binary labels (ties: average ranks).
"""
from collections import Counter
import functools
import re
from typing import Sequence
import unicodedata

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


def _clean_whitespace(text: str) -> str:
  return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
  """vqaEval.processPunctuation: a mark next to a space (or anywhere, in text with '1,000') is
  deleted, otherwise it becomes a space; then periods not touching a digit go."""
  out = text
  for p in _PUNCT:
    if p + " " in text or " " + p in text or _COMMA_STRIP.search(text):
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out, count=re.UNICODE)  # Sic (the official): at most 32 periods.


def _process_digit_article(text: str) -> str:
  """vqaEval.processDigitArticle: lower case, number words to digits, articles out, contractions
  restored."""
  words = [_NUMBERS.get(w, w) for w in text.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
  """The official answer normalisation (whitespace, punctuation, then digits/articles)."""
  return _process_digit_article(_process_punctuation(_clean_whitespace(answer)))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, always_process: bool = False) -> float:
  """VQAv2 accuracy of one question in [0, 1], exactly as the official vqaEval.py computes it.

  For each of the N human answers, min(#other humans whose answer equals the prediction / 3, 1);
  averaged over the N. As the official code, both sides are normalised only when the (whitespace-
  stripped) answers are not all identical: against ten 'red', 'Red.' scores 0. `always_process`
  normalises both sides always, as OpenFlamingo's copy of the code does. With a single answer the
  official score is always 0 (no other human is left to agree).
  """
  if not answers:
    raise ValueError("vqa_accuracy: answers is empty; expected the human answers (usually 10).")
  pred = _clean_whitespace(prediction)
  gts = [_clean_whitespace(a) for a in answers]
  if always_process or len(set(gts)) > 1:
    pred = normalize_vqa_answer(pred)
    gts = [normalize_vqa_answer(a) for a in gts]
  total = sum(a == pred for a in gts)
  return float(sum(min(1.0, (total - (a == pred)) / 3.0) for a in gts) / len(gts))


def vqa_dataset_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]], *,
                         always_process: bool = False) -> float:
  """The official overall VQA accuracy in percent: 100 × the mean of `vqa_accuracy` over questions.

  Unrounded; vqaEval.py reports round(this, 2) as accuracy['overall'].
  """
  if len(predictions) != len(answers):
    raise ValueError(f"vqa_dataset_accuracy: {len(predictions)} predictions but {len(answers)} "
                     "answer lists; expected one list per prediction.")
  if not predictions:
    raise ValueError("vqa_dataset_accuracy: no predictions; expected at least one question.")
  scores = [vqa_accuracy(p, a, always_process=always_process) for p, a in zip(predictions, answers)]
  return 100.0 * float(sum(scores)) / len(scores)


def postprocess_vqa(prediction: str) -> str:
  """OpenFlamingo's postprocess_vqa_generation: keep the text before the first 'Question',
  'Answer' or 'Short' (the model's next few-shot turn), then before the first ', '."""
  answer = re.split("Question|Answer|Short", prediction, maxsplit=1)[0]
  return re.split(", ", answer, maxsplit=1)[0]


def postprocess_caption(prediction: str) -> str:
  """OpenFlamingo's postprocess_captioning_generation: the text before the first 'Output'."""
  return prediction.split("Output", 1)[0]


# --- PTB tokenisation (CoreNLP 3.4.1 PTBLexer.flex, as pycocoevalcap's PTBTokenizer runs it) ---
# A port of PTBLexer.flex at CoreNLP's v3.4.1 tag (the jar in pycocoevalcap): its macros as Python
# regexes, its rules in order, and JFlex's choice among them (`_longest`).


# Letters (Unicode 14) that the tables compiled into the 3.4.1 lexer lack, so it deletes them;
# measured by running the jar on every BMP letter.
_NEW_LETTERS = re.compile(
    "["
    r"\u037F\u0528-\u052F\u0560\u0588\u05EF\u0860-\u086A\u0870-\u0887\u0889-\u088E\u08A1"
    r"\u08AD-\u08C9\u0978\u0980\u09FC\u0AF9\u0C34\u0C5A\u0C5D\u0C80\u0CDD\u0D04"
    r"\u0D54-\u0D56\u0D5F\u0E86\u0E89\u0E8C\u0E8E-\u0E93\u0E98\u0EA0\u0EA8-\u0EA9\u0EAC"
    r"\u13F5\u13F8-\u13FD\u16F1-\u16F8\u170D\u171F\u1878\u191D-\u191E\u19B0-\u19C0"
    r"\u19C8-\u19C9\u1B4C\u1C80-\u1C88\u1C90-\u1CBA\u1CBD-\u1CBF\u1CF2-\u1CF3\u1CFA\u2C2F"
    r"\u2C5F\u312E-\u312F\u31BB-\u31BF\u4DB6-\u4DBF\u9FCD-\u9FFF\uA698-\uA69D\uA78F"
    r"\uA794-\uA79F\uA7AB-\uA7CA\uA7D0-\uA7D1\uA7D3\uA7D5-\uA7D9\uA7F2-\uA7F7\uA8FD-\uA8FE"
    r"\uA9E0-\uA9E4\uA9E6-\uA9EF\uA9FA-\uA9FE\uAA7E-\uAA7F\uAB30-\uAB5A\uAB5C-\uAB69"
    r"\uAB70-\uABBF"
    "]")


def _letter_class() -> str:
  """A regex class of the BMP letters the lexer knows (Unicode categories L*)."""
  ranges, start = [], None
  for code in range(0x10000):
    char = chr(code)
    is_letter = unicodedata.category(char).startswith("L") and not _NEW_LETTERS.match(char)
    if is_letter and start is None:
      start = code
    elif not is_letter and start is not None:
      ranges.append(f"\\u{start:04X}-\\u{code - 1:04X}")
      start = None
  return "".join(ranges)


_LETTERS = _letter_class()
_L = f"[{_LETTERS}]"  # [:letter:]
_LD = rf"(?:[{_LETTERS}]|\d)"  # [:letter:] | [:digit:]
# LETTER: letters, the accented-letter entities, soft hyphens, and marks PTBLexer adds.
_LETTER = (rf"(?:[{_LETTERS}\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF"
           r"\u0300-\u036F\u0370-\u037D\u0384\u0385\u03CF\u03F6\u03FC-\u03FF\u0483-\u0487\u04CF"
           r"\u04F6-\u04FF\u0510-\u0525\u055A-\u055F\u0591-\u05BD\u05BF\u05C1\u05C2\u05C4\u05C5\u05C7"
           r"\u0615-\u061A\u063B-\u063F\u064B-\u065E\u0670\u06D6-\u06EF\u06FA-\u06FF\u070F\u0711"
           r"\u0730-\u074F\u0750-\u077F\u07A6-\u07B1\u07CA-\u07F5\u07FA\u0900-\u0903\u093C"
           r"\u093E-\u094E\u0951-\u0955\u0962-\u0963\u0981-\u0983\u09BC-\u09C4\u09C7\u09C8"
           r"\u09CB-\u09CD\u09D7\u09E2\u09E3\u0A01-\u0A03\u0A3C\u0A3E-\u0A4F\u0A81-\u0A83"
           r"\u0ABC-\u0ACF\u0B82\u0BBE-\u0BC2\u0BC6-\u0BC8\u0BCA-\u0BCD\u0C01-\u0C03\u0C3E-\u0C56"
           r"\u0D3E-\u0D44\u0D46-\u0D48\u0E30-\u0E3A\u0E47-\u0E4E\u0EB1-\u0EBC\u0EC8-\u0ECD\u1885\u1886]"
           r"|&[aeiouAEIOU](?i:acute|grave|uml);)")
_WORD = rf"{_LETTER}(?:{_LETTER}|\d)*(?:[.!?]{_LETTER}(?:{_LETTER}|\d)*)*"
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_NEWLINE = r"(?:\r|\r?\n|\u2028|\u2029|\u000B|\u000C|\u0085)"
_SPACENL = rf"(?:{_SPACE}|{_NEWLINE})"
_SGML = (r"<(?:[!?][A-Za-z-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.-]*|"
         r"[A-Za-z][A-Za-z0-9_:.-]*[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\")))*[ ]*/?|"
         r"/[A-Za-z][A-Za-z0-9_:.-]*)[ ]*>")
_APOS = r"(?:['\u0092\u2019]|&apos;)"
_APOSX = r"(?:['`\u0092\u2019\u0091\u2018\u201B]|&apos;)"  # APOSETCETERA
_REDAUX = _APOS + r"(?:[msdMSD]|(?i:re|ve|ll))"
_SREDAUX = r"(?i:n)" + _APOSX + r"(?i:t)"
_SWORD = r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*"
_HYPHEN = r"[-_\u058A\u2010\u2011]"
_THING_PART = rf"(?:[dDoOlL]{_APOSX}{_LD})?{_LD}+"
_THING = rf"{_THING_PART}(?:{_HYPHEN}{_THING_PART})*"
_THINGA = r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+"
_ACRO_SPECIAL = r"(?i:(?:Canada|Sino|Korean|EU|Japan|non)-U\.S|U\.S\.-(?:U\.K|U\.S\.S\.R))"
_ACRO = rf"(?:{_ACRO_SPECIAL}|[A-Za-z](?:\.[A-Za-z])*)"  # The longer alternative first.
_ACRO2 = rf"(?:{_ACRO_SPECIAL}|[A-Za-z](?:\.[A-Za-z])+)"
_HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:[A-Za-z0-9\u00AD]+|{_ACRO2}\.))+"


def _caseless(words: str) -> str:
  """JFlex %caseless: literals ignore case, classes do not ("[A]rk" needs a capital A)."""
  alts = [re.sub(r"\[(\w)\]", r"\1", w) if w.startswith("[") else f"(?i:{w})"
          for w in words.split("|")]
  return "(?:" + "|".join(a if not a[0].isalpha() else a[0] + f"(?i:{a[1:]})" for a in alts) + ")"


_ABBREV1 = _caseless(  # ABMONTH ABDAYS ABSTATE ABCOMP ABNUM ABPTIT: usually before lower case.
    r"Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|Mon|Tue|Tues|Wed|Thu|Thurs|Fri|"
    r"Ala|Ariz|[A]z|[A]rk|Calif|Colo|Conn|Ct|Dak|[D]el|Fla|Ga|[I]ll|Ind|Kans?|Ky|[L]a|[M]ass|Md|"
    r"Mich|Minn|[M]iss|Mo|Mont|Neb|Nev|Okla|[O]re|[P]a|Penn|Tenn|[T]ex|Va|Vt|[W]ash|Wisc?|Wyo|"
    r"Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys|tel|est|ext|sq|"
    r"Jr|Sr|Bros|Ed\.D|Ph\.D|Blvd|Rd|Esq|etc|al|seq|Bldg") + r"\."
_ABBREV4 = _caseless(  # ABTITLE and others: usually before upper case.
    r"Mr|Mrs|Ms|[M]iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|"
    r"Cpl|Pvt|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst|"
    r"Assoc|Ens|Insp|Mlle|Mme|Msgr|Sfc|vs|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph|"
    r"Invt|Elec|Natl|M[ft]g|Dept")
_ABBREV4 = rf"(?:{_ABBREV4}|{_ACRO})"
_ABBREV3 = r"(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\."  # Only before a number.
# After an acronym these words start a sentence (case-sensitive first letter).
_SENTENCE_STARTS = "|".join(w[0] + f"(?i:{w[1:]})" for w in (
    r"About According Additionally After An A As At But Earlier He Her Here However If In It Last "
    r"Many More Mr\. Ms\. Now Once One Other Our She Since So Some Such That The Their Then There "
    r"These They This We When While What Yet You").split())
_FILENAME = (rf"(?:{_LETTER}|\d)+(?:\.(?:{_LETTER}|\d)+)*\."
             r"(?i:bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|"
             r"mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)")
# Sic: ",-_" in the second class is a range, as in PTBLexer.flex.
_LIKELY_URL = (r"(?:(?:www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})|"
               r"(?:(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(?i:com|net|org|edu)))"
               r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?")
_EMAIL = (r"(?:&lt;|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*"
          r"[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:&gt;|>)?")
_PHONE = (r"(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[- \u00A0])?[0-9]{2,4}[- \u00A0])"
          r"[0-9]{3,4}[- \u00A0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\."
          r"[0-9]{3,5}")
_ASIAN_SMILEY = (r"[\^x=~<>]\.\[\^x=~<>\]|[-\^x=~<>']_[-\^x=~<>']|\([-\^x=~<>'][_.]?[-\^x=~<>']\)|"
                 r"\([\^x=~<>']-[\^x=~<>'`]\)")  # Sic: the first has a literal "[^x=~<>]".
_MISC = ("[+%&~^|\\\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00BA\u00D7\u00F7\u0387"
         "\u05BE\u05C0\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B\u061E"
         "\u066A\u066D\u0703-\u070D\u07F6-\u07F8\u0964\u0965\u0E4F\u1FBD\u2016\u2017\u2020-\u2023"
         "\u2030-\u2038\u203B\u203E-\u2042\u2044\u207A-\u207F\u208A-\u208E\u2100-\u214F"
         "\u2190-\u21FF\u2200-\u2BFF\u3012\u30FB\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]")
_SUBSUPNUM = (r"[\u207A\u207B\u208A\u208B]?"
              r"(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)")
_CURRENCY_SIGNS = (r"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1"
                   r"\uFFE5\uFFE6]")
_QUOTE_MAP = [("\u0091", "`"), ("\u2018", "`"), ("\u201B", "`"),
              ("\u2039", "`"), ("\u0092", "'"), ("\u2019", "'"), ("\u203A", "'"),
              ("\u0093", "``"), ("\u201C", "``"), ("\u00AB", "``"), ("\u0094", "''"),
              ("\u201D", "''"), ("\u00BB", "''")]


def _quote(left: bool):
  """PTBLexer's latexQuotes: ' and " to ` `` (probably opening) or ' '' (closing), then the
  typographic quotes by their direction."""
  def action(tok):
    tok = re.sub("&apos;|'", "`" if left else "'", tok)
    tok = re.sub('"|&quot;', "``" if left else "''", tok)
    for old, new in _QUOTE_MAP:
      tok = tok.replace(old, new)
    return tok
  return action


def _keep(tok):
  return tok


def _const(value):
  return lambda tok: value


def _unhyphen(tok):
  """removeSoftHyphens (U+00AD), never leaving an empty token."""
  return tok.replace("\u00AD", "") or "-"


def _amp(tok):
  return re.sub("(?i)&amp;", "&", tok)


def _nbsp(tok):
  return tok.replace(" ", "\u00A0")


def _parens(tok):
  return tok.replace("(", "-LRB-").replace(")", "-RRB-")


def _currency(tok):
  tok = tok.replace("\u00A2", "cents").replace("\u00A3", "#")
  return re.sub("[\u0080\u00A4\u20A0\u20AC]", "$", tok)


def _fraction(tok):
  return {"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4", "\u2153": "1/3",
          "\u2154": "2/3"}.get(tok, tok)


# PTBLexer.flex's rules in its order, as (pattern, trailing context or None, action). JFlex takes
# the longest match, trailing context included, then the earliest rule. Options as pycocoevalcap
# runs it: ptb3Escaping defaults, splitAssimilations, no americanize, untokenizable deleted.
_RULES = [
    (r"(?i:c\+\+|[cf]#)", None, _keep),
    (r"(?i:can)", r"(?i:not)", _keep),  # Assimilations are split: "cannot" -> "can" "not".
    (r"'(?i:t)", r"(?i:was|is)", _keep),
    (r"(?i:gon|wan)", r"(?i:na)", _keep),
    (r"(?i:got)", r"(?i:ta)", _keep),
    (r"(?i:lem|gim)", r"(?i:me)", _keep),
    (_SGML, None, _nbsp),
    (r"&(?i:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", None, _const("--")),
    (r"(?i:&amp;)", None, _amp),
    (r"&(?i:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);", None, _keep),
    (_WORD, _REDAUX, _unhyphen),
    (_SWORD, _SREDAUX, _unhyphen),
    (_WORD, None, _unhyphen),
    (rf"{_APOS}(?i:n){_APOS}?", None, _keep),  # APOWORD, one alternative a rule (longest wins).
    (rf"[lLdDjJ]{_APOS}", None, _keep),
    (rf"(?i:dunkin|somethin|ol){_APOS}", None, _keep),
    (rf"{_APOS}(?i:em)", None, _keep),
    (rf"[A-HJ-XZn]{_APOSX}{_L}{_L}+", None, _keep),
    (rf"{_APOS}[2-9]0(?i:s)|{_APOS}(?i:till?|cause)", None, _keep),
    (rf"{_L}+[aeiouyAEIOUY]{_APOSX}[aeiouA-Z]{_L}*", None, _keep),
    (rf"(?i:cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)|O{_APOSX}(?i:o)", None,
     _keep),
    (rf"(?i:y){_APOS}", _L, _keep),
    (r"(?i:https?)://[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},-]", None, _keep),
    (_LIKELY_URL, None, _keep),
    (_EMAIL, None, _keep),
    (rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{_LETTER}+", None, _keep),  # Twitter names and hashtags.
    (_REDAUX, r"[^A-Za-z]", _quote(False)),
    (_SREDAUX, r"[^A-Za-z]", _quote(False)),
    (r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}", None, _keep),
    (r"[-+]?\d+", None, _unhyphen),
    (r"[-+]?\d*(?:[.:,\u00AD\u066B\u066C]\d+)+", None, _unhyphen),
    (_SUBSUPNUM, None, _keep),
    (r"(?:\d{1,4}[- \u00A0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}", None, _nbsp),
    (r"[\u00BC\u00BD\u00BE\u2153-\u215E]", None, _fraction),
    (rf"-(?i:RRB|LRB|RCB|LCB|RSB|LSB)-|(?i:C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls)|"
     rf"(?i:cap){_APOS}(?i:n)|(?i:c){_APOS}(?i:est)", None, _amp),
    (r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", None, _keep),
    (r"[A-Z]*\$|#", None, _keep),
    (_CURRENCY_SIGNS, None, _currency),
    # An acronym before a sentence start keeps its period, a one-letter one ("I.") does not.
    (rf"{_ACRO2}\.", rf"{_SPACENL}+(?:{_SENTENCE_STARTS}|{_SGML}){_SPACENL}", _keep),
    (r"[A-Za-z]", rf"\.{_SPACENL}+(?:{_SENTENCE_STARTS}|{_SGML}){_SPACENL}", _keep),
    (_ABBREV3, rf"{_SPACENL}?\d", _keep),
    (r"(?i:pt[ey]|co)\.", rf"{_SPACE}(?i:ltd|lim)", _keep),
    (_ABBREV1, rf"{_SPACENL}(?:{_SPACENL}|[A-Z]|{_SGML})", _keep),
    (_ABBREV1, r"[\s\S]{2}", _keep),
    (_ABBREV1, None, _keep),
    (rf"{_ABBREV4}\.", None, _keep),
    (_ABBREV4, _SPACE, _keep),
    (_ACRO, _SPACENL, _keep),
    (rf"{_APOS}[0-9][0-9]", _SPACENL, _keep),
    (_FILENAME, rf"{_SPACENL}|[.?!,]", _keep),
    (rf"{_WORD}\.", r"[,;:\u3001]", _unhyphen),
    (_PHONE, None, lambda t: _parens(_nbsp(t))),
    (r"\"|&quot;", r"[A-Za-z0-9$]", _quote(True)),
    (r"\"|&quot;", None, _quote(False)),
    (r"<|&lt;", None, _const("<")),
    (r">|&gt;", None, _const(">")),
    (r"[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]]", r"[^A-Za-z0-9]", _parens),  # Smileys.
    (_ASIAN_SMILEY, None, _parens),
    (r"\{", None, _const("-LCB-")),
    (r"\}", None, _const("-RCB-")),
    (r"\[", None, _const("-LSB-")),
    (r"\]", None, _const("-RSB-")),
    (r"\(", None, _const("-LRB-")),
    (r"\)", None, _const("-RRB-")),
    (r"-+", None, lambda t: "--" if len(t) in (3, 4) else t),
    (r"\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]", None, _const("...")),
    (r"@+|#+|_+", None, _keep),
    (r"\*+|(?:\\\*){1,3}", None, _keep),
    (r"[,;:\u3001]", None, _keep),
    (r"[?!]+", None, _keep),
    (r"[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]", None, _keep),
    (r"[=/]", None, _keep),
    (_HTHING + r"\.", r"[,;:\u3001]", _unhyphen),
    (_HTHING, None, _unhyphen),
    (_THING + r"\.", r"[,;:\u3001]", _keep),
    (_THING, None, _keep),
    (_THINGA + r"\.", r"[,;:\u3001]", _amp),
    (_THINGA, None, _amp),
    (r"'", r"[A-Za-z][^ \t\n\r\u00A0]", _quote(True)),
    (_REDAUX, None, _quote(False)),
    (_SREDAUX, None, _quote(False)),
    (_APOS, None, _quote(False)),  # QUOTES, one alternative a rule.
    (r"''", None, _quote(False)),
    (r"[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F\u2039\u203A"
     r"\u00AB\u00BB]{1,2}", None, _quote(False)),
    (r"<<|>>", None, _keep),
    (_MISC, None, _keep),
]


def _compile(pattern: str) -> re.Pattern:
  # \d is the lexer's DIGIT: Unicode decimal digits, less two blocks newer than its tables.
  return re.compile(pattern.replace(r"\d", r"[^\D\u0DE6-\u0DEF\uA9F0-\uA9F9]"))


@functools.cache
def _compiled_rules() -> list:
  """(token regex, regex with its trailing context or None, action); compiled on first use."""
  return [(_compile(f"(?P<tok>{pat})" + (f"(?={ctx})" if ctx else "")),
           _compile(f"(?:{pat})(?:{ctx})") if ctx else None, action)
          for pat, ctx, action in _RULES]


_SKIP = re.compile(r"[ \t\u00A0\u2000-\u200B\u200E\u200F\u3000\uFEFF\0\x7f\r\n\u2028\u2029"
                   r"\u000B\u000C\u0085]+|&nbsp;")
# pycocoevalcap's PUNCTUATIONS, compared after lower-casing (so "-lrb-" is kept, as there).
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?",
                             "!", ",", ":", "-", "--", "...", ";"])


def _longest(text: str, pos: int):
  """JFlex's choice: the longest match (counting trailing context), the earliest rule on ties."""
  best, best_len = None, 0
  for rx, full, action in _compiled_rules():
    m = rx.match(text, pos)
    if m is None:
      continue
    size = full.match(text, pos).end() - pos if full is not None else m.end() - pos
    if size > best_len:
      best, best_len = (m.group("tok"), action), size
  return best


def _lex(text: str):
  """Yields (offset, token) over the whole text, as PTBLexer reads its input file."""
  pos = 0
  while pos < len(text):
    skip = _SKIP.match(text, pos)
    if skip:
      pos = skip.end()
      continue
    best = _longest(text, pos)
    if best is None:  # Untokenizable: PTBTokenizer deletes it (with a warning).
      pos += 1
      continue
    tok, action = best
    yield pos, action(tok)
    pos += len(tok)


def ptb_tokens(text: str) -> list[str]:
  """PTBTokenizer's tokens of one line, before lower-casing and punctuation removal."""
  return [tok for _, tok in _lex(text + "\n")]  # pycocoevalcap's captions are lines of a file.


def _clean_tokens(tokens) -> str:
  return " ".join(t for t in (t.lower() for t in tokens) if t not in PTB_PUNCTUATION)


@functools.lru_cache(maxsize=1 << 16)  # References are re-tokenised for every shot count.
def ptb_tokenize(text: str) -> str:
  """One caption as pycocoevalcap's PTBTokenizer leaves it: PTB tokens, lower case, its
  punctuation list removed, joined by spaces. "It's a T-shirt (red)." -> "it 's a t-shirt -lrb- red
  -rrb-". Apply to predictions and references before `cider_d`.

  The caption is read as a line with a newline after it and nothing else; `ptb_tokenize_batch`
  also reproduces the (rare) effects of the neighbouring captions.
  """
  return _clean_tokens(ptb_tokens(text.replace("\n", " ")))


def ptb_tokenize_batch(captions: Sequence[str]) -> list[str]:
  """Captions tokenised exactly as one pycocoevalcap PTBTokenizer().tokenize call does.

  pycocoevalcap writes the batch as the lines of one file, without a final newline, and the lexer
  reads across lines: a caption ending in a one-letter abbreviation ("vitamin C.") loses its period
  when the next caption starts with a word such as "The", and the last caption is read up to the
  end of the file (a final "they're" gives "they re").
  """
  lines = [c.replace("\n", " ") for c in captions]
  text = "\n".join(lines)
  ends = np.cumsum([len(line) + 1 for line in lines])  # Offset just past each line's newline.
  per_line = [[] for _ in lines]
  for pos, tok in _lex(text):
    per_line[int(np.searchsorted(ends, pos, side="right"))].append(tok)
  return [_clean_tokens(tokens) for tokens in per_line]




# --- CIDEr-D (coco-caption cider_scorer.py) ---


def _ngrams(text: str, n: int) -> Counter:
  words = text.split()
  return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> tuple[float, np.ndarray]:
  """CIDEr-D of each prediction against its references: (corpus mean, per-example scores [P]).

  Per n-gram order: cosine of tf-idf vectors, with the prediction's counts clipped to the
  reference's, times a Gaussian length penalty exp(-Δ²/2σ²); averaged over orders and references,
  times 10. Document frequencies come from the references of all examples. As coco-caption, Δ is
  measured in bigram counts and texts are split on spaces (apply `ptb_tokenize` first).
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


def _average_ranks(values: np.ndarray) -> np.ndarray:
  """1-based ranks, tied values sharing the mean of their ranks (scipy's rankdata 'average')."""
  order = np.argsort(values, kind="mergesort")
  sorted_values = values[order]
  starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
  ends = np.r_[starts[1:], len(values)]  # Exclusive.
  mean_rank = (starts + ends + 1) / 2.0  # Mean of the 1-based ranks starts+1 .. ends.
  ranks = np.empty(len(values), np.float64)
  ranks[order] = np.repeat(mean_rank, ends - starts)
  return ranks


def roc_auc(scores, labels) -> float:
  """Area under the ROC curve of scores [N] (higher = positive) for binary labels [N] in {0, 1}.

  The Mann-Whitney statistic with average ranks for ties, which equals sklearn's roc_auc_score
  (trapezoids through tied scores). HatefulMemes reports it.
  """
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
  if scores.ndim != 1 or labels.shape != scores.shape:
    raise ValueError(f"roc_auc: scores and labels must both be [N]; got {scores.shape} and "
                     f"{labels.shape}.")
  if not np.isfinite(scores).all():
    raise ValueError("roc_auc: scores has NaN or infinite values; expected finite scores.")
  if not np.isin(labels, (0, 1)).all():
    raise ValueError(f"roc_auc: labels must be 0 or 1; got values {np.unique(labels)[:5]}.")
  positive = labels.astype(bool)
  n_pos, n_neg = int(positive.sum()), int((~positive).sum())
  if n_pos == 0 or n_neg == 0:
    raise ValueError(f"roc_auc: labels has {n_pos} positives and {n_neg} negatives; expected both "
                     "classes (the AUC is undefined with one).")
  rank_sum = _average_ranks(scores)[positive].sum()
  return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
