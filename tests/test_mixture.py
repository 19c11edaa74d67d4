"""The mixture: per-host splitting, determinism, exact resume, global arrays, TFDS sources and
worker processes."""
import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from flamingo_jax.configs import tiny
from flamingo_jax.data import mixture
from flamingo_jax.data import pp
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.train import input as input_lib

WORDS = ["red", "green", "blue", "circle", "square", "triangle"]
PAIR_PP = "flip|resize_pad(8)|value_range(-1, 1)|tokenize_pair(max_len=8)"
DOC_PP = "resize_pad(8)|value_range|tokenize_document(max_len=16, max_media=2, p_next=0.5)"


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
  texts = [f"a {a} {b}" for a in WORDS for b in WORDS]
  path = str(tmp_path_factory.mktemp("tok") / "sp.model")
  tokenizer_lib.train_sentencepiece(texts, 40, path)
  return path


@pytest.fixture(scope="module")
def tok(tok_path):
  return tokenizer_lib.load_tokenizer(tok_path)


def _pairs(n):
  """Records whose pixels and caption identify them."""
  return [{"image": np.full([6, 4, 3], i, np.uint8),
           "caption": f"a {WORDS[i % 6]} {WORDS[i // 6 % 6]}"} for i in range(n)]


def _docs(n):
  return [{"images": np.full([i % 3, 5, 5, 3], i, np.uint8),
           "texts": [f"a {WORDS[(i + j) % 6]}".encode() for j in range(i % 3 + 1)]}
          for i in range(n)]


DATASETS = {
    "pairs": {"tfds_name": "unused", "split": "train", "batch_size": 4, "pp": PAIR_PP,
              "weight": 0.2},
    "docs": {"tfds_name": "unused", "split": "train", "batch_size": 2, "pp": DOC_PP},
}


def _mixture(tok, seed=0, **kw):
  return mixture.Mixture(DATASETS, {"pairs": _pairs(10), "docs": _docs(7)}, tokenizer=tok,
                         seed=seed, **kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_equal(a, b):
  assert a.keys() == b.keys()
  for name in a:
    for field in a[name]:
      np.testing.assert_array_equal(a[name][field], b[name][field], err_msg=f"{name}/{field}")


def test_batches_and_weights(tok):
  it = _mixture(tok)
  assert it.weights == {"pairs": 0.2, "docs": 1.0}
  batch = next(it)
  assert batch["pairs"]["images"].shape == (4, 1, 1, 8, 8, 3)
  assert batch["pairs"]["tokens"].shape == (4, 8) and batch["pairs"]["media_mask"].shape == (4, 1)
  assert batch["docs"]["images"].shape == (2, 2, 1, 8, 8, 3)
  assert batch["docs"]["loss_mask"].shape == (2, 16)
  assert it.get_state() == {"step": 1}


def test_every_epoch_is_a_permutation():
  positions = np.arange(30)
  records = mixture.record_indices(10, positions, seed=0, name="pairs")
  for epoch in range(3):
    assert sorted(records[epoch * 10:(epoch + 1) * 10]) == list(range(10))
  assert not np.array_equal(records[:10], records[10:20])  # Reshuffled each epoch.


def test_deterministic_given_seed(tok):
  for a, b in zip(_take(_mixture(tok), 4), _take(_mixture(tok, num_workers=2), 4)):
    _assert_equal(a, b)
  other = next(_mixture(tok, seed=1))["pairs"]["images"]
  assert not np.array_equal(next(_mixture(tok))["pairs"]["images"], other)


def test_resume_sees_exactly_the_uninterrupted_batches(tok):
  uninterrupted = _take(_mixture(tok), 7)  # Several epochs of both datasets.
  first = _mixture(tok)
  _take(first, 3)
  state = json.loads(json.dumps(first.get_state()))
  resumed = _mixture(tok)
  resumed.set_state(state)
  for a, b in zip(uninterrupted[3:], _take(resumed, 4)):
    _assert_equal(a, b)
  with pytest.raises(ValueError, match="mixture state"):
    resumed.set_state({"step": -1})


def test_hosts_split_the_global_batch(tok):
  fn = pp.build(PAIR_PP, tok)
  kw = {"step": 3, "batch_size": 4, "seed": 0, "name": "pairs"}
  whole = mixture.host_batch(_pairs(10), fn, **kw)
  halves = [mixture.host_batch(_pairs(10), fn, process_index=h, process_count=2, **kw)
            for h in range(2)]
  for field in whole:
    np.testing.assert_array_equal(np.concatenate([h[field] for h in halves]), whole[field])
  with pytest.raises(ValueError, match="batch_size=4 is not divisible by process_count=3"):
    mixture.host_batch(_pairs(10), fn, process_index=0, process_count=3, **kw)
  with pytest.raises(ValueError, match="process_index=2 is outside"):
    _mixture(tok, process_index=2, process_count=2)


def test_global_arrays_on_a_mesh(tok):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "model"))
  datasets = {"pairs": {**DATASETS["pairs"], "batch_size": 8}}
  it = mixture.Mixture(datasets, {"pairs": _pairs(10)}, tokenizer=tok, seed=0, mesh=mesh)
  host = mixture.Mixture(datasets, {"pairs": _pairs(10)}, tokenizer=tok, seed=0)
  batch, expected = next(it)["pairs"], next(host)["pairs"]
  for field, x in batch.items():
    assert isinstance(x, jax.Array) and x.shape == expected[field].shape
    assert x.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(x), expected[field])
  with pytest.raises(ValueError, match="not divisible by the 4 devices"):
    mixture.to_global({"tokens": np.zeros([6, 8], np.int32)}, mesh)
  with pytest.raises(ValueError, match="lacks"):
    mixture.to_global({"tokens": np.zeros([8, 8], np.int32)}, mesh, ("data", "pod"))


def test_config_errors(tok):
  with pytest.raises(ValueError, match="'pairs': fields .*expected"):
    mixture.Mixture({"pairs": {"split": "train", "batch_size": 4, "pp": PAIR_PP}},
                    {"pairs": _pairs(4)}, tokenizer=tok, seed=0)
  with pytest.raises(ValueError, match="no datasets"):
    mixture.make_mixture({}, tokenizer=tok, seed=0)
  bad = {"pairs": {**DATASETS["pairs"], "pp": "tokenize_pair(max_len=8)"}}  # No resize: sizes vary.
  records = _pairs(2) + [{"image": np.zeros([3, 3, 3], np.uint8), "caption": "a red"}]
  with pytest.raises(ValueError, match="'pairs': pp field 'images' has shapes"):
    _take(mixture.Mixture(bad, {"pairs": records}, tokenizer=tok, seed=0), 3)


class MixtureTinyPairs(tfds.core.GeneratorBasedBuilder):
  """A local pairs dataset of the contract's features: image, caption."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(6, 6, 3)), "caption": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(6)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": np.full([6, 6, 3], 10 * i, np.uint8), "caption": f"a {WORDS[i]}"}


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
  """MixtureTinyPairs, prepared once per module (ArrayRecord: the workers unpickle its source)."""
  return {"tfds_name": "mixture_tiny_pairs", "split": "train", "batch_size": 2,
          "data_dir": str(tmp_path_factory.mktemp("tfds")),
          "pp": "decode|resize_pad(8)|value_range|tokenize_pair(max_len=8)"}


def test_tfds_builder_source(tok, tiny_pairs):
  cfg = {**tiny_pairs, "batch_size": 3}
  first = next(mixture.make_mixture({"pairs": cfg}, tokenizer=tok, seed=0))["pairs"]
  resumed = mixture.make_mixture({"pairs": cfg}, tokenizer=tok, seed=0, state={"step": 1})
  second = next(resumed)["pairs"]
  pixels = sorted(np.concatenate([b["images"][:, 0, 0, 4, 4, 0] for b in (first, second)]))
  np.testing.assert_allclose(pixels, np.arange(6) * 10 / 127.5 - 1, atol=1e-6)  # One epoch.


def test_cached_datasets_on_one_split_read_it_once_and_give_the_uncached_batches(tok, tiny_pairs):
  both = lambda cache: {"a": {**tiny_pairs, "cache": cache},
                        "b": {**tiny_pairs, "cache": cache, "pp": "tokenize_pair(max_len=8)"}}
  cached = mixture.make_mixture(both(True), tokenizer=tok, seed=0)
  assert isinstance(cached._sources["a"], list)  # pylint: disable=protected-access
  assert cached._sources["a"] is cached._sources["b"]  # pylint: disable=protected-access
  for a, b in zip(_take(cached, 4), _take(mixture.make_mixture(both(False), tokenizer=tok, seed=0),
                                          4)):
    _assert_equal(a, b)


def test_coco_captions_through_mock_data(tok):
  cfg = {"tfds_name": "coco_captions", "split": "train", "batch_size": 4,
         "pp": "choose('captions/text', 'caption')|decode|resize_pad(16)|flip|value_range(-1, 1)|"
               "tokenize_pair(max_len=12)"}
  with tfds.testing.mock_data(num_examples=5):
    batches = _take(mixture.make_mixture({"coco": cfg}, tokenizer=tok, seed=0), 2)
    again = _take(mixture.make_mixture({"coco": cfg}, tokenizer=tok, seed=0), 2)
  for a, b in zip(batches, again):
    _assert_equal(a, b)
  coco = batches[0]["coco"]
  assert coco["images"].shape == (4, 1, 1, 16, 16, 3) and coco["tokens"].shape == (4, 12)
  assert (coco["tokens"][:, :2] == [tok.bos_id, tok.image_id]).all()


# ------------------------------------------------------------------------ worker processes


def test_worker_processes_give_the_in_process_batches(tok, tok_path, tiny_pairs):
  datasets = {**DATASETS, "tiny": tiny_pairs}
  sources = {"pairs": _pairs(10), "docs": _docs(7),
             "tiny": mixture.open_source("mixture_tiny_pairs", "train", tiny_pairs["data_dir"])}
  host = {"process_index": 1, "process_count": 2}  # This host's half of each global batch.
  expected = _take(mixture.Mixture(datasets, sources, tokenizer=tok, seed=0, **host), 6)
  with mixture.Mixture(datasets, sources, tokenizer=tok_path, seed=0, worker_processes=2,
                       **host) as it:
    for a, b in zip(expected, _take(it, 4)):
      _assert_equal(a, b)
    it.set_state({"step": 1})  # Resume elsewhere: the prefetched step 4 is dropped.
    for a, b in zip(expected[1:], _take(it, 5)):
      _assert_equal(a, b)
    assert it.get_state() == {"step": 6}
    workers = list(it._executor._processes.values())  # pylint: disable=protected-access
  assert len(workers) == 2 and not any(w.is_alive() for w in workers)  # Closed.


def test_an_error_in_a_worker_names_the_dataset_and_record(tok, tok_path):
  datasets = {"pairs": {**DATASETS["pairs"], "batch_size": 3}}
  records = _pairs(2) + [{"image": np.zeros([6, 4, 3], np.uint8)}]  # Record 2 has no caption.
  message = r"dataset 'pairs': record 2 \(stream position \d\) failed: KeyError"
  with pytest.raises(mixture.PPError, match=message):
    next(mixture.Mixture(datasets, {"pairs": records}, tokenizer=tok, seed=0))
  with mixture.Mixture(datasets, {"pairs": records}, tokenizer=tok_path, seed=0,
                       worker_processes=1) as it:
    with pytest.raises(mixture.PPError, match=message):
      next(it)
  with pytest.raises(ValueError, match="must pickle to reach the workers.*tokenizer as its path"):
    mixture.Mixture(datasets, {"pairs": records}, tokenizer=tok, seed=0, worker_processes=1)
  with mixture.Mixture(datasets, {"pairs": records}, tokenizer=tok_path, seed=0,
                       worker_processes=1, modules=["no_such_module_xyz"]) as it:
    with pytest.raises(RuntimeError, match="an input worker process died or failed to start"):
      next(it)


def test_the_tokenizer_must_fit_the_model_embedding(tok, tok_path):
  config = tiny.get_config()
  config.input.tokenizer = tok_path
  for vocab_size in (64, tok.vocab_size):  # The new-token rows hold <image> and <EOC>.
    config.model.lm.vocab_size = vocab_size
    input_lib.check_vocab(config, tok)
  config.model.lm.vocab_size = tok.vocab_size - 1
  with pytest.raises(ValueError, match=(
      rf"config.input.tokenizer='.*sp.model' has {tok.vocab_size} tokens \+ 2 added .*"
      rf"has {tok.vocab_size + 1} rows \(config.model.lm.vocab_size={tok.vocab_size - 1} \+ 2")):
    input_lib.check_vocab(config, tok)
  text = {"text": {"vocab_size": 9}}  # The contrastive text tower: one table, no new rows.
  assert input_lib.embedding_rows(text) == ("config.model.text.vocab_size", 9, 9)
  plain_lm = input_lib.embedding_rows(config.model.lm)  # As model_name='lm' has it.
  assert plain_lm == ("config.model.vocab_size", tok.vocab_size - 1, tok.vocab_size + 1)
