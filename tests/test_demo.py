"""End to end: the shortened demo (tokenizer, three stages, few-shot evaluation, report).

The shortened run (configs' `:short`, ~120 Flamingo steps) does not reliably show few-shot learning
on the names task, so this checks the report and the results' structure, not the gain; the full
demo (`bash scripts/demo.sh`) is where the gain is measured.
"""
import json
import pathlib
import re

import pytest

from flamingo_jax import demo


@pytest.mark.slow
def test_short_demo_writes_report(tmp_path):
  path = pathlib.Path(demo.run(str(tmp_path), short=True))
  text = path.read_text()
  for png in ("losses.png", "gates.png", "fewshot_names.png", "fewshot_vqa.png",
              "fewshot_captioning.png"):
    assert f"]({png})" in text and (tmp_path / png).stat().st_size > 0, png
  assert re.search(r"i2t_recall@1 \d\.\d{3}", text)
  assert re.search(r"### names: accuracy \(chance 0\.250\)", text)
  results = json.loads((tmp_path / "stage3" / "eval.json").read_text())
  names = results["names"]
  assert {"accuracy/0shot", "accuracy/4shot", "accuracy/8shot", "chance"} <= set(names)
  assert all(0.0 <= v <= 1.0 for v in names.values())
  gates = [json.loads(line) for line in (tmp_path / "stage3" / "metrics.jsonl").open()][-1]
  assert {"gates/attn/layer_000", "gates/ffw/layer_003"} <= set(gates)
