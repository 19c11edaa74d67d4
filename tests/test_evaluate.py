"""config.evals: runs named and checked before compute, --benchmark and the eval flags, the
in-training evaluator."""
import json
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from flamingo_jax.configs import tiny
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.eval import evaluate
from flamingo_jax.eval import tasks

CALLS = []


def _checked(task, where):
  if task.get("bad"):
    raise ValueError(f"{where}.bad is set")


@tasks.register("test_mean_param", check=_checked)
def _mean_param(task, ctx):
  """The mean of the resampler's parameters: shows which parameters a run saw."""
  CALLS.append(task.to_dict())
  leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(ctx.params["resampler"])]
  return {"mean/0shot": float(np.mean([x.mean() for x in leaves])) + task.get("offset", 0.0)}


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "tok.model")
  tokenizer_lib.train_sentencepiece(["a red square on a blue mat."] * 50, 40, path)
  return path


@pytest.fixture
def _config(tokenizer_path):
  def make(**evals):
    config = tiny.get_config()
    config.input.tokenizer = tokenizer_path
    config.evals = ml_collections.ConfigDict(evals)
    return config
  return make


def test_configure_adds_benchmarks_and_sets_flags_on_every_run(_config):
  config = _config(mine=dict(type="test_mean_param", shots=(0,)))
  out = evaluate.configure(config, ["coco:/data/coco", "vqav2:gs://b/vqa:v2"], shots=(0, 4),
                           seeds=(0, 1), selection=None)
  assert out.evals.coco.to_dict() == dict(type="coco", data_dir="/data/coco", shots=(0, 4),
                                          seeds=(0, 1))
  assert out.evals.vqav2.data_dir == "gs://b/vqa:v2"  # Only the first ':' splits.
  assert out.evals.mine.shots == (0, 4) and "selection" not in out.evals.mine
  assert config.evals.mine.shots == (0,) and "coco" not in config.evals  # The caller's is kept.


@pytest.mark.parametrize("spec", ["coco", ":dir", "coco:"])
def test_a_bad_benchmark_flag_is_named(_config, spec):
  with pytest.raises(ValueError, match=r"--benchmark=.*NAME:DIR"):
    evaluate.configure(_config(), [spec])


@pytest.mark.parametrize("evals, only, message", [
    (dict(a=dict(shots=(0,))), None, r"config.evals.a.type is missing"),
    (dict(a=dict(type="no_such_task")), None, r"config.evals.a.type names 'no_such_task'"),
    (dict(a=dict(type="test_mean_param", bad=True)), None, r"config.evals.a.bad is set"),
    (dict(a=dict(type="test_mean_param")), ["b"], r"\['b'\] are not in config.evals"),
])
def test_bad_runs_are_named_before_compute(_config, evals, only, message):
  with pytest.raises(ValueError, match=message):
    evaluate.selected(_config(**evals), only)


def test_periodic_runs_what_is_due_on_the_current_parameters(_config, tmp_path):
  config = _config(often=dict(type="test_mean_param", every_steps=2),
                   never=dict(type="test_mean_param", offset=100.0),  # --mode=eval only.
                   rarely=dict(type="test_mean_param", every_steps=5, offset=10.0))
  config.total_steps = 7
  run = evaluate.periodic(config, str(tmp_path))
  params = {"resampler": {"w": np.ones((2, 2))}, "lm": {}, "vision": {}}
  assert run(1, params) == {}
  assert run(2, params) == {"eval/often/mean/0shot": 1.0}
  params["resampler"]["w"] = np.full((2, 2), 3.0)
  assert run(10, params) == {"eval/often/mean/0shot": 3.0, "eval/rarely/mean/0shot": 13.0}
  assert set(run(7, params)) == {"eval/often/mean/0shot", "eval/rarely/mean/0shot"}  # The last.
  assert evaluate.periodic(_config(a=dict(type="test_mean_param")), str(tmp_path)) is None


def test_periodic_checks_the_runs_it_will_do_before_training(_config, tmp_path):
  config = _config(a=dict(type="test_mean_param", every_steps=2, bad=True))
  with pytest.raises(ValueError, match=r"config.evals.a.bad"):
    evaluate.periodic(config, str(tmp_path))
  config.evals.a.every_steps = 0  # --mode=eval only: its fields may still be unset.
  assert evaluate.periodic(config, str(tmp_path)) is None


def test_evals_need_the_tokenizer(_config):
  config = _config(a=dict(type="test_mean_param"))
  config.input.tokenizer = ""
  with pytest.raises(ValueError, match=r"config.input.tokenizer is required by config.evals"):
    evaluate.selected(config)


def test_preprocess_maps_any_leading_dims_with_the_runs_image_pp():
  config = tiny.get_config()
  images = np.random.default_rng(0).integers(0, 256, (2, 3, 20, 24, 3), np.uint8)
  out = evaluate.preprocess_fn(config)(images)
  assert out.shape == (2, 3, 32, 32, 3) and out.dtype == np.float32
  assert out.min() >= -1.0 and out.max() <= 1.0
  np.testing.assert_array_equal(out[1, 2], evaluate.preprocess_fn(config)(images[1, 2]))


# The tiny config with a tokenizer of its vocabulary, evaluating COCO every 2 steps while it trains.
CONFIG = """
from flamingo_jax.configs import tiny
def get_config():
  config = tiny.get_config()
  config.update(dict(total_steps=4, ckpt_every=2, log_every=1))
  config.lr_schedule.warmup_steps = 1
  config.input.tokenizer = {tokenizer!r}
  config.evals = dict(coco=dict(type="coco", data_dir={coco!r}, every_steps=2, shots=(0,),
                                num_queries=2, beam_size=1, max_new_tokens=2))
  return config
"""


@pytest.mark.slow  # Trains, then evaluates in a second process: about two minutes.
def test_launch_evaluates_benchmarks_in_training_and_from_the_command_line(tmp_path_factory):
  """--mode=eval on a tiny model over benchmark fixtures, RICES included; config.evals in the
  training loop; results in eval.json, metrics.jsonl and TensorBoard."""
  from tensorflow.python.summary import summary_iterator  # pylint: disable=g-import-not-at-top
  from tests import benchmark_fixtures  # pylint: disable=g-import-not-at-top
  import train_helpers as helpers  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.mktemp("e2e")
  cache = helpers.compilation_cache(tmp_path_factory)
  words = ["a", "red", "blue", "cat", "on", "mat", "what", "is", "it", "yes", "no"]
  texts = [" ".join(np.random.default_rng(i).choice(words, 6)) for i in range(200)]
  tokenizer_lib.train_sentencepiece(texts + ["Output: Question: Answer:"] * 5, 64,
                                    str(base / "tok.model"))
  for i, name in enumerate(("coco", "vqav2")):
    benchmark_fixtures.write(name, base / name, np.random.default_rng(i), num_per_split=3)
  (base / "config.py").write_text(CONFIG.format(tokenizer=str(base / "tok.model"),
                                                coco=str(base / "coco")))
  launch = [sys.executable, str(helpers.ROOT / "launch.py"), f"--workdir={base / 'wd'}"]
  run = lambda *args: subprocess.run([*launch, *args], env=helpers.env(cache), cwd=helpers.ROOT,
                                     capture_output=True, text=True, timeout=900)
  trained = run(f"--config={base / 'config.py'}")
  assert trained.returncode == 0, trained.stderr[-3000:]
  evals = [m for m in helpers.metrics(base / "wd") if "eval/coco/cider/0shot" in m]
  assert [m["step"] for m in evals] == [2, 4]

  out = run("--mode=eval", f"--benchmark=vqav2:{base / 'vqav2'}", "--evals=vqav2",
            "--shots=0,2", "--seeds=0,1", "--selection=rices", "--num_queries=2")
  assert out.returncode == 0, out.stderr[-3000:]  # The config is the workdir's config.json.
  results = json.loads((base / "wd" / "eval.json").read_text())
  assert set(results) == {"vqav2"}
  assert set(results["vqav2"]) == {f"vqa_accuracy/{k}shot{s}" for k in (0, 2) for s in ("", "/std")}
  assert results["vqav2"]["vqa_accuracy/2shot/std"] == 0.0  # RICES: every seed picks the same.
  assert list((base / "wd" / "eval_cache").glob("rices_vqav2_*.npy"))
  saved = base / "wd" / "eval_predictions"  # Per run: the in-training coco's kept apart.
  assert (saved / "vqav2" / "vqav2_2shot_seed1.json").exists()
  assert (saved / "coco" / "coco_0shot_seed0.json").exists()
  tags = set()
  for path in (base / "wd" / "tensorboard").glob("events.*"):
    for event in summary_iterator.summary_iterator(str(path)):
      tags |= {v.tag for v in event.summary.value}
  assert {"eval/vqav2/vqa_accuracy/2shot", "eval/coco/cider/0shot"} <= tags

  bad = run("--mode=eval", f"--benchmark=okvqa:{base / 'missing'}")
  assert bad.returncode != 0 and "config.evals.okvqa.data_dir" in bad.stderr
