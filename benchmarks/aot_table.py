"""The AOT table: the paper configs compiled for TPU topologies on this CPU host (needs libtpu).

python benchmarks/aot_table.py                       # all rows -> benchmarks/AOT.md
python benchmarks/aot_table.py --rows=80b/v4-3072    # some rows (printed, AOT.md untouched)

Each row compiles the real update step (flamingo_jax/train/aot.py) in its own process, one at a
time, and reports per-chip memory, FLOPs per step, the step time at 50% MFU and compile time.
AOT.md is rewritten after every row; its hand-written section from LEVERS on is kept.
"""
import json
import os
import pathlib
import subprocess
import sys

from absl import app
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
_ROWS = flags.DEFINE_list("rows", [], "Row names (config/topology) to run; default all.")
MFU = 0.5
LEVERS = "## Levers that mattered"

# Paper batch sizes (M3W 256, ALIGN 512, LTIP 512, VTP 64) must split over the data-parallel
# groups; on 1,536 chips with 16-way model parallelism there are 96, so the 80B v4 row uses the
# nearest multiples of 96 above them. 3B on 64 chips, 9B on 128 chips / 4-way model parallelism
# and 80B on 512 v5p chips (32 groups) take the paper's sizes as they are.
BATCH_96 = ("--config.input.datasets.m3w.batch_size=288",
            "--config.input.datasets.align.batch_size=576",
            "--config.input.datasets.ltip.batch_size=576",
            "--config.input.datasets.vtp.batch_size=96")
ROWS = {  # name -> (config, topology, overrides); the paper's 80B topology first.
    "tiny/v4-8": ("tiny", "v4-8", ()),
    "80b/v4-3072": ("flamingo_80b", "v4-3072", BATCH_96),
    "3b/v4-128": ("flamingo_3b", "v4-128", ()),
    "9b/v4-256": ("flamingo_9b", "v4-256", ()),
    "80b/v5p-1024": ("flamingo_80b", "v5p-1024", ()),
    "3b/v5p-128": ("flamingo_3b", "v5p-128", ()),
    "9b/v5p-256": ("flamingo_9b", "v5p-256", ()),
}

# Runs one row in a fresh process and prints its report as JSON.
CHILD = """
import dataclasses, json, sys
from absl import flags
from ml_collections import config_flags
from flamingo_jax.train import aot
config_flags.DEFINE_config_file("config", None, "")
flags.FLAGS(sys.argv)
try:
  reports = [dataclasses.asdict(r) for r in aot.compile_step(flags.FLAGS.config, sys.argv[1])]
except Exception as e:  # An out-of-memory compile is a row of the table too.
  reports = [{"error": str(e).splitlines()[0][:300]}]
print("REPORTS" + json.dumps(reports))
"""


def run_row(config: str, topology: str, overrides) -> list[dict]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  result = subprocess.run(
      [sys.executable, "-c", CHILD, topology, f"--config=flamingo_jax/configs/{config}.py",
       *overrides],
      cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in result.stdout.splitlines() if l.startswith("REPORTS")]
  if not lines:
    return [{"error": f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]}"}]
  return json.loads(lines[-1][len("REPORTS"):])


def markdown_row(name: str, overrides, r: dict) -> str:
  if "error" in r:
    return f"| {name} | | | | | | | | | | {r['error']} |"
  gib = lambda b: f"{b / 2 ** 30:.2f}"
  total = r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
  step_s = r["flops"] / (r["peak_flops"] * MFU)
  note = "batch: " + ",".join(o.split("=")[1] for o in overrides) if overrides else ""
  return (f"| {name} | {r['topology']} ({r['chips']}) | {r['mesh']['data']}×{r['mesh']['fsdp']}×"
          f"{r['mesh']['model']} | {gib(r['argument_bytes'])} | {gib(r['output_bytes'])} | "
          f"{gib(r['temp_bytes'])} | {gib(total)} / {gib(r['hbm_bytes'])} "
          f"({100 * total / r['hbm_bytes']:.0f}%) | {r['flops'] * r['chips']:.2e} | {step_s:.2f} | "
          f"{r['compile_s']:.0f} | {note} |")


def write_markdown(lines: list[str]) -> None:
  """Rewrites AOT.md with the table so far, keeping its hand-written LEVERS section."""
  path = ROOT / "benchmarks" / "AOT.md"
  old = path.read_text() if path.exists() else ""
  levers = old[old.index(LEVERS):] if LEVERS in old else f"{LEVERS}\n\n(to be written)\n"
  path.write_text(
      "# Ahead-of-time compilation for TPU topologies\n\n"
      f"```\npython {pathlib.Path(__file__).relative_to(ROOT)}\n```\n\n"
      "The real update step (all the config's datasets, accumulated) compiled for each topology "
      f"on a {os.cpu_count()}-core CPU host with libtpu, no TPU. Per chip, from XLA's memory "
      "analysis: "
      "arguments, outputs, temporaries and total = arguments + outputs − donated + temporaries, "
      "against the chip's HBM. FLOPs per step: model FLOPs counted on the jaxpr, all chips. "
      "Compile s: lower + compile, on a shared host (a loaded host compiles slower).\n\n"
      + "\n".join(lines) + "\n\n" + levers)


def main(argv):
  del argv
  names = _ROWS.value or list(ROWS)
  lines = ["| row | topology (chips) | mesh d×f×m | args GiB | outputs GiB | temps GiB | "
           "total / HBM GiB (%) | FLOPs/step | step s @50% MFU | compile s | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for name in names:
    config, topology, overrides = ROWS[name]
    for r in run_row(config, topology, overrides):
      lines.append(markdown_row(name, overrides, r))
      print(lines[-1], flush=True)
    if not _ROWS.value:
      write_markdown(lines)


if __name__ == "__main__":
  app.run(main)
