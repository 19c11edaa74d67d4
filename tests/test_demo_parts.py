"""The demo's registered parts: its pp ops and its `names` task, found by name once imported."""
import jax
import numpy as np
import pytest

from flamingo_jax.data import pp
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.demo import tasks as demo_tasks
from flamingo_jax.eval import tasks
from tests.test_decode import char_tokenizer, tiny_setup

CAPTIONS = ["a red circle", "a blue square above a tree", "two green triangles"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "sp.model"
  return tokenizer_lib.train_sentencepiece(CAPTIONS * 10, 48, str(path))


def _rng(seed=0):
  return np.random.default_rng(seed)


def _episode():
  """A names episode as the data source gives it: shapes are ClassLabel ids, image i is all i."""
  images = np.arange(6)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
  return {"support_images": images[:4], "support_shapes": np.array([0, 1, 0, 1]),
          "query_images": images[4:], "query_shapes": np.array([1, 0]), "_rng": _rng(3)}


def test_name_episode_binds_one_fresh_name_per_shape():
  shape_of_image = [0, 1, 0, 1, 1, 0]
  names = {}
  for seed in (3, 4):
    out = pp.build("name_episode(6)")({**_episode(), "_rng": _rng(seed)})
    assert out["texts"][0] == "" and len(out["texts"]) == 7 and len(out["images"]) == 6
    episode = {}
    for image, text in zip(out["images"], out["texts"][1:]):
      assert text.startswith("This is a ") and text.endswith("."), text
      episode.setdefault(shape_of_image[int(image[0, 0, 0])], set()).add(text[10:-1])
    assert all(len(n) == 1 for n in episode.values()) and episode[0] != episode[1]
    names[seed] = episode
  assert names[3] != names[4]  # Fresh names per example.


def test_name_episode_needs_enough_images():
  with pytest.raises(ValueError, match="num_shots=7 exceeds"):
    pp.build("name_episode(7)")(_episode())


def test_copy_tokens_repeats_a_fresh_run_of_text_pieces(tok):
  runs = set()
  for seed in range(6):
    out = pp.build("copy_tokens(max_len=40, min_period=3, max_period=9)", tok)(
        {"image": b"unused", "_rng": _rng(seed)})
    assert sorted(out) == ["loss_mask", "media_idx", "tokens"]
    tokens, mask = out["tokens"], out["loss_mask"]
    assert tokens.shape == mask.shape == out["media_idx"].shape == (40,)
    assert tokens[0] == tok.bos_id and not out["media_idx"].any()
    period = int(np.argmax(mask)) - 1  # Targets start at the second copy.
    assert 3 <= period <= 9 and mask[:period + 1].sum() == 0 and mask[period + 1:].all()
    np.testing.assert_array_equal(tokens[1 + period:], tokens[1:40 - period])
    assert not set(tokens[1:].tolist()) & tok.special_ids and (tokens[1:] < tok.vocab_size).all()
    runs.add(tuple(tokens[1:period + 1]))
  assert len(runs) == 6  # Fresh per example.


@pytest.mark.parametrize("args", ["max_len=16, min_period=4, max_period=8",
                                  "min_period=0", "min_period=9, max_period=8"])
def test_copy_tokens_rejects_bad_periods(tok, args):
  with pytest.raises(ValueError, match="copy_tokens: need 1 <= min_period"):
    pp.build(f"copy_tokens({args})", tok)


def test_names_reports_each_k_and_chance():
  model, params = tiny_setup()
  rng = np.random.default_rng(0)
  image = lambda: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  names = ["dax", "blick"]
  data = {"test": [{"choices": names, "support_images": np.stack([image() for _ in range(4)]),
                    "support_names": names * 2, "query_images": np.stack([image(), image()]),
                    "query_names": names} for _ in range(2)]}
  out = demo_tasks.evaluate_names(model, params, char_tokenizer(), data, shots=(0, 2, 8))
  assert set(out) == {"accuracy/0shot", "accuracy/2shot", "chance"}  # 8 > the 4 supports.
  assert out["chance"] == 0.5 and all(0 <= v <= 1 for v in out.values())


def test_tasks_are_found_by_name_and_unknown_ones_named():
  assert tasks.get("shapes_names") is demo_tasks.names
  assert {tasks.get("shapes_vqa"), tasks.get("shapes_captioning")}.isdisjoint({demo_tasks.names})
  assert tasks.get("coco") is not tasks.get("shapes_captioning")  # eval/protocol.py's.
  with pytest.raises(ValueError, match=r"'retrieval'.*config.modules"):
    tasks.get("retrieval")


def test_a_stage_stopped_early_ends_the_demo(monkeypatch):
  """SIGTERM mid-stage: the demo exits (0) instead of turning half-trained weights into the next
  stage's frozen backbone."""
  from flamingo_jax.configs import demo as demo_config  # pylint: disable=g-import-not-at-top
  from flamingo_jax.demo import run  # pylint: disable=g-import-not-at-top
  config = demo_config.get_config()
  monkeypatch.setattr(run.trainer, "train", lambda c, w: ({"step": np.int32(3), "params": {}},
                                                          None, {"loss": 1.0}))
  with pytest.raises(SystemExit) as stopped:
    run._stage("stage 1", config, "unused", {})  # pylint: disable=protected-access
  assert stopped.value.code == 0
  monkeypatch.setattr(run.trainer, "train", lambda c, w: (
      {"step": np.int32(config.total_steps), "params": {"a": 1}}, None, {}))
  assert run._stage("stage 1", config, "unused", {}) == ({"a": 1}, False)  # pylint: disable=protected-access


def test_a_finished_stage_is_not_set_up_again(monkeypatch, tmp_path):
  """A re-run skips the trainer for a stage whose last checkpoint, eval.json and handed-on files
  are all there (keeping its earlier wall time), and trains when any of them is missing."""
  from flamingo_jax.configs import demo as demo_config  # pylint: disable=g-import-not-at-top
  from flamingo_jax.demo import run  # pylint: disable=g-import-not-at-top
  config = demo_config.get_config()
  manager = run.ckpt_lib.make_manager(str(tmp_path), config)
  run.ckpt_lib.save(manager, config.total_steps, {"w": np.zeros(2)}, {}, force=True)
  run.ckpt_lib.finish(manager)
  (tmp_path / "eval.json").write_text("{}")
  (tmp_path / "vision").mkdir()
  calls = []
  monkeypatch.setattr(run.trainer, "train", lambda c, w: calls.append(c.total_steps) or (
      {"step": np.int32(c.total_steps), "params": {"a": 1}}, None, {}))
  stage = lambda seconds: run._stage("stage 1", config, str(tmp_path), seconds,  # pylint: disable=protected-access
                                     (str(tmp_path / "vision"),))
  seconds = {"stage 1": 75.0}
  assert stage(seconds) == (None, False) and not calls and seconds == {"stage 1": 75.0}
  config.total_steps += 1  # A longer run of the same workdir trains on.
  assert stage(seconds) == ({"a": 1}, False) and calls == [config.total_steps]
  config.total_steps -= 1
  for missing in (tmp_path / "eval.json", tmp_path / "vision"):
    missing.rename(tmp_path / "aside")
    assert stage({}) == ({"a": 1}, False), missing
    (tmp_path / "aside").rename(missing)
  assert len(calls) == 3 and stage({}) == (None, False) and len(calls) == 3


def _tiny_encoder(seed: int, strides=(1, 2, 1, 1)):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from flamingo_jax.configs import demo as demo_config  # pylint: disable=g-import-not-at-top
  from flamingo_jax.models import nfnet  # pylint: disable=g-import-not-at-top
  cfg = nfnet.nfnet_config(**{**demo_config.vision(), "strides": strides})
  params = nn.unbox(jax.jit(nfnet.NFNet(cfg).init)(jax.random.PRNGKey(seed),
                                                  np.zeros((1, 32, 32, 3), np.float32)))["params"]
  return cfg, params


def test_feature_cache_encodes_each_image_once_under_its_encoders_key(tmp_path):
  """features.py: a 4x4 grid at 32 px with strides (1, 2, 1, 1); each image is encoded once, a
  re-read cache gives the same features, and another encoder (weights or grid) has another key."""
  from flamingo_jax.demo import features  # pylint: disable=g-import-not-at-top
  from flamingo_jax.models import nfnet  # pylint: disable=g-import-not-at-top
  cfg, params = _tiny_encoder(0)
  cache = features.FeatureCache(features.cache_key(cfg, params), cfg, params, str(tmp_path))
  images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 1, 32, 32, 3)).astype(np.float32)
  images[1, 2] = images[0, 0]  # The same image twice.
  out = cache(images)
  assert out.shape == (2, 3, 1, 16, 128) and cache.misses == 5 and cache.hits == 1
  want = jax.jit(nfnet.NFNet(cfg).apply)({"params": params}, images[0, :, 0])
  np.testing.assert_allclose(out[0, :, 0], want.reshape(3, 16, 128), atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(cache(images[:1]), out[:1])
  assert cache.misses == 5 and cache.hits == 4
  cache.save()
  again = features.FeatureCache(cache.key, cfg, params, str(tmp_path))
  assert len(again) == 5 and np.array_equal(again(images), out) and again.misses == 0
  other_cfg, other_params = _tiny_encoder(1)
  assert features.cache_key(other_cfg, other_params) != cache.key
  # An image's features are the same bits whichever images missed the cache with it (alone, or
  # with 12 others: batch 1 and 16 gave different bits before every batch was ENCODE_BATCH).
  alone = features.FeatureCache(cache.key, cfg, params)(images[0, :1, 0])
  np.testing.assert_array_equal(alone[0], out[0, 0, 0])
  many = np.concatenate([images[0, :1, 0], np.random.default_rng(1).uniform(
      -1, 1, (12, 32, 32, 3)).astype(np.float32)])
  np.testing.assert_array_equal(features.FeatureCache(cache.key, cfg, params)(many)[0], alone[0])
  coarse_cfg, _ = _tiny_encoder(0, strides=(1, 2, 2, 2))
  assert features.cache_key(coarse_cfg, params) != cache.key


def test_visual_features_pp_op_replaces_images():
  from flamingo_jax.demo import features  # pylint: disable=g-import-not-at-top
  cfg, params = _tiny_encoder(0)
  cache = features.get(cfg, params)
  op = pp.build(f"visual_features('{cache.key}')")
  images = np.zeros((5, 1, 32, 32, 3), np.float32)
  out = op({"images": images, "tokens": np.zeros(4, np.int32)})
  assert "images" not in out and out["features"].shape == (5, 1, 16, 128)
  with pytest.raises(ValueError, match="no feature cache 'nope'"):
    pp.build("visual_features('nope')")


def test_seeds_train_every_stage3_seed_on_every_stage1_encoder(monkeypatch, tmp_path):
  """--seeds=3: stage 1 with seeds 0-2, stage 3 with seeds 0-2 on each of their NFNets, each run
  in its own directory, and all nine runs reach the report (stage 2 trains once)."""
  from flamingo_jax.demo import run  # pylint: disable=g-import-not-at-top
  trained, stage3_runs, saved = [], [], []
  monkeypatch.setattr(run, "train_tokenizer", lambda path: None)
  monkeypatch.setattr(run, "_stage", lambda title, config, workdir, seconds, handed_on=(): (
      trained.append((title, config.seed, workdir)) or ({"vision": config.seed}, True)))
  monkeypatch.setattr(run, "_evaluate", lambda config, stage_dir, trained: {
      "retrieval": {"i2t_recall@1": config.seed}, "copying": {}})
  monkeypatch.setattr(run.ckpt_lib, "save_params", lambda path, params: saved.append(
      (path, params)))

  def stage3(config, workdir, stage_dir, seconds):
    vision = config.vision_init or run.backbone_paths(workdir)[1]  # As run.stage3 reads it.
    stage3_runs.append((config.seed, vision, stage_dir))
    return {"names": {"accuracy/0shot": config.seed}}

  monkeypatch.setattr(run, "stage3", stage3)
  monkeypatch.setattr(run.report, "write", lambda *args: args[-1])
  runs = run.run(str(tmp_path), mlp=True, seeds=3)

  stage1 = [(seed, d) for title, seed, d in trained if title.startswith("stage 1")]
  assert [seed for seed, _ in stage1] == [0, 1, 2] and len({d for _, d in stage1}) == 3
  assert sum(title.startswith("stage 2") for title, _, _ in trained) == 1
  visions = {seed: path for path, params in saved if "vision" in params
             for seed in [params["vision"]]}
  assert sorted(visions) == [0, 1, 2] and len(set(visions.values())) == 3
  assert sorted((seed, vision) for seed, vision, _ in stage3_runs) == sorted(
      (seed3, visions[seed1]) for seed1 in range(3) for seed3 in range(3))
  assert len({d for _, _, d in stage3_runs}) == 9
  assert sorted(runs) == [(a, b) for a in range(3) for b in range(3)]
  assert all(retrieval["i2t_recall@1"] == seed1
             and fewshot["names"]["accuracy/0shot"] == seed3
             for (seed1, seed3), (retrieval, fewshot) in runs.items())
  with pytest.raises(ValueError, match="seeds"):
    run.run(str(tmp_path), seeds=0)


def test_seed_table_counts_the_runs_that_clear_the_gain():
  from flamingo_jax.demo import report  # pylint: disable=g-import-not-at-top
  runs = {(0, seed): ({"i2t_recall@1": 0.5}, {"names": {
      "accuracy/0shot": 0.25, "accuracy/4shot": 0.25 + gain, "accuracy/8shot": 0.9,
      "chance": 0.25}}) for seed, gain in enumerate((0.2, 0.3, 0.5))}
  text = "\n".join(report.seed_table("names", runs))
  assert "| mean | 0.250 | 0.583 | 0.900 |" in text
  assert "| min | 0.250 | 0.450 | 0.900 |" in text and "| 0, 2 (i2t 0.500) |" in text
  assert "4 shots >= 0 shots + 0.30 and >= chance + 0.30: 2 of 3 runs." in text
  assert "8 shots >= 0 shots + 0.30 and >= chance + 0.30: 3 of 3 runs." in text
