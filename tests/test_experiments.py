"""experiments/: every ablation builds on configs/demo.py, the tables, resuming, the workdir
checks."""
import json
import os
import re

import flax.linen as nn
import jax
import pytest

from experiments import sweep as sweep_lib
from experiments import sweeps
from flamingo_jax.demo import run as demo
from flamingo_jax.models import flamingo
from flamingo_jax.models import lm as lm_lib
from flamingo_jax.train import optim
from flamingo_jax.train import state as state_lib
from flamingo_jax.train.kinds import flamingo as flamingo_kind

VARIANTS = [(name, v) for name, vs in sweeps.SWEEPS.items() for v in vs]


def abstract_params(config) -> dict:
  model = flamingo_kind.model(config)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), *flamingo_kind.init_inputs(config))
  return nn.unbox(boxed)["params"]


@pytest.fixture(scope="module")
def baseline_paths():
  return set(state_lib.flat(abstract_params(sweeps.get_config(sweeps.BASELINE, short=True))))


def test_every_sweep_starts_with_the_baseline():
  for variants in sweeps.SWEEPS.values():
    # The same run (it trains once); only its paper score may differ (resampler: the MLP row).
    assert variants[0]._replace(paper=sweeps.BASELINE.paper) == sweeps.BASELINE
    assert all(v.overrides for v in variants[1:])


@pytest.mark.parametrize("name,variant", VARIANTS, ids=[f"{n}/{v.name}" for n, v in VARIANTS])
def test_variant_applies_to_the_demo_config_and_builds(name, variant, baseline_paths):
  del name
  config = sweeps.get_config(variant, short=True)
  for key, value in variant.overrides.items():
    node = config
    for part in key.split("."):
      node = node[part]
    assert node == value, key
  assert config.mixture_mode in ("accumulate", "round_robin")
  params = abstract_params(config)
  paths = set(state_lib.flat(params))
  assert optim.trainable_paths(optim.param_rules(params, config.schedule))
  # Knobs that change parameters do: no gates, fewer xattn blocks, the MLP's own weights.
  lm_cfg = flamingo.lm_config(config.model)
  assert any(p.endswith("_gate") for p in paths) == lm_cfg.xattn.gated
  blocks = len(lm_lib.xattn_layer_indices(lm_cfg))
  assert blocks == -(-lm_cfg.num_layers // lm_cfg.xattn.every)  # Before layer 0 and every n-th.
  assert ("resampler/latents" in paths) == (config.model.resampler.get("kind") != "mlp")
  if not {"model.lm.xattn.gated", "model.lm.xattn.every", "model.resampler.kind"} & set(
      variant.overrides):
    assert paths == baseline_paths


def test_override_of_a_missing_field_is_an_error():
  with pytest.raises(KeyError, match="flamingo_jax/configs/demo.py has no field 'mixture_mod'"):
    sweeps.get_config(sweeps.Variant("typo", {"mixture_mod": "round_robin"}, 0.0))
  config = sweeps.get_config(sweeps.Variant("typo", {"model.lm.xattn.gate": False}, 0.0))
  with pytest.raises(ValueError, match=r"Unknown lm.xattn config keys \['gate'\]"):
    flamingo_kind.model(config)


def fake_results(names_acc: tuple[float, float, float], short=True) -> dict:
  """A results.json as run_variant writes it, with the given names accuracy at 0/4/8 shots."""
  return dict(variant="x", overrides={}, short=short, num_episodes=16, seconds={}, fewshot={
      "names": {**{f"accuracy/{k}shot": a for k, a in zip((0, 4, 8), names_acc)}, "chance": 0.25},
      "vqa": {f"vqa_accuracy/{k}shot": 0.1 * i for i, k in enumerate((0, 4, 8))},
      "captioning": {f"cider/{k}shot": 0.2 * i for i, k in enumerate((0, 4, 8))}})


def cells(line: str) -> list[str]:
  return [c.strip() for c in line.strip().strip("|").split("|")]


def test_table_rows_from_results():
  base_acc, rr_acc = (0.25, 0.5, 0.625), (0.25, 0.375, 0.5)
  rows = [("baseline", sweeps.BASELINE, fake_results(base_acc)),
          ("round_robin", sweeps.SWEEPS["mixture"][1], fake_results(rr_acc))]
  lines = sweep_lib.table(rows)
  head = cells(lines[0])
  assert head[:3] == ["variant", "names accuracy 0/4/8-shot", "names gain 4-0"]
  base, rr = (dict(zip(head, cells(line))) for line in lines[2:])
  assert rr["names accuracy 0/4/8-shot"] == " / ".join(f"{a:.3f}" for a in rr_acc)
  assert rr["names gain 4-0"] == f"{rr_acc[1] - rr_acc[0]:+.3f}"
  assert base["names gain 4-0"] == f"{base_acc[1] - base_acc[0]:+.3f}"
  assert rr["vqa VQA accuracy 0/4/8-shot"] == "0.000 / 0.100 / 0.200"
  assert rr["paper (Table 3)"] == "62.9 vs 70.7 (worse)"
  assert rr["measured vs baseline"] == f"worse ({rr_acc[1] - base_acc[1]:+.3f})"
  assert rr["agree"] == "yes" and rr["overrides"] == "`mixture_mode=round_robin`"
  assert base["paper (Table 3)"] == "70.7 (baseline)"


def test_resampler_sweep_reads_the_paper_from_its_mlp_row():
  """The demo's connector is the MLP: Table 3 goes from MLP (66.6) to Perceiver (70.7), better."""
  baseline, variant = sweeps.SWEEPS["resampler"]
  lines = sweep_lib.table([("baseline", baseline, fake_results((0.25, 0.5, 0.5))),
                           ("perceiver", variant, fake_results((0.25, 0.25, 0.25)))])
  mlp, perceiver = (dict(zip(cells(lines[0]), cells(line))) for line in lines[2:])
  assert mlp["paper (Table 3)"] == "66.6 (baseline)"
  assert perceiver["paper (Table 3)"] == "70.7 vs 66.6 (better)"
  assert perceiver["measured vs baseline"] == "worse (-0.250)" and perceiver["agree"] == "no"


def fake_workdir(tmp_path, drop=None):
  for path in demo.backbone_paths(str(tmp_path)):
    if path != drop:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      open(path, "w").close()
  return str(tmp_path)


def test_finished_variants_are_skipped_and_all_is_tabulated(tmp_path):
  workdir = fake_workdir(tmp_path)
  accs = {}
  for name, variant in VARIANTS:
    out = sweep_lib.variant_dir(workdir, name, variant)
    os.makedirs(out, exist_ok=True)
    accs[out] = (0.25, 0.25 + 0.01 * len(accs), 0.5)
    with open(os.path.join(out, "results.json"), "w") as f:
      json.dump(fake_results(accs[out]), f)
  paths = sweep_lib.run(workdir, "all", short=True)  # Would train (and fail) if not skipped.
  assert [os.path.basename(p) for p in paths] == [f"{n}.md" for n in sorted(sweeps.SWEEPS)] + [
      "all.md"]
  with open(paths[-1]) as f:
    rows = [cells(line) for line in f if line.startswith("| ") and "---" not in line][1:]
  assert [r[0] for r in rows] == ["baseline"] + [
      f"{n}/{v.name}" for n in sorted(sweeps.SWEEPS) for v in sweeps.SWEEPS[n][1:]]
  with pytest.raises(ValueError, match="short=True"):
    sweep_lib.run(workdir, "mixture", short=False)


@pytest.mark.parametrize("missing", [0, 1, 2])
def test_missing_stage_checkpoint_is_a_clear_error(tmp_path, missing):
  drop = demo.backbone_paths(str(tmp_path))[missing]
  workdir = fake_workdir(tmp_path, drop=drop)
  with pytest.raises(FileNotFoundError,
                     match=r"missing \['" + re.escape(drop) + r"'\].*flamingo_jax.demo"):
    sweep_lib.run(workdir, "mixture")


def test_unknown_sweep_is_an_error(tmp_path):
  with pytest.raises(ValueError, match=r"--sweep='gates'; expected one of"):
    sweep_lib.run(str(tmp_path), "gates")
