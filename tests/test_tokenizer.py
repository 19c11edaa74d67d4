"""Tokenizers: SentencePiece and Hugging Face backends, specials added after the base vocabulary."""
import json

import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import models, pre_tokenizers, processors

from flamingo_jax.data import tokenizer as tokenizer_lib

CORPUS = [f"a {c} {s} is {w} the {p}" for c in ("red", "green", "blue")
          for s in ("circle", "square") for w in ("above", "below") for p in ("tree", "house")] * 5


def test_sentencepiece_training_is_deterministic_and_specials_follow_the_base(tmp_path):
  a = tokenizer_lib.train_sentencepiece(CORPUS, 60, str(tmp_path / "a.model"))
  tokenizer_lib.train_sentencepiece(CORPUS, 60, str(tmp_path / "b.model"))
  assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
  assert (a.bos_id, a.eos_id, a.pad_id) == (1, 2, 3)  # The base has them: nothing else is added.
  assert a.num_new_tokens == 2
  assert (a.image_id, a.eoc_id) == (a.vocab_size, a.vocab_size + 1)
  assert a.total_vocab_size == a.vocab_size + 2
  ids = a.encode("a red circle is above the tree")
  assert all(0 <= i < a.vocab_size for i in ids)
  assert a.decode(ids) == "a red circle is above the tree"
  assert a.encode(b"a red circle") == a.encode("a red circle")


def test_special_strings_in_text_are_plain_text(tmp_path):
  tok = tokenizer_lib.train_sentencepiece(CORPUS, 60, str(tmp_path / "sp.model"))
  ids = tok.encode("a <image> tree <EOC>")
  assert tok.image_id not in ids and tok.eoc_id not in ids and tok.bos_id not in ids


def test_decode_renders_or_skips_specials(tmp_path):
  tok = tokenizer_lib.train_sentencepiece(CORPUS, 60, str(tmp_path / "sp.model"))
  ids = [tok.bos_id, tok.image_id, *tok.encode("a red tree"), tok.eoc_id, tok.eos_id, tok.pad_id]
  assert tok.decode(ids) == "<image>a red tree<EOC>"  # SentencePiece drops its own BOS/EOS/pad.
  assert tok.decode(ids, skip_special=True) == "a red tree"
  with pytest.raises(ValueError, match="outside"):
    tok.decode([tok.total_vocab_size])


def test_sentencepiece_without_bos_eos_pad_gets_them_added(tmp_path):
  path = str(tmp_path / "bare.model")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_prefix=path[:-len(".model")], vocab_size=40,
      hard_vocab_limit=False, bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, num_threads=1,
      minloglevel=2)
  tok = tokenizer_lib.load_tokenizer(path)
  v = tok.vocab_size
  assert tok.new_tokens == ("<image>", "<EOC>", "<BOS>", "<EOS>", "<PAD>")
  assert (tok.image_id, tok.eoc_id, tok.bos_id, tok.eos_id, tok.pad_id) == (v, v + 1, v + 2, v + 3,
                                                                            v + 4)
  assert tok.total_vocab_size == v + 5


def _word_level(directory, config=None):
  words = ["[UNK]", "my", "puppy"]  # "<|endoftext|>" is added as special id 3.
  tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens([tokenizers.AddedToken("<|endoftext|>", special=True)])
  directory.mkdir(exist_ok=True)
  tok.save(str(directory / "tokenizer.json"))
  if config:
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
  return directory


def test_hugging_face_tokenizer_json(tmp_path):
  tok = tokenizer_lib.load_tokenizer(str(_word_level(tmp_path / "hf")))  # A folder works too.
  assert tok.vocab_size == 4
  assert (tok.image_id, tok.eoc_id, tok.bos_id, tok.eos_id, tok.pad_id) == (4, 5, 6, 7, 8)
  assert tok.encode("my puppy") == [1, 2]
  assert tok.encode("my <|endoftext|>") == [1, 0]  # The base's special is text here, too.
  assert tok.decode([6, 4, 1, 2, 5, 7]) == "<BOS><image>my puppy<EOC><EOS>"
  assert tok.decode([6, 4, 1, 2, 5, 7], skip_special=True) == "my puppy"


def test_hugging_face_specials_named_by_tokenizer_config(tmp_path):
  directory = _word_level(tmp_path / "hf", {"eos_token": {"content": "<|endoftext|>"},
                                            "bos_token": "<|endoftext|>"})
  tok = tokenizer_lib.load_tokenizer(str(directory / "tokenizer.json"))
  assert (tok.bos_id, tok.eos_id) == (3, 3)
  assert tok.new_tokens == ("<image>", "<EOC>", "<PAD>") and tok.pad_id == 6


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.model' is not a file"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "missing.model"))
  with pytest.raises(FileNotFoundError, match="not a file or a folder with a 'tokenizer.json'"):
    tokenizer_lib.load_tokenizer(str(tmp_path))
  (tmp_path / "vocab.txt").write_text("a\n")
  with pytest.raises(ValueError, match="neither"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "vocab.txt"))
  with pytest.raises(ValueError, match="must end with '.model'"):
    tokenizer_lib.train_sentencepiece(CORPUS, 60, str(tmp_path / "sp.bin"))


def test_new_tokens_json_fixes_the_order_and_roles_of_a_foreign_model(tmp_path):
  """OpenFlamingo appends <|endofchunk|>, <image>, <PAD>: ids its embedding rows were trained on."""
  directory = _word_level(tmp_path / "hf", {"eos_token": "<|endofchunk|>x", "bos_token": None})
  spec = {"new_tokens": ["<|endofchunk|>", "<image>", "<PAD>"], "image": "<image>",
          "eoc": "<|endofchunk|>", "pad": "<PAD>", "bos": "<|endofchunk|>",
          "eos": "<|endofchunk|>"}
  (directory / tokenizer_lib.NEW_TOKENS_FILE).write_text(json.dumps(spec))
  tok = tokenizer_lib.load_tokenizer(str(directory))
  assert tok.new_tokens == ("<|endofchunk|>", "<image>", "<PAD>")
  assert (tok.eoc_id, tok.image_id, tok.pad_id, tok.bos_id) == (4, 5, 6, 4)
  assert tok.decode([5, 1, 2, 4]) == "<image>my puppy<|endofchunk|>"
  for broken, match in (({**spec, "eoc": "<EOC>"}, "eoc='<EOC>' is not one of new_tokens"),
                        ({k: v for k, v in spec.items() if k != "image"}, "'image' role"),
                        ({**spec, "new_tokens": ["<image>", "<image>"]}, "distinct strings"),
                        ({**spec, "colour": "red"}, r"unknown keys \['colour'\]")):
    (directory / tokenizer_lib.NEW_TOKENS_FILE).write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=match):
      tokenizer_lib.load_tokenizer(str(directory))
  del spec["pad"], spec["bos"]
  (directory / tokenizer_lib.NEW_TOKENS_FILE).write_text(json.dumps(spec))
  with pytest.raises(ValueError, match=r"no \['bos', 'pad'\] token"):
    tokenizer_lib.load_tokenizer(str(directory))


@pytest.mark.parametrize("bos, template, config_adds, expected", [
    ("<|endoftext|>", False, None, False),  # GPT-NeoX (OpenFlamingo-MPT): BOS named, never added.
    ("<|endoftext|>", True, None, True),  # LLaMA: the post-processor puts BOS first.
    ("<|endoftext|>", True, False, False),  # The config's add_bos_token decides when it says.
    ("<|endoftext|>", False, True, True),
    (None, False, None, True),  # No BOS at all: the added <BOS> (a trained new-token row).
])
def test_sequences_start_with_bos_as_the_model_was_trained(tmp_path, bos, template, config_adds,
                                                           expected):
  config = {k: v for k, v in (("bos_token", bos), ("add_bos_token", config_adds)) if v is not None}
  directory = _word_level(tmp_path / "hf", config)
  if template:
    tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 3)])
    tok.save(str(directory / "tokenizer.json"))
  tok = tokenizer_lib.load_tokenizer(str(directory))
  assert tok.add_bos is expected and tok.prefix == ([tok.bos_id] if expected else [])
  if config_adds is None and bos:  # What transformers feeds the model for the same files.
    from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
    hf = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), bos_token=bos)
    assert hf("my puppy").input_ids == tok.prefix + tok.encode("my puppy")


def test_sentencepiece_sequences_start_with_bos(tmp_path):
  tok = tokenizer_lib.train_sentencepiece(CORPUS, 60, str(tmp_path / "sp.model"))
  assert tok.prefix == [tok.bos_id] == [1]
