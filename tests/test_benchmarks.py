"""Smoke test of benchmarks/speed.py: every row at the tiny size, once. Timings are not asserted."""
from benchmarks import speed


def test_speed_tiny():
  results = speed.run("tiny", reps=1, warmup=0)
  assert list(results) == list(speed.MEASURES)
  for measure, (ours, theirs) in results.items():
    assert ours > 0 and (theirs is None or theirs > 0), (measure, ours, theirs)
  text = speed.table({"tiny": results})
  assert all(f"| tiny | {measure} |" in text for measure in speed.MEASURES)
  assert "ratio" in text.splitlines()[0]
