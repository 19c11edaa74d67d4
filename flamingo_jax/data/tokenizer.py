"""Tokenizers: SentencePiece (the paper's) or Hugging Face `tokenizer.json`, plus the specials.

`<image>` and `<EOC>` (and `<BOS>`, `<EOS>`, `<PAD>` when the base model has none) are appended
after the base vocabulary, with ids `vocab_size + k`: the frozen LM's embedding table stays as it is
and the model keeps a separate trainable table of `num_new_tokens` rows for them. `encode` never
produces specials: "<image>" in a text is tokenised as plain text; only `interleave` inserts them.

Sequences start with BOS (`prefix`) unless a Hugging Face tokenizer names a BOS that its model's
sequences do not start with (its `add_bos_token`, else what its post-processor adds), e.g.
OpenFlamingo-MPT's GPT-NeoX tokenizer: the frozen LM never saw it there. A base without any BOS
gets the added <BOS>, a new-token row that Flamingo training learns.

A model trained elsewhere fixes its own new tokens: a `new_tokens.json` beside a `tokenizer.json`
lists them in id order and names their roles, e.g. OpenFlamingo's
`{"new_tokens": ["<|endofchunk|>", "<image>", "<PAD>"], "image": "<image>",
"eoc": "<|endofchunk|>", "pad": "<PAD>"}` (`convert/open_flamingo.py` writes it).
"""
import dataclasses
import io
import json
import os
from typing import Callable, Iterable, Sequence

import sentencepiece as spm
import tokenizers

IMAGE = "<image>"
EOC = "<EOC>"
_NEW_BOS, _NEW_EOS, _NEW_PAD = "<BOS>", "<EOS>", "<PAD>"


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A base tokenizer and the special tokens added after its vocabulary."""
  vocab_size: int  # Rows of the base (frozen) embedding table.
  new_tokens: tuple[str, ...]  # Strings of ids vocab_size, vocab_size + 1, ...
  bos_id: int
  eos_id: int
  pad_id: int
  _encode: Callable[[str], list[int]]
  _decode: Callable[[list[int], bool], str]
  image_token: str = IMAGE
  eoc_token: str = EOC
  add_bos: bool = True

  @property
  def prefix(self) -> list[int]:
    """What every sequence starts with: [BOS], or nothing for a model trained without it."""
    return [self.bos_id] if self.add_bos else []

  @property
  def num_new_tokens(self) -> int:
    return len(self.new_tokens)

  @property
  def total_vocab_size(self) -> int:
    return self.vocab_size + self.num_new_tokens

  @property
  def image_id(self) -> int:
    return self.vocab_size + self.new_tokens.index(self.image_token)

  @property
  def eoc_id(self) -> int:
    return self.vocab_size + self.new_tokens.index(self.eoc_token)

  @property
  def special_ids(self) -> frozenset[int]:
    return frozenset([self.bos_id, self.eos_id, self.pad_id,
                      *range(self.vocab_size, self.total_vocab_size)])

  @property
  def text_ids(self) -> list[int]:
    """The base vocabulary without BOS/EOS/pad: what random text is drawn from."""
    special = self.special_ids
    return [i for i in range(self.vocab_size) if i not in special]

  def encode(self, text: str | bytes) -> list[int]:
    """Base-vocabulary ids of `text`, no specials (not even BOS/EOS)."""
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    if not isinstance(text, str):
      raise TypeError(f"encode(text) expects str or bytes, got {type(text).__name__}.")
    return list(self._encode(text))

  def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
    """Text of `ids`; added specials render as their strings unless `skip_special`."""
    out, run = [], []
    skipped = self.special_ids if skip_special else frozenset()
    for i in map(int, ids):
      if not 0 <= i < self.total_vocab_size:
        raise ValueError(f"decode: id {i} is outside [0, {self.total_vocab_size}).")
      if i in skipped:
        continue
      if i < self.vocab_size:
        run.append(i)
        continue
      out.append(self._decode(run, skip_special))
      out.append(self.new_tokens[i - self.vocab_size])
      run = []
    out.append(self._decode(run, skip_special))
    return "".join(out)


def _with_specials(vocab_size, bos_id, eos_id, pad_id, encode, decode) -> Tokenizer:
  """Adds `<image>`, `<EOC>` and whichever of BOS/EOS/pad the base lacks (id None or < 0)."""
  new = [IMAGE, EOC]
  ids = []
  for base_id, name in ((bos_id, _NEW_BOS), (eos_id, _NEW_EOS), (pad_id, _NEW_PAD)):
    if base_id is None or base_id < 0:
      new.append(name)
      base_id = vocab_size + len(new) - 1
    ids.append(base_id)
  return Tokenizer(vocab_size, tuple(new), *ids, _encode=encode, _decode=decode)


def _sentencepiece(path: str) -> Tokenizer:
  sp = spm.SentencePieceProcessor(model_file=path)
  return _with_specials(
      sp.vocab_size(), sp.bos_id(), sp.eos_id(), sp.pad_id(),
      encode=sp.encode, decode=lambda ids, skip: sp.decode(ids))


def _hf_config(directory: str) -> dict:
  """The `tokenizer_config.json` beside a tokenizer.json, or {}."""
  path = os.path.join(directory, "tokenizer_config.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _hf_special(config: dict, tok: tokenizers.Tokenizer, key: str) -> int | None:
  """The id of `key` ('bos_token', ...) named by the tokenizer_config.json."""
  token = config.get(key)
  if isinstance(token, dict):
    token = token.get("content")
  return tok.token_to_id(token) if token else None


def _hf_adds_bos(config: dict, tok: tokenizers.Tokenizer, bos_id: int | None) -> bool:
  """Whether the model's sequences start with its BOS, as transformers encodes: the config's
  `add_bos_token` when it says, else whether the post-processor puts BOS first."""
  if bos_id is None:
    return False
  if isinstance(config.get("add_bos_token"), bool):
    return config["add_bos_token"]
  return tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]


NEW_TOKENS_FILE = "new_tokens.json"
# What a Hugging Face tokenizer is made of here; converters copy them beside the weights.
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", NEW_TOKENS_FILE)
_ROLES = ("image", "eoc", "bos", "eos", "pad")


def _declared(path: str, vocab_size: int, base_ids: tuple[int | None, ...], encode, decode,
              add_bos: bool) -> Tokenizer:
  """The Tokenizer of a `new_tokens.json` (see the module docstring): its tokens in its order."""
  with open(path) as f:
    spec = json.load(f)
  new = spec.get("new_tokens") if isinstance(spec, dict) else None
  if not (isinstance(new, list) and new and all(isinstance(t, str) for t in new)
          and len(set(new)) == len(new)):
    raise ValueError(f"{path}: 'new_tokens' must be a non-empty list of distinct strings; got "
                     f"{new!r}.")
  unknown = sorted(set(spec) - {"new_tokens", *_ROLES})
  if unknown:
    raise ValueError(f"{path}: unknown keys {unknown}; expected 'new_tokens' and roles {_ROLES}.")
  for role in _ROLES:
    if role in spec and spec[role] not in new:
      raise ValueError(f"{path}: {role}={spec[role]!r} is not one of new_tokens {new}.")
  for role in ("image", "eoc"):
    if role not in spec:
      raise ValueError(f"{path}: the {role!r} role is required (one of new_tokens {new}).")
  ids = [vocab_size + new.index(spec[role]) if role in spec else base
         for role, base in zip(("bos", "eos", "pad"), base_ids)]
  missing = [role for role, i in zip(("bos", "eos", "pad"), ids) if i is None or i < 0]
  if missing:
    raise ValueError(f"{path}: the base tokenizer has no {missing} token; name one of new_tokens "
                     f"{new} for each.")
  return Tokenizer(vocab_size, tuple(new), *ids, _encode=encode, _decode=decode,
                   image_token=spec["image"], eoc_token=spec["eoc"],
                   add_bos=add_bos or "bos" in spec)


def _hugging_face(path: str) -> Tokenizer:
  tok = tokenizers.Tokenizer.from_file(path)
  tok.encode_special_tokens = True  # "<|endoftext|>" in a text is text, not the special.
  directory = os.path.dirname(path)
  config = _hf_config(directory)
  base_ids = tuple(_hf_special(config, tok, k) for k in ("bos_token", "eos_token", "pad_token"))
  add_bos = _hf_adds_bos(config, tok, base_ids[0])
  encode = lambda text: tok.encode(text, add_special_tokens=False).ids
  decode = lambda ids, skip: tok.decode(ids, skip_special_tokens=skip)
  vocab_size = tok.get_vocab_size(with_added_tokens=True)
  if os.path.exists(os.path.join(directory, NEW_TOKENS_FILE)):
    return _declared(os.path.join(directory, NEW_TOKENS_FILE), vocab_size, base_ids, encode,
                     decode, add_bos)
  return dataclasses.replace(_with_specials(vocab_size, *base_ids, encode=encode, decode=decode),
                             add_bos=add_bos or base_ids[0] is None)


def load_tokenizer(path: str) -> Tokenizer:
  """A `.model` file is SentencePiece; a `tokenizer.json` (or its folder) is Hugging Face."""
  if os.path.isdir(path) and os.path.exists(os.path.join(path, "tokenizer.json")):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"tokenizer path {path!r} is not a file or a folder with a 'tokenizer.json'; expected a "
        "SentencePiece '.model' file, a 'tokenizer.json' or a folder containing one.")
  if path.endswith(".model"):
    return _sentencepiece(path)
  if os.path.basename(path) == "tokenizer.json":
    return _hugging_face(path)
  raise ValueError(
      f"tokenizer path {path!r} is neither a SentencePiece '.model' file nor a 'tokenizer.json'.")


def train_sentencepiece(texts: Sequence[str], vocab_size: int, path: str) -> Tokenizer:
  """Trains a small BPE SentencePiece model on `texts` and writes it to `path` (a `.model` file).

  Deterministic (one thread, no sampling or shuffling) and fast (well under a second for a few
  thousand sentences). `vocab_size` is an upper bound: a small corpus may yield fewer pieces.
  Ids: 0 = <unk>, 1 = BOS, 2 = EOS, 3 = pad.
  """
  if not path.endswith(".model"):
    raise ValueError(f"train_sentencepiece: path {path!r} must end with '.model'.")
  if not texts:
    raise ValueError("train_sentencepiece: texts is empty.")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
      character_coverage=1.0, num_threads=1, shuffle_input_sentence=False,
      hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return load_tokenizer(path)
