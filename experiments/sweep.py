"""Runs the paper's ablations (experiments/sweeps.py) on a finished demo workdir and tabulates them.

  python -m flamingo_jax.demo --workdir=W                       # first: tokenizer, stages 1-2
  python -m experiments.sweep --sweep=xattn_every --workdir=W [--short]
  python -m experiments.sweep --sweep=all --workdir=W

Every variant is the demo's stage 3 (flamingo_jax/demo/run.py:stage3: same tokenizer, same frozen
stage-1 NFNet and stage-2 LM) trained in W/experiments/<sweep>/<variant> and evaluated few-shot;
the baseline is the same run in every sweep, so it trains once, in W/experiments/baseline. A
variant whose results.json exists is skipped; a half-trained one resumes. The tables go to
W/experiments/<sweep>.md (and all.md for --sweep=all).
"""
import json
import os

from absl import app
from absl import flags
from absl import logging

from experiments import sweeps
from flamingo_jax import console
from flamingo_jax import paths
from flamingo_jax.demo import run as demo
from flamingo_jax.demo import report

_SWEEP = flags.DEFINE_string("sweep", "all", f"One of {sorted(sweeps.SWEEPS)}, or 'all'.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A demo workdir with stages 1-2 done.")
_SHORT = flags.DEFINE_bool("short", False, "Stage 3 as configs/demo.py:short (a smoke run).")


def check_workdir(workdir: str) -> None:
  missing = [p for p in demo.backbone_paths(workdir) if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        f"{workdir} is not a demo workdir with stages 1-2 done: missing {missing}. Run "
        f"`python -m flamingo_jax.demo --workdir={workdir}` first.")


def variant_dir(workdir: str, sweep: str, variant: sweeps.Variant) -> str:
  if not variant.overrides:
    return os.path.join(workdir, "experiments", "baseline")
  return os.path.join(workdir, "experiments", sweep, variant.name)


def run_variant(workdir: str, sweep: str, variant: sweeps.Variant, short: bool) -> dict:
  """Trains and evaluates one variant (or reads its results.json); returns its results."""
  out = variant_dir(workdir, sweep, variant)
  path = os.path.join(out, "results.json")
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
    if results["short"] != short:
      raise ValueError(f"{path} is from a run with short={results['short']}; use another "
                       "workdir (or delete W/experiments) to change --short.")
    logging.info("%s: done before, skipping (%s).", variant.name, path)
    return results
  config = sweeps.get_config(variant, short)
  seconds = {}
  fewshot = demo.stage3(config, workdir, out, seconds)
  results = dict(variant=variant.name, overrides=variant.overrides, short=short,
                 num_episodes=config.evals.names.num_episodes, fewshot=fewshot, seconds=seconds)
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
  return results


def _score(result: dict, shot: int) -> float:
  _, shots, values = report.shots_and_values(result)
  return dict(zip(shots, values))[shot]


def _direction(delta: float) -> str:
  return "better" if delta > 0 else "worse" if delta < 0 else "same"


def table(rows: list[tuple[str, sweeps.Variant, dict]]) -> list[str]:
  """Markdown table lines of (label, variant, results) rows; rows[0] is the baseline.

  Per task the metric at each shot; for `names` also the 4-shot minus 0-shot gain. The measured
  direction compares names 4-shot accuracy with the baseline's (Table 3 is 4-shot); the paper's
  compares Table 3's overall scores.
  """
  tasks = list(rows[0][2]["fewshot"])
  head = ["variant"]
  for task in tasks:
    metric, shots, _ = report.shots_and_values(rows[0][2]["fewshot"][task])
    head.append(f"{task} {report.METRIC_NAMES.get(metric, metric)} "
                f"{'/'.join(map(str, shots))}-shot")
    if task == "names":
      head.append("names gain 4-0")
  head += ["paper (Table 3)", "measured vs baseline", "agree", "overrides"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  base = _score(rows[0][2]["fewshot"]["names"], 4)
  for i, (label, variant, results) in enumerate(rows):
    cells = [label]
    for task in tasks:
      _, _, values = report.shots_and_values(results["fewshot"][task])
      cells.append(" / ".join(f"{v:.3f}" for v in values))
      if task == "names":
        gain = _score(results["fewshot"][task], 4) - _score(results["fewshot"][task], 0)
        cells.append(f"{gain:+.3f}")
    if i == 0:
      cells += [f"{variant.paper} (baseline)", "baseline", ""]
    else:
      delta = _score(results["fewshot"]["names"], 4) - base
      measured = _direction(delta)
      if isinstance(variant.paper, str):
        cells += [variant.paper, f"{measured} ({delta:+.3f})", ""]
      else:
        paper = _direction(variant.paper - variant.paper_baseline)
        cells += [f"{variant.paper} vs {variant.paper_baseline} ({paper})",
                  f"{measured} ({delta:+.3f})",
                  "yes" if paper == measured else "no"]
    cells.append(", ".join(f"`{k}={v}`" for k, v in variant.overrides.items())
                 or "configs/demo.py")
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def write_table(workdir: str, name: str, rows: list[tuple[str, sweeps.Variant, dict]]) -> str:
  """W/experiments/<name>.md; returns its path."""
  results = rows[0][2]
  lines = [f"# Ablation sweep: {name}", "",
           f"Demo stage 3 ({'configs/demo.py:short' if results['short'] else 'configs/demo.py'}) "
           "per variant, few-shot on the TEST splits (names: made-up names, chance 0.25, "
           f"{results['num_episodes']} episodes). Paper: Flamingo paper Table 3, Flamingo-3B "
           "overall score (4 shots); measured: names 4-shot accuracy vs the baseline. At this "
           "scale differences of a few points can be noise.", "", *table(rows), ""]
  path = os.path.join(workdir, "experiments", f"{name}.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def run(workdir: str, sweep: str = "all", short: bool = False) -> list[str]:
  """Runs `sweep` ('all': every sweep) in `workdir`; returns the tables' paths."""
  names = sorted(sweeps.SWEEPS) if sweep == "all" else [sweep]
  if not set(names) <= set(sweeps.SWEEPS):
    raise ValueError(f"--sweep={sweep!r}; expected one of {sorted(sweeps.SWEEPS)} or 'all'.")
  workdir = paths.resolve(workdir)
  check_workdir(workdir)
  done, tables = {}, []
  for name in names:
    done[name] = [(v, run_variant(workdir, name, v, short)) for v in sweeps.SWEEPS[name]]
    tables.append(write_table(workdir, name, [(v.name, v, r) for v, r in done[name]]))
  if sweep == "all":  # One baseline row, then every sweep's variants.
    rows = [("baseline", *done[names[0]][0])]
    rows += [(f"{name}/{v.name}", v, r) for name in names for v, r in done[name][1:]]
    tables.append(write_table(workdir, "all", rows))
  return tables


def main(argv):
  del argv
  console.setup()
  for path in run(_WORKDIR.value, _SWEEP.value, _SHORT.value):
    print(path)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
