"""The demo's report: workdir/report.md with PNG plots (matplotlib, Agg) of losses, gates, few-shot.

Reads each stage's metrics.jsonl (written by the trainer) and the evaluation results.
"""
import json
import os

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

METRIC_NAMES = {"accuracy": "accuracy", "vqa_accuracy": "VQA accuracy", "cider": "CIDEr-D"}


def read_metrics(stage_dir: str) -> list[dict]:
  with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _save(fig, workdir: str, name: str) -> str:
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, name), dpi=100)
  plt.close(fig)
  return name


def plot_losses(workdir: str, stages: dict[str, list[dict]]) -> str:
  """One panel per stage: its total loss and each dataset's loss over steps."""
  fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.5))
  for ax, (title, rows) in zip(axes, stages.items()):
    for key in sorted({k for r in rows for k in r if k == "loss" or k.startswith("loss/")}):
      ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key)
    ax.set(title=title, xlabel="step", yscale="log")
    ax.legend(fontsize=7)
  return _save(fig, workdir, "losses.png")


def gate_table(rows: list[dict]) -> dict[str, dict[int, list[float]]]:
  """{'attn'|'ffw': {layer: [tanh(gate) per logged step]}} from the gates/<kind>/layer_<i> keys."""
  out = {"attn": {}, "ffw": {}}
  for key in sorted(k for k in rows[-1] if k.startswith("gates/")):
    _, kind, layer = key.split("/")
    out[kind][int(layer.split("_")[1])] = [r[key] for r in rows]
  return out


def plot_gates(workdir: str, rows: list[dict]) -> str:
  """|tanh(gate)| of every xattn block over training, per LM layer (the paper's Fig. 14)."""
  steps = [r["step"] for r in rows]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  for ax, (kind, layers) in zip(axes, gate_table(rows).items()):
    for layer, values in layers.items():
      ax.plot(steps, [abs(v) for v in values], label=f"layer {layer}")
    ax.set(title=f"|tanh(gate)| of xattn {kind}", xlabel="step")
    ax.legend(fontsize=7)
  return _save(fig, workdir, "gates.png")


def shots_and_values(result: dict[str, float]) -> tuple[str, list[int], list[float]]:
  """('<metric>', [k...], [value...]) from {'<metric>/<k>shot': value}."""
  items = sorted((int(k.split("/")[1][:-4]), k.split("/")[0], v) for k, v in result.items()
                 if k != "chance")
  return items[0][1], [k for k, _, _ in items], [v for _, _, v in items]


def plot_fewshot(workdir: str, task: str, result: dict[str, float],
                 spread: list[dict[str, float]] = ()) -> str:
  """The metric vs shots; with `spread` (every seed's result), their mean and min-max band."""
  metric, shots, values = shots_and_values(result)
  fig, ax = plt.subplots(figsize=(4.5, 3.5))
  ax.plot(shots, values, "o-", label=task)
  if spread:
    table = np.array([shots_and_values(r)[2] for r in spread])
    ax.plot(shots, table.mean(axis=0), "s--", label=f"mean of {len(spread)} seeds")
    ax.fill_between(shots, table.min(axis=0), table.max(axis=0), alpha=0.2, label="min-max")
  if "chance" in result:
    ax.axhline(result["chance"], color="grey", linestyle="--", label="chance")
  ax.set(title=f"{task}: few-shot", xlabel="shots", ylabel=METRIC_NAMES.get(metric, metric),
         xticks=shots)
  ax.legend(fontsize=8)
  return _save(fig, workdir, f"fewshot_{task}.png")


GAIN = 0.30  # Issue #25's robustness bar: k-shot names accuracy >= 0-shot + GAIN and chance + GAIN.


def seed_table(task: str, runs: dict[tuple[int, int], tuple[dict, dict]]) -> list[str]:
  """Markdown lines: `task`'s metric vs shots for every (stage-1, stage-3) seed, mean, min, max, and
  with a chance level, in how many runs each k > 0 beats both 0 shots and chance by GAIN."""
  ordered = sorted(runs.items())
  results = {seeds: fewshot[task] for seeds, (_, fewshot) in ordered}
  _, shots, _ = shots_and_values(next(iter(results.values())))
  table = np.array([shots_and_values(r)[2] for r in results.values()])
  row = lambda label, values: f"| {label} | " + " | ".join(f"{v:.3f}" for v in values) + " |"
  lines = ["", f"Over {len(results)} runs (stage-1 seed, stage-3 seed; stage-1 zero-shot "
           "i2t recall@1):", "", "| run | " + " | ".join(map(str, shots)) + " |",
           "|---|" + "---|" * len(shots)]
  for ((seed1, seed3), (retrieval, _)), values in zip(ordered, table):
    lines.append(row(f"{seed1}, {seed3} (i2t {retrieval.get('i2t_recall@1', float('nan')):.3f})",
                     values))
  lines += [row("mean", table.mean(axis=0)), row("min", table.min(axis=0)),
            row("max", table.max(axis=0))]
  chance = next(iter(results.values())).get("chance")
  if chance is not None and 0 in shots:
    lines.append("")
    zero = table[:, shots.index(0)]
    for i, k in enumerate(shots):
      if k:
        wins = int(np.sum((table[:, i] >= zero + GAIN) & (table[:, i] >= chance + GAIN)))
        lines.append(f"- {k} shots >= 0 shots + {GAIN:.2f} and >= chance + {GAIN:.2f}: {wins} of "
                     f"{len(table)} runs.")
  return lines


def write(workdir: str, stage_dirs: dict[str, str], retrieval: dict[str, float],
          copying: dict[str, float], fewshot: dict[str, dict[str, float]],
          seconds: dict[str, float],
          runs: dict[tuple[int, int], tuple[dict, dict]] | None = None) -> str:
  """Writes workdir/report.md (and its plots); returns its path. `runs`: {(stage-1 seed, stage-3
  seed): (stage-1 retrieval, few-shot results)} of the demo's --seeds, tabulated per task."""
  runs = runs or {}
  stages = {title: read_metrics(d) for title, d in stage_dirs.items()}
  flamingo_rows = stages[list(stages)[-1]]
  lines = ["# Flamingo demo report", "",
           "Three stages on the embedded shapes dataset, then few-shot evaluation on TEST splits "
           "(names: made-up names never seen in training).", "",
           "## Training", "",
           "| stage | steps | final loss | first loss | wall time (s, the run that trained it) |",
           "|---|---|---|---|---|"]
  for title, rows in stages.items():
    lines.append(f"| {title} | {rows[-1]['step']} | {rows[-1]['loss']:.3f} | "
                 f"{rows[0]['loss']:.3f} | {seconds.get(title, float('nan')):.0f} |")
  lines += ["", f"![losses]({plot_losses(workdir, stages)})", "",
            "Stage 1 zero-shot retrieval on the shapes_pairs test split: " + ", ".join(
                f"{k} {v:.3f}" for k, v in sorted(retrieval.items())) + ".", "",
            "Stage 2 in-context copying (eval/copying.py: random tokens repeated once; Flamingo's "
            "few-shot learning is its frozen LM's, which must copy from context): NLL "
            f"{copying['first_copy_nll']:.2f} on the first copy, {copying['second_copy_nll']:.2f} "
            f"on the second (uniform {copying['uniform_nll']:.2f}): copy gain "
            f"{copying['copy_gain']:.2f} nats per token (0 = none).", "",
            "## Gates (tanh of the xattn gates by layer over training; paper Fig. 14)", "",
            f"![gates]({plot_gates(workdir, flamingo_rows)})", "", "| layer | attn | ffw |",
            "|---|---|---|"]
  gates = gate_table(flamingo_rows)
  for layer in gates["attn"]:
    lines.append(f"| {layer} | {gates['attn'][layer][-1]:+.4f} | {gates['ffw'][layer][-1]:+.4f} |")
  lines += ["", "## Few-shot evaluation", ""]
  for task, result in fewshot.items():
    metric, shots, values = shots_and_values(result)
    chance = f" (chance {result['chance']:.3f})" if "chance" in result else ""
    lines += [f"### {task}: {METRIC_NAMES.get(metric, metric)}{chance}", "",
              "| shots | " + " | ".join(map(str, shots)) + " |",
              "|---|" + "---|" * len(shots),
              f"| {metric} | " + " | ".join(f"{v:.3f}" for v in values) + " |"]
    if "chance" in result:
      lines.append("| chance | " + " | ".join(f"{result['chance']:.3f}" for _ in shots) + " |")
    spread = [r[task] for _, r in runs.values()]
    lines += seed_table(task, runs) if runs else []
    lines += ["", f"![{task}]({plot_fewshot(workdir, task, result, spread)})", ""]
  lines += ["Total wall time: {:.0f} s.".format(sum(seconds.values())), ""]
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path
