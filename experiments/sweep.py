"""Runs the paper's ablations (experiments/sweeps.py) on any Flamingo config and tabulates them.

  python -m experiments.sweep --config=flamingo_jax/configs/tiny.py --sweep=xattn_every --workdir=W
  python -m experiments.sweep --config=flamingo_jax/configs/demo.py --demo=D \
    --workdir=D/experiments --sweep=all  # on the demo workdir D's tokenizer and stage-1/2 backbones
  python -m experiments.sweep --config=...[:arg] --sweep=mixture,p_next --workdir=W --config.x=v

Each variant is the config (with its --config.x overrides) plus the variant's overrides, trained
as `launch.py --mode=train` trains it (trainer.train with config.evals' in-training evaluator) in
W/<sweep>/<variant>, then evaluated on config.evals as `--mode=eval` does, if it has any. The
baseline, the config as given, trains once, in W/baseline. A variant the config cannot express
(its model does not build, or sweeps.py says why) is a skipped row naming the reason. A variant
whose results.json exists is not trained again (it must be of the same config); a half-trained
one resumes. The tables go to W/<sweep>.md, and W/all.md for more than one sweep.
"""
import copy
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
from ml_collections import config_flags

from experiments import sweeps
from flamingo_jax import console
from flamingo_jax import paths
from flamingo_jax.demo import run as demo
from flamingo_jax.eval import evaluate as evaluate_lib
from flamingo_jax.train import kinds
from flamingo_jax.train import optim
from flamingo_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (flamingo_jax/configs/"
                                          "*.py[:arg]); --config.x=v overrides its fields.")
_SWEEP = flags.DEFINE_string("sweep", "all", f"Comma-separated names of {sorted(sweeps.SWEEPS)}, "
                             "or 'all'.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Variants train here, and the tables go here.")
_DEMO = flags.DEFINE_string("demo", None, "A demo workdir with stages 1-2 done: its tokenizer "
                            "and frozen backbones are the config's (configs/demo.py).")
_METRIC = flags.DEFINE_string("metric", None, "The measured column compared with the paper "
                              "(default: the first 4-shot eval metric, else train/loss).")


def use_demo_backbones(config, workdir: str) -> None:
  """Sets config's tokenizer, vision_init and lm_init to a demo workdir's (they must exist)."""
  found = demo.backbone_paths(paths.resolve(workdir))
  missing = [p for p in found if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        f"--demo={workdir} is not a demo workdir with stages 1-2 done: missing {missing}. Run "
        f"`python -m flamingo_jax.demo --workdir={workdir}` first.")
  config.input.tokenizer, config.vision_init, config.lm_init = found


def variant_config(config, variant: sweeps.Variant):
  """A copy of config with the variant's overrides (None removes the field). Fields outside
  `model.` must exist; model fields the config leaves at their defaults may be added (building
  the model rejects typos)."""
  config = copy.deepcopy(config)
  config.unlock()
  for key, value in variant.overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part] if part in node else None
      if node is None:
        break
    if (node is None or leaf not in node) and (value is None or not key.startswith("model.")):
      raise KeyError(f"Variant {variant.name!r}: the config has no field {key!r}.")
    if value is None:
      del node[leaf]
    else:
      config.update_from_flattened_dict({key: value})
  return config


def why_not(config) -> str:
  """'' if config's model builds and its parameter rules hold, else the error: a variant the
  config cannot express (e.g. xattn every 4 layers of a 2-layer LM)."""
  kind = kinds.get(config.model_name)
  try:
    params = jax.eval_shape(kind.model(config).init, jax.random.PRNGKey(0),
                            *kind.init_inputs(config))["params"]
    optim.param_rules(nn.unbox(params), config.schedule, config.get("unfreeze", ()))
  except ValueError as e:
    return str(e)
  return ""


def _as_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _last_losses(workdir: str) -> dict[str, float]:
  """The training losses of the last logged step (workdir/metrics.jsonl)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [r for r in map(json.loads, filter(str.strip, f)) if "loss" in r]
  return {f"train/{k}": v for k, v in rows[-1].items() if k == "loss" or k.startswith("loss/")}


def run_variant(config, workdir: str, sweep: str, variant: sweeps.Variant) -> dict:
  """Trains and evaluates one variant, or reads its results.json; returns its results
  ({'skipped': reason} for a variant the config cannot express)."""
  if variant.skip:
    return {"skipped": variant.skip}
  config = variant_config(config, variant)
  reason = why_not(config)
  if reason and variant.name == sweeps.BASELINE:
    raise ValueError(f"The config's own model does not build: {reason}")
  if reason:
    return {"skipped": reason}
  out = os.path.join(workdir, sweeps.BASELINE if variant.name == sweeps.BASELINE
                     else os.path.join(sweep, variant.name))
  path = os.path.join(out, "results.json")
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
    if results["config"] != _as_json(config):
      raise ValueError(f"{path} is from another config than this run's {variant.name!r}; use "
                       "another --workdir (or delete that directory) to change the config.")
    logging.info("%s: done before, skipping (%s).", variant.name, path)
    return results
  state, _, _ = trainer.train(config, out, evaluate_lib.periodic(config, out))
  if int(state["step"]) < config.total_steps:  # SIGTERM: the checkpoint is saved.
    sys.exit(f"{out} stopped at step {int(state['step'])}; re-run to resume.")
  measured = _last_losses(out)
  if evaluate_lib.selected(config):
    results = evaluate_lib.evaluate(config, out)
    measured |= {f"{task}/{k}": v for task, values in results.items() for k, v in values.items()}
  results = dict(variant=variant.name, overrides=variant.overrides, config=_as_json(config),
                 measured=measured)
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
  return results


def default_metric(measured: dict[str, float]) -> str:
  """The first 4-shot eval metric (Table 3 is 4-shot), else the first eval one, else the loss."""
  evals = [k for k in measured if not k.startswith("train/")]
  return next((k for k in evals if "4shot" in k), evals[0] if evals else "train/loss")


def _direction(delta: float) -> str:
  return "better" if delta > 0 else "worse" if delta < 0 else "same"


def table(rows: list[tuple[str, sweeps.Variant, dict]], metric: str | None = None) -> list[str]:
  """Markdown lines of (label, variant, results) rows, rows[0] the baseline: each measured value,
  the paper's score beside the baseline setting's, and whether `metric` moved the same way."""
  base = rows[0][2]["measured"]
  metric = metric or default_metric(base)
  if metric not in base:
    raise ValueError(f"--metric={metric!r}; the results have {sorted(base)}.")
  lower_is_better = "loss" in metric
  columns = sorted(base, key=lambda k: (k.startswith("train/"), k))
  head = ["variant", *columns, "paper (Table 3)", f"measured {metric} vs baseline", "agree",
          "overrides"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for i, (label, variant, results) in enumerate(rows):
    overrides = ", ".join(f"`{k}={v}`" for k, v in variant.overrides.items()) or "the config"
    if "skipped" in results:
      cells = ["—"] * len(columns) + [_paper(variant.paper, variant.paper_baseline),
                                       f"skipped: {results['skipped']}", ""]
    else:
      measured = results["measured"]
      cells = [f"{measured[k]:.4g}" if k in measured else "—" for k in columns]
      if i == 0:
        cells += [f"{variant.paper} (baseline)", "baseline", ""]
      else:
        delta = (measured[metric] - base[metric]) * (-1 if lower_is_better else 1)
        measured_way = _direction(delta)
        cells += [_paper(variant.paper, variant.paper_baseline),
                  f"{measured_way} ({measured[metric] - base[metric]:+.4g})",
                  _agree(variant.paper, variant.paper_baseline, measured_way)]
    lines.append("| " + " | ".join([label, *cells, overrides]) + " |")
  return lines


def _paper(paper, paper_base) -> str:
  if isinstance(paper, str) or isinstance(paper_base, str):
    return str(paper)
  return f"{paper} vs {paper_base} ({_direction(paper - paper_base)})"


def _agree(paper, paper_base, measured_way: str) -> str:
  if isinstance(paper, str) or isinstance(paper_base, str):
    return ""
  return "yes" if _direction(paper - paper_base) == measured_way else "no"


def write_table(workdir: str, name: str, config_name: str, rows, metric=None) -> str:
  """W/<name>.md; returns its path."""
  lines = [f"# Ablation sweep: {name} on {config_name}", "",
           "Paper: the Flamingo paper's Table 3 (Flamingo-3B, overall score over five DEV "
           "benchmarks at 4 shots; p_next: App. Table 7 (ix)), the variant's row vs the row of "
           "the baseline's setting. Measured: this run. At a small scale differences of a few "
           "points can be noise.", "", *table(rows, metric), ""]
  path = os.path.join(workdir, f"{name}.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def run(config, workdir: str, sweep: str = "all", config_name: str = "the config",
        metric: str | None = None) -> list[str]:
  """Runs `sweep` (comma-separated names, or 'all') of config in workdir; returns the tables'
  paths."""
  names = sorted(sweeps.SWEEPS) if sweep == "all" else sweep.split(",")
  unknown = [n for n in names if n not in sweeps.SWEEPS]
  if unknown:
    raise ValueError(f"--sweep={sweep!r}: unknown {unknown}; expected names of "
                     f"{sorted(sweeps.SWEEPS)}, or 'all'.")
  if config.get("model_name", "flamingo") != "flamingo":
    raise ValueError(f"config.model_name={config.model_name!r}: the ablations are Flamingo's.")
  workdir = paths.resolve(workdir)
  os.makedirs(workdir, exist_ok=True)
  done, tables = {}, []
  for name in names:
    done[name] = [(v, run_variant(config, workdir, name, v))
                  for v in sweeps.variants(config, name)]
    tables.append(write_table(workdir, name, config_name,
                              [(v.name, v, r) for v, r in done[name]], metric))
  if len(names) > 1:  # One baseline row, then every sweep's variants.
    baseline = sweeps.Variant(sweeps.BASELINE, {}, "each sweep's row of the config's setting")
    rows = [(sweeps.BASELINE, baseline, done[names[0]][0][1])]
    rows += [(f"{name}/{v.name}", v, r) for name in names for v, r in done[name][1:]]
    tables.append(write_table(workdir, "all", config_name, rows, metric))
  return tables


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
  console.setup()
  config = copy.deepcopy(_CONFIG.value)
  if _DEMO.value:
    use_demo_backbones(config, _DEMO.value)
  name = config_flags.get_config_filename(flags.FLAGS["config"])
  for path in run(config, _WORKDIR.value, _SWEEP.value, name, _METRIC.value):
    print(path)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
