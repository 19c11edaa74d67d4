"""experiments/: the ablations on any config (tiny and the demo), skipped variants, the tables, a
sweep that trains the tiny config, resuming."""
import os
import re

import flax.linen as nn
import jax
import pytest

from experiments import sweep as sweep_lib
from experiments import sweeps
from flamingo_jax.configs import demo as demo_config
from flamingo_jax.configs import tiny
from flamingo_jax.demo import run as demo
from flamingo_jax.models import flamingo
from flamingo_jax.models import lm as lm_lib
from flamingo_jax.train import optim
from flamingo_jax.train import state as state_lib
from flamingo_jax.train import trainer
from flamingo_jax.train.kinds import flamingo as flamingo_kind

CONFIGS = {"tiny": tiny.get_config, "demo": lambda: demo_config.get_config("short")}
# What each config cannot express: tiny has synthetic data (no pp to set p_next in), the demo's
# LM 2 layers (no 4th layer for a block).
SKIPPED = {"tiny": {"p_next/p_next_0", "p_next/p_next_0.5", "p_next/p_next_1"},
           "demo": {"xattn_every/every_4"}}


def paths_of(config) -> dict:
  model = flamingo_kind.model(config)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), *flamingo_kind.init_inputs(config))
  return state_lib.flat(nn.unbox(params)["params"])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_sweep_applies_to_the_config_or_says_why_not(name):
  config = CONFIGS[name]()
  skipped = set()
  for sweep in sweeps.SWEEPS:
    variants = sweeps.variants(config, sweep)
    assert variants[0] == sweeps.Variant(sweeps.BASELINE, {}, variants[0].paper)
    assert len(variants) > 1 and all(v.overrides or v.skip for v in variants[1:])
    for v in variants[1:]:
      assert v.paper_baseline == variants[0].paper
      reason = v.skip or sweep_lib.why_not(sweep_lib.variant_config(config, v))
      if reason:
        skipped.add(f"{sweep}/{v.name}")
  assert skipped == SKIPPED[name]


def test_variants_change_what_they_name():
  config = tiny.get_config()
  by_name = {f"{s}/{v.name}": sweep_lib.variant_config(config, v)
             for s in sweeps.SWEEPS for v in sweeps.variants(config, s)[1:] if not v.skip}
  lm_cfg = lambda c: flamingo.lm_config(c.model)
  assert lm_lib.xattn_layer_indices(lm_cfg(by_name["xattn_every/single_in_middle"])) == [2]
  assert lm_lib.xattn_layer_indices(lm_cfg(by_name["xattn_every/every_1"])) == [0, 1, 2, 3]
  vanilla = paths_of(by_name["xattn_architecture/vanilla_xattn"])
  assert not any("_gate" in p or "xattn/ffw" in p for p in vanilla)
  assert "resampler/latents" not in paths_of(by_name["resampler/transformer"])
  rules = lambda c: optim.param_rules(paths_of(c), c.schedule, c.unfreeze)
  assert "lm/token_embed" in optim.trainable_paths(rules(by_name["freeze_lm/trainable_lm"]))
  assert any(p.startswith("vision/") for p in optim.trainable_paths(
      rules(by_name["freeze_vision/trainable_vision"])))
  assert set(by_name["datasets/without_pairs"].input.datasets) == {"interleaved"}
  assert by_name["mixture/round_robin"].mixture_mode == "round_robin"


def test_p_next_is_set_in_the_m3w_pp_only():
  config = demo_config.get_config("short")
  half = {v.name: v for v in sweeps.variants(config, "p_next")}["p_next_0.5"]
  changed = sweep_lib.variant_config(config, half).input.datasets
  assert "tokenize_document(p_next=0.5, max_len=96" in changed.m3w.pp
  assert changed.names.pp == config.input.datasets.names.pp  # The demo's own task: not M3W.


def test_resampler_sweep_reads_the_baseline_from_the_config():
  """The baseline is the config's connector, whichever; the variants are the other kinds."""
  for kind, paper in (("perceiver", 70.7), ("mlp", 66.6)):
    config = tiny.get_config()
    config.model.resampler.kind = kind
    config.model.resampler.num_latents = 1
    variants = sweeps.variants(config, "resampler")
    assert variants[0].paper == paper
    assert {v.name for v in variants[1:]} == set(sweeps.perceiver.KINDS) - {kind}


def test_override_of_a_missing_field_is_an_error():
  config = tiny.get_config()
  with pytest.raises(KeyError, match="the config has no field 'mixture_mod'"):
    sweep_lib.variant_config(config, sweeps.Variant("typo", {"mixture_mod": "x"}, 0.0))
  with pytest.raises(KeyError, match="no field 'input.datasets.m3w'"):
    sweep_lib.variant_config(config, sweeps.Variant("typo", {"input.datasets.m3w": None}, 0.0))
  typo = sweep_lib.variant_config(config, sweeps.Variant("typo", {"model.lm.xattn.gate": 0}, 0.0))
  assert "Unknown lm.xattn config keys ['gate']" in sweep_lib.why_not(typo)


def cells(line: str) -> list[str]:
  return [c.strip() for c in line.strip().strip("|").split("|")]


def table_rows(path) -> list[dict[str, str]]:
  with open(path) as f:
    lines = [line for line in f if line.startswith("| ") and "---" not in line]
  return [dict(zip(cells(lines[0]), cells(line))) for line in lines[1:]]


def test_table_rows_from_results():
  base, rr, skip = sweeps.variants(tiny.get_config(), "mixture") + [
      sweeps.Variant("x", {"a.b": 1}, 50.0, paper_baseline=70.7)]
  results = lambda acc, loss: {"measured": {"names/accuracy/4shot": acc, "train/loss": loss}}
  lines = sweep_lib.table([("baseline", base, results(0.5, 2.0)),
                           ("round_robin", rr, results(0.25, 1.0)),
                           ("x", skip, {"skipped": "why"})])
  head = cells(lines[0])
  assert head[:3] == ["variant", "names/accuracy/4shot", "train/loss"]
  b, r, s = (dict(zip(head, cells(line))) for line in lines[2:])
  assert b["paper (Table 3)"] == "70.7 (baseline)" and r["names/accuracy/4shot"] == "0.25"
  assert r["paper (Table 3)"] == "62.9 vs 70.7 (worse)"
  assert r["measured names/accuracy/4shot vs baseline"] == "worse (-0.25)" and r["agree"] == "yes"
  assert r["overrides"] == "`mixture_mode=round_robin`"
  assert s["measured names/accuracy/4shot vs baseline"] == "skipped: why"
  by_loss = sweep_lib.table([("baseline", base, results(0.5, 2.0)),
                             ("round_robin", rr, results(0.25, 1.0))], metric="train/loss")
  r = dict(zip(cells(by_loss[0]), cells(by_loss[3])))
  assert r["measured train/loss vs baseline"] == "better (-1)"  # Lower is better for a loss.
  assert r["agree"] == "no"


@pytest.mark.slow
def test_sweep_over_the_tiny_config_trains_tabulates_and_resumes(tmp_path, monkeypatch):
  """The acceptance test of the sweep: two sweeps of configs/tiny.py, 2 steps per variant."""
  config = tiny.get_config()
  config.total_steps, config.log_every, config.ckpt_every = 2, 1, 2
  workdir = str(tmp_path)
  tables = sweep_lib.run(config, workdir, "mixture,p_next", "configs/tiny.py")
  assert [os.path.basename(p) for p in tables] == ["mixture.md", "p_next.md", "all.md"]
  rows = table_rows(tables[-1])
  assert [r["variant"] for r in rows] == ["baseline", "mixture/round_robin", "p_next/p_next_0",
                                          "p_next/p_next_0.5", "p_next/p_next_1"]
  measured = "measured train/loss vs baseline"
  assert float(rows[0]["train/loss"]) > 0 and rows[1]["paper (Table 3)"] == "62.9 vs 70.7 (worse)"
  assert re.fullmatch(r"(better|worse|same) \(.*\)", rows[1][measured])
  assert all(r[measured].startswith("skipped: config.input.datasets has no dataset named")
             for r in rows[2:])
  assert sorted(os.listdir(workdir)) == ["all.md", "baseline", "mixture", "mixture.md",
                                         "p_next.md"]

  def no_training(*args, **kwargs):
    raise AssertionError("a finished variant was trained again")
  monkeypatch.setattr(trainer, "train", no_training)
  assert table_rows(sweep_lib.run(config, workdir, "mixture,p_next", "configs/tiny.py")[-1]) == rows
  config.lr = 0.5
  with pytest.raises(ValueError, match=r"baseline/results.json is from another config"):
    sweep_lib.run(config, workdir, "mixture")


def test_unknown_sweep_and_other_models_are_errors(tmp_path):
  with pytest.raises(ValueError, match=r"--sweep='mixture,gates': unknown \['gates'\]"):
    sweep_lib.run(tiny.get_config(), str(tmp_path), "mixture,gates")
  config = tiny.get_config()
  config.model_name = "lm"
  with pytest.raises(ValueError, match="model_name='lm': the ablations are Flamingo's"):
    sweep_lib.run(config, str(tmp_path), "mixture")


@pytest.mark.parametrize("missing", [0, 1, 2])
def test_demo_backbones_must_exist(tmp_path, missing):
  wanted = demo.backbone_paths(str(tmp_path))
  for path in wanted:
    if path != wanted[missing]:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      open(path, "w").close()
  config = demo_config.get_config("short")
  with pytest.raises(FileNotFoundError, match=r"missing \['" + re.escape(wanted[missing])
                     + r"'\].*flamingo_jax.demo"):
    sweep_lib.use_demo_backbones(config, str(tmp_path))
