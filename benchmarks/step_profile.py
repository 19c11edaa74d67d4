"""Where the train step's time goes: a profiler trace of speed.py's step, by part and kind.

Traces --steps calls of our compiled update step (rolled scan or --unroll) at speed.py's base grid
point (the first value of its --vocab, --every, --seq and --media flags) and sums the time of
every XLA operation, grouped by
  part  the model component its HLO metadata names: resampler, xattn blocks, LM layers,
        embeddings/LM head/loss, each forward or backward (`transpose(jvp(...))`), and the
        optimizer (everything outside the differentiated function); XLA's own buffers (e.g.
        zero-filled scan stacks) carry no metadata
  kind  matmul (YNNPACK/oneDNN/Eigen dot fusions), layout copy (transpose/copy fusions),
        scan bookkeeping (dynamic-slice / dynamic-update-slice of stacked weights and residuals,
        zero-filled stacks), elementwise/other.
The wall time of the traced calls is printed beside: operations can overlap on XLA's threads, so
the total may exceed it, and time between operations is in no operation (decoding's total falls
well short of it, benchmarks/RESULTS.md). The process runs with
`host_memory.reuse_cpu_step_buffers`, as speed.py does.

--decode traces speed.py's generation call instead (resampler, then `decode.greedy_search` of 32
new tokens); its parts are split into the prompt's forward pass and the decoding loop, and the
times are per call.

python benchmarks/step_profile.py                      # base point, rolled scan
python benchmarks/step_profile.py --unroll --vocab=32768 --every=1
python benchmarks/step_profile.py --decode --unroll
"""
import collections
import dataclasses
import glob
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax

from benchmarks import speed

_UNROLL = flags.DEFINE_bool("unroll", False, "model.unroll_layers=True.")
_STEPS = flags.DEFINE_integer("steps", 3, "Traced steps (after one untimed).")
_TOP = flags.DEFINE_integer("top", 15, "Also list the N slowest instructions.")
_DECODE = flags.DEFINE_bool("decode", False, "Trace greedy generation, not the train step.")

KINDS = (("matmul", r"^(ynn_fusion|xnn_fusion|onednn|dot|custom-call)"),
         ("layout copy", r"(transpose|copy)"),
         ("scan bookkeeping", r"(dynamic-slice|dynamic-update-slice|wrapped_broadcast)"),
         ("elementwise/other", r""))
PARTS = (("resampler", r"/resampler/"), ("xattn", r"/xattn/"), ("LM layers", r"/layers/"),
         ("rest", r""))
REST = {False: "embeddings, LM head and loss", True: "embeddings, LM head and token choice"}


def classify(op_name: str, instruction: str, decode: bool = False) -> tuple[str, str]:
  """(part, kind) of one HLO instruction from its name and its metadata op_name."""
  kind = next(k for k, pattern in KINDS if re.search(pattern, instruction))
  if not op_name:
    return "(no metadata)", kind
  part = next(p for p, pattern in PARTS if re.search(pattern, op_name))
  part = REST[decode] if part == "rest" else part
  if decode:  # The search's while loop makes the new tokens; before it, the prompt's pass.
    loop = "greedy_search)/while/body" in op_name
    return part + (", decoding loop" if loop else ", prompt"), kind
  if "jvp(" not in op_name:  # Outside the differentiated function: AdamW, clipping, sums.
    return "optimizer", kind
  return part + (", backward" if "transpose(jvp" in op_name else ", forward"), kind


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its metadata op_name (empty when it has none)."""
  names = {}
  for line in hlo_text.splitlines():
    match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
    if match:
      op_name = re.search(r'op_name="([^"]*)"', line)
      names[match.group(1)] = op_name.group(1) if op_name else ""
  return names


def instruction_ms(trace_dir: str, names: dict[str, str], steps: int, module: str | None = None
                   ) -> dict[str, float]:
  """{HLO instruction: ms per step} from the perfetto trace (loops' own events left out), of the
  HLO module so named only if `module` is given (another computation's names may coincide)."""
  path = sorted(glob.glob(f"{trace_dir}/plugins/profile/*/perfetto_trace.json.gz"))[-1]
  with gzip.open(path) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  totals = collections.Counter()
  for event in events:
    if (event.get("ph") == "X" and event["name"] in names and not event["name"].startswith("while")
        and module in (None, event.get("args", {}).get("hlo_module"))):
      totals[event["name"]] += event["dur"] / 1e3 / steps
  return totals


def breakdown(per_instruction: dict[str, float], names: dict[str, str], decode: bool = False
              ) -> dict[tuple[str, str], float]:
  """{(part, kind): ms per step}."""
  totals = collections.Counter()
  for instruction, ms in per_instruction.items():
    totals[classify(names[instruction], instruction, decode)] += ms
  return totals


def table(totals: dict[tuple[str, str], float]) -> str:
  kinds = [k for k, _ in KINDS]
  parts = sorted({p for p, _ in totals}, key=lambda p: -sum(totals[p, k] for k in kinds))
  lines = ["| part | " + " | ".join(kinds) + " | total ms |", "|---|" + "---:|" * (len(kinds) + 1)]
  for part in parts + ["total"]:
    row = [sum(v for (p, k), v in totals.items() if k == kind and part in (p, "total"))
           for kind in kinds]
    lines.append(f"| {part} | " + " | ".join(f"{v:.0f}" for v in row) + f" | {sum(row):.0f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  size, model, params, features = speed.base_point()
  if _UNROLL.value:
    model = model.clone(lm=dataclasses.replace(model.lm, unroll_layers=True))
  if _DECODE.value:
    prompt = speed.tokens_for(size, size.prompt, seed=2)
    step, _, hlo = speed.ours_generate(model, params, features, prompt, size.new_tokens,
                                       with_hlo=True)
  else:
    tokens = speed.tokens_for(size, size.seq, seed=1)
    step, _, _, hlo = speed.ours_train(model, params, features, tokens, with_hlo=True)
  step()
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      step()
    wall_ms = (time.perf_counter() - start) / _STEPS.value * 1e3
    jax.profiler.stop_trace()
    names = op_names(hlo)
    per_instruction = instruction_ms(trace_dir, names, _STEPS.value,
                                     "jit_greedy_search" if _DECODE.value else None)
  print(f"{size.label()}, unroll_layers={_UNROLL.value}, "
        f"1-minute load average {os.getloadavg()[0]:.2f}; ms per "
        f"{'generation call' if _DECODE.value else 'step'} (wall time {wall_ms:.0f} ms):\n\n"
        f"{table(breakdown(per_instruction, names, _DECODE.value))}\n")
  for instruction, ms in per_instruction.most_common(_TOP.value):
    print(f"{ms:8.1f} ms  {instruction}  {names[instruction]}")


if __name__ == "__main__":
  app.run(main)
