"""The paper's few-shot protocol on benchmark fixtures: results per task type, seeds, RICES and its
feature cache, ensembling, video batches, bad inputs, and prompts as OpenFlamingo's evaluate.py
builds them."""
import argparse
import functools
import importlib
import json
import pathlib
import shutil
import sys
import types

import jax
import ml_collections
import numpy as np
import open_flamingo
import pytest

from flamingo_jax.eval import fewshot
from flamingo_jax.eval import metrics
from flamingo_jax.eval import protocol
from flamingo_jax.eval import tasks
from flamingo_jax.eval.benchmarks import Example
from tests import benchmark_fixtures
from tests import model_utils
from tests.test_decode import char_tokenizer

SIZE = 32  # The tiny model's image size.


def preprocess(images):
  """uint8 [..., H, W, 3] -> [..., 32, 32, 3] in [-1, 1] (nearest neighbour)."""
  images = np.asarray(images)
  h, w = images.shape[-3:-1]
  rows, cols = np.arange(SIZE) * h // SIZE, np.arange(SIZE) * w // SIZE
  return fewshot.to_model_range(images[..., rows, :, :][..., cols, :])


@functools.lru_cache(maxsize=None)
def tiny_setup():
  """The tiny Flamingo with a context long enough for character-level prompts, open gates."""
  model, _ = model_utils.tiny_model(**{"lm.max_len": 384})
  images, tokens, media_idx = model_utils.random_inputs(0)
  return model, model_utils.set_gates(model_utils.init(model, images, tokens, media_idx), 0.8)


def context(cache_dir=None, params=None, predictions_dir=None):
  model, tiny_params = tiny_setup()
  return tasks.Context(model, params or tiny_params, char_tokenizer(), preprocess,
                       None if cache_dir is None else str(cache_dir), None,
                       None if predictions_dir is None else str(predictions_dir))


def run(name, root, predictions_dir=None, **fields):
  task = ml_collections.ConfigDict(dict(type=name, data_dir=str(root), **fields))
  return tasks.get(name)(task, context(predictions_dir=predictions_dir))


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
  """Fixture files of the benchmarks the tests run: {name: root}."""
  out = {}
  for i, name in enumerate(("coco", "vqav2", "hateful_memes", "msrvtt_qa")):
    out[name] = tmp_path_factory.mktemp(name)
    benchmark_fixtures.write(name, out[name], np.random.default_rng(i), num_per_split=4)
  return out


FAST = dict(shots=(0, 1), beam_size=1, max_new_tokens=2, batch_size=4)  # 4 queries: one batch.


@pytest.mark.slow
@pytest.mark.parametrize("name,metrics,low,high", [
    ("vqav2", ("vqa_accuracy",), 0.0, 1.0),
    ("coco", ("cider",), 0.0, 10.0),
    ("hateful_memes", ("roc_auc", "accuracy"), 0.0, 1.0),
    ("msrvtt_qa", ("accuracy",), 0.0, 1.0),
])
def test_each_task_type_reports_each_k(roots, name, metrics, low, high):
  out = run(name, roots[name], **FAST)
  assert set(out) == {f"{m}/{k}shot" for m in metrics for k in (0, 1)}
  assert all(low <= v <= high for v in out.values())


def test_seeds_give_a_std(roots):
  out = run("hateful_memes", roots["hateful_memes"], **{**FAST, "shots": (1,)}, seeds=(0, 1),
            prompts="openflamingo")
  assert set(out) == {f"{m}/1shot{s}" for m in ("roc_auc", "accuracy") for s in ("", "/std")}
  assert all(0 <= v <= 1 for v in out.values())


@pytest.mark.parametrize("name", ["vqav2", "hateful_memes"])
def test_each_k_and_seed_writes_its_predictions(roots, tmp_path, name):
  run(name, roots[name], tmp_path, **{**FAST, "shots": (0, 1)}, seeds=(0, 3))
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      f"{name}_{k}shot_seed{seed}.json" for k in (0, 1) for seed in (0, 3)]
  task = ml_collections.ConfigDict(dict(type=name, data_dir=str(roots[name]), shots=(0, 1)))
  s = protocol.settings(task, "x")
  support, queries = protocol.data(s, "x")
  by_id = {ex.id: ex for ex in support}
  for k in (0, 1):
    saved = json.loads((tmp_path / f"{name}_{k}shot_seed3.json").read_text())
    assert {key: saved[key] for key in ("benchmark", "shots", "seed")} == {
        "benchmark": name, "shots": k, "seed": 3}
    rows = saved["predictions"]
    assert [r["id"] for r in rows] == [q.id for q in queries]
    for row, query in zip(rows, queries):
      shots = [by_id[i] for i in row["shots"]]
      assert len(shots) == fewshot.shot_count(k)
      assert row["prompt"] == protocol.render(s.prompt, shots, query, k)
      if name == "vqav2":
        assert row["prediction"] == metrics.postprocess_vqa(row["generated"])
        assert row["references"] == list(query.answers)
      else:
        assert set(row["scores"]) == {"no", "yes"}
        assert row["prediction"] == max(row["scores"], key=row["scores"].get)
        assert row["references"] == [protocol.HATEFUL[query.label]]


def test_a_k_that_exceeds_the_context_is_left_out(roots):
  assert run("vqav2", roots["vqav2"], **{**FAST, "max_new_tokens": 384}) == {}


def test_one_order_is_all_ensembles_can_average_over_one_shot(roots):
  fields = {**FAST, "shots": (1,)}
  single = run("hateful_memes", roots["hateful_memes"], **fields)
  assert run("hateful_memes", roots["hateful_memes"], **fields, ensembles=4) == single


def test_ensembles_average_the_orders_logprobs(roots, monkeypatch):
  orders = []
  logprobs = protocol.answer_logprobs
  monkeypatch.setattr(protocol, "answer_logprobs",
                      lambda *a: orders.append(a[4]) or logprobs(*a))
  run("hateful_memes", roots["hateful_memes"], **{**FAST, "shots": (0,)}, ensembles=3)
  assert len(orders) == 2  # min(3, 2!) orders of the two text-only shots.
  np.testing.assert_array_equal(np.sort(orders[0], 1), np.sort(orders[1], 1))


def test_video_batches_repeat_a_shorter_clips_last_frame():
  short, long = np.zeros((2, 4, 4, 3)), np.ones((3, 4, 4, 3))
  short[1] = 5
  out = protocol.stack([[short], [long]])
  assert out.shape == (2, 1, 3, 4, 4, 3)
  np.testing.assert_array_equal(out[0, 0, 2], short[1])


def rices_inputs(root, cache_dir=None, params=None):
  ctx = context(cache_dir, params)
  task = ml_collections.ConfigDict(dict(type="vqav2", data_dir=str(root), selection="rices",
                                        shots=(0, 1)))
  s = protocol.settings(task, "config.evals.vqav2")
  support, queries = protocol.data(s, "config.evals.vqav2")
  return ctx, s, support, queries, protocol.loader(ctx, s.max_frames)


def test_rices_puts_a_planted_duplicate_last(roots, tmp_path):
  root = tmp_path / "vqav2"
  shutil.copytree(roots["vqav2"], root)
  ctx, s, support, queries, load = rices_inputs(root)
  shutil.copy(support[2].media[0], queries[0].media[0])  # Support 2's image (and 3's: VQA
  feats = [protocol.embeddings(ctx, s, split, ex, load, "")  # asks two questions per image).
           for split, ex in (("train", support), ("val", queries))]
  assert set(fewshot.rices_support(*feats, 2)[0]) == {2, 3}


def test_rices_features_are_cached_per_vision_encoder(roots, tmp_path, monkeypatch):
  calls = []
  embed = fewshot.image_embeddings
  monkeypatch.setattr(fewshot, "image_embeddings", lambda *a: calls.append(1) or embed(*a))

  def features(params=None):
    ctx, s, support, _, load = rices_inputs(roots["vqav2"], tmp_path, params)
    return protocol.embeddings(ctx, s, "train", support, load, protocol.vision_fingerprint(ctx))

  first = features()
  assert calls and len(list(tmp_path.iterdir())) == 1
  calls.clear()
  np.testing.assert_array_equal(features(), first)
  assert not calls  # Read from the cache.
  _, params = tiny_setup()
  changed = jax.tree_util.tree_map(lambda x: x, params)
  changed["vision"] = jax.tree_util.tree_map(lambda x: x + 0.5, params["vision"])
  features(changed)
  assert calls and len(list(tmp_path.iterdir())) == 2  # Another encoder: its own file.


@pytest.mark.slow
def test_rices_run_reports_each_k(roots, tmp_path):
  task = ml_collections.ConfigDict(dict(type="coco", data_dir=str(roots["coco"]),
                                        selection="rices", **FAST))
  out = tasks.get("coco")(task, context(tmp_path))
  assert set(out) == {"cider/0shot", "cider/1shot"}


@pytest.mark.parametrize("fields,match", [
    (dict(data_dir=None), r"config.evals.x.data_dir is missing"),
    (dict(data_dir="/no/such/dir"), r"config.evals.x.data_dir='/no/such/dir' is not a direc"),
    (dict(selection="best"), r"config.evals.x.selection='best'; expected one of"),
    (dict(prompts="mine"), r"config.evals.x.prompts='mine'; expected one of"),
    (dict(shots=(0, 5)), r"config.evals.x.shots: \[5\] need more in-context examples"),
    (dict(num_queries=9), r"config.evals.x.num_queries=9; split 'val' has only 4"),
    (dict(shot=(0,)), r"config.evals.x: unknown fields \['shot'\]"),
    (dict(query_split="test"), r"config.evals.x.query_split='test'; expected one of"),
])
def test_bad_fields_are_errors_before_any_model_call(roots, fields, match):
  task = ml_collections.ConfigDict(dict(type="vqav2", data_dir=str(roots["vqav2"]), shots=(0, 1)))
  task.update(fields)
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    tasks.check(task, "config.evals.x")
  with pytest.raises((ValueError, FileNotFoundError)):
    tasks.get("vqav2")(task, tasks.Context(None, None, None, None, None, None))


def test_a_missing_annotation_file_names_it_and_the_field(tmp_path):
  task = ml_collections.ConfigDict(dict(type="hateful_memes", data_dir=str(tmp_path)))
  with pytest.raises(FileNotFoundError, match=r"config.evals.hm.data_dir=.*train.jsonl"):
    tasks.check(task, "config.evals.hm")


# Prompts as OpenFlamingo's evaluate.py builds them.

OF_EVAL = pathlib.Path(open_flamingo.__file__).parent / "eval"
_OF_MODULES = ("evaluate", "utils", "rices", "coco_metric", "eval_datasets", "classification_utils",
               "eval_model", "vqa_metric", "ok_vqa_utils")


class Captured(Exception):
  """Stops OpenFlamingo's evaluate_* once the model is given its prompts."""


class OpenFlamingoPrompts:
  """OpenFlamingo's EvalModel as far as evaluate.py's prompts go: the get_*_prompt methods copied
  verbatim from open_flamingo/eval/models/open_flamingo.py (mlfoundations/open_flamingo; the pip
  package ships evaluate.py but not that file); the model calls record the prompts."""
  # pylint: disable=line-too-long
  def get_vqa_prompt(self, question, answer=None) -> str:
    return f"<image>Question:{question} Short answer:{answer if answer is not None else ''}{'<|endofchunk|>' if answer is not None else ''}"  # noqa: E501

  def get_caption_prompt(self, caption=None) -> str:
    return f"<image>Output:{caption if caption is not None else ''}{'<|endofchunk|>' if caption is not None else ''}"  # noqa: E501

  def get_hateful_memes_prompt(self, text, label=None) -> str:
    return f"<image>is an image with: '{text}' written on it. Is it hateful? Answer:{label if label is not None else ''}{'<|endofchunk|>' if label is not None else ''}"  # noqa: E501

  def get_outputs(self, batch_text, batch_images, **unused):
    self.text, self.images = batch_text, batch_images
    raise Captured

  def get_rank_classifications(self, batch_text, batch_images, *unused, **unused_kw):
    self.get_outputs(batch_text, batch_images)


class Args(argparse.Namespace):
  """evaluate.py's arguments: the few the prompts need; every path None."""

  def __getattr__(self, name):
    return None


@pytest.fixture(scope="module")
def of_evaluate():
  """open_flamingo/eval/evaluate.py as a module (it imports its siblings as top-level modules);
  ok_vqa_utils is stubbed: it needs nltk, which the prompts never reach."""
  saved = {name: sys.modules.pop(name) for name in _OF_MODULES if name in sys.modules}
  stub = types.ModuleType("ok_vqa_utils")
  stub.postprocess_ok_vqa_generation = lambda text: text
  sys.modules["ok_vqa_utils"] = stub
  sys.path.insert(0, str(OF_EVAL))
  try:
    yield importlib.import_module("evaluate")
  finally:
    sys.path.remove(str(OF_EVAL))
    for name in _OF_MODULES:
      sys.modules.pop(name, None)
    sys.modules.update(saved)


def of_prompts(of, monkeypatch, kind, support, queries, chosen, k):
  """The prompt texts and image counts evaluate.py gives the model for these shots."""
  item = {
      "vqa": lambda ex: {"image": ex.id, "question": ex.question, "answers": list(ex.answers),
                         "question_id": ex.id},
      "captioning": lambda ex: {"image": ex.id, "caption": ex.captions[0], "image_id": ex.id},
      "classification": lambda ex: {"image": ex.id, "ocr": ex.text, "id": ex.id,
                                     "class_name": protocol.HATEFUL[ex.label]},
  }[kind]
  train, test = [item(ex) for ex in support], [item(ex) for ex in queries]
  made = iter([train, test])
  dataset = {"vqa": "VQADataset", "captioning": "CaptionDataset",
             "classification": "HatefulMemesDataset"}[kind]
  monkeypatch.setattr(of, dataset, lambda *a, **kw: next(made))
  monkeypatch.setattr(of.utils, "prepare_eval_samples",
                      lambda ds, n, b: [of.utils.custom_collate_fn(list(ds))])
  monkeypatch.setattr(of.utils, "get_query_set", lambda ds, size: list(ds))
  monkeypatch.setattr(of.utils, "sample_batch_demos_from_query_set",
                      lambda qs, n, b: [[qs[j] for j in row] for row in chosen])
  model = OpenFlamingoPrompts()
  args = Args(model="open_flamingo", num_samples=-1, batch_size=len(queries), rices=False,
              rank=0)
  run_of = {"vqa": functools.partial(of.evaluate_vqa, dataset_name="vqav2"),
            "captioning": functools.partial(of.evaluate_captioning, dataset_name="coco"),
            "classification": functools.partial(of.evaluate_classification,
                                                dataset_name="hateful_memes")}[kind]
  with pytest.raises(Captured):
    run_of(args, eval_model=model, num_shots=k)
  return model.text, [len(x) for x in model.images]


def examples(n):
  """Examples with text that trips naive formatting: braces, quotes, padding spaces."""
  return [Example(id=str(i), media=(f"{i}.jpg",), question=f"what's {{this}} #{i}?",
                  answers=(f"ans {i}", "other"), captions=(f"  a 'dog' {i} ", "x"),
                  text=f"meme \"{i}\"", label=i % 2) for i in range(n)]


@pytest.mark.parametrize("kind", ["vqa", "captioning", "classification"])
@pytest.mark.parametrize("k", [0, 2])
def test_openflamingo_prompts_are_evaluate_py_prompts(of_evaluate, monkeypatch, kind, k):
  support, queries = examples(5), examples(7)[5:]
  chosen = np.array([[3, 0], [4, 1]])  # fewshot.shot_count(k) = 2 shots either way.
  want, images = of_prompts(of_evaluate, monkeypatch, kind, support, queries, chosen, k)
  prompt = protocol.PROMPTS["openflamingo"][kind]
  got = [protocol.render(prompt, [support[j] for j in row], q, k)
         for row, q in zip(chosen, queries)]
  assert got == want
  # Ours: the shots' images (none at 0 shots), then the query's. OpenFlamingo's
  # evaluate_classification passes the two text-only shots' images at 0 shots too (it tests
  # effective_num_shots > 0), with no <image> tag for them: their text's one tag then points at
  # the first shot's image, not the query's. We follow the paper there.
  want_images = 3 if (kind, k) == ("classification", 0) else k + 1
  assert images == [want_images] * 2
  if kind == "classification":
    assert protocol.PROMPTS["paper"][kind] == prompt  # The paper gives no HatefulMemes prompt.


def test_paper_prompts():
  ex = examples(3)
  vqa = protocol.render(protocol.PROMPTS["paper"]["vqa"], ex[:2], ex[2], 2)
  assert vqa == ("<image>Question: what's {this} #0? Answer: ans 0<EOC>"
                 "<image>Question: what's {this} #1? Answer: ans 1<EOC>"
                 "<image>Question: what's {this} #2? Answer:")
  caption = protocol.render(protocol.PROMPTS["paper"]["captioning"], ex[:2], ex[2], 0)
  assert caption == "Output: a 'dog' 0<EOC>Output: a 'dog' 1<EOC><image>Output:"

