"""Smoke test of benchmarks/speed.py at the tiny size, once. Timings are not asserted."""
import dataclasses

import pytest

from benchmarks import speed


def test_grid_axes_is_the_base_each_change_and_the_largest_point():
  base = speed.BASES["tiny"]
  axes = {"vocab": [8, 32], "every": [2, 1, 4], "seq": [16], "media": [2, 1]}
  points = speed.grid(base, axes, full=False)
  first = dataclasses.replace(base, vocab=8, every=2, seq=16, media=2)
  assert points[0] == first
  assert points[1:5] == [dataclasses.replace(first, **change) for change in (
      dict(vocab=32), dict(every=1), dict(every=4), dict(media=1))]
  assert points[-1] == dataclasses.replace(first, vocab=32, every=4)
  assert len(speed.grid(base, axes, full=True)) == 2 * 3 * 1 * 2


def test_a_loaded_run_or_a_moved_bandwidth_is_not_a_result():
  assert not speed.not_a_result(True, (30.9, 33.8))  # 9%: the table of RESULTS.md.
  assert speed.not_a_result(False, (30.9, 30.9)) == ["the machine was not idle"]
  moved = speed.not_a_result(True, (31.5, 54.2))
  assert moved == ["the copy bandwidth moved from 31.5 to 54.2 GB/s during the run"]
  assert len(speed.not_a_result(False, (10.4, 36.0))) == 2


@pytest.mark.slow  # Builds both models and compiles four programs (~1-2 min).
def test_speed_tiny_point_has_every_column(tmp_path):
  size = speed.BASES["tiny"]
  row = speed.run(size, reps=1, warmup=0, peak=1.0, bandwidth=1.0)
  assert list(row) == list(speed.COLUMNS)
  train = [float(v) for v in row[speed.COLUMNS[0]].split(" / ")]
  assert len(train) == 3 and min(train) > 0
  peak_needed = float(row["1.3x train needs: fraction of peak"])  # 1.3 x FLOPs / theirs / peak.
  assert peak_needed == pytest.approx(1.3 * float(row["fraction of jnp.dot peak (best)"])
                                      * min(train[:2]) / train[2], rel=0.05, abs=0.01)
  text = speed.table({size.label(): row})
  assert text.splitlines()[2].startswith(f"| {size.label()} |")
  results = tmp_path / "RESULTS.md"
  results.write_text("# Other\n\nkept\n")
  speed.write_section(str(results), "RUN-ONE\n")
  speed.write_section(str(results), "RUN-TWO\n")
  written = results.read_text()
  assert written.startswith("# Other\n\nkept\n") and written.count(speed.SECTION) == 1
  assert "RUN-TWO" in written and "RUN-ONE" not in written
