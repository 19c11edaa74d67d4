"""Is the machine idle while a benchmark runs? Other processes' CPU use, apart from our own.

The 1-minute load average after a run counts the benchmark's own threads (and before it, those of
a benchmark that just ended), so it cannot say whether anything else ran. `OtherCpu` reads the
machine's busy CPU time (/proc/stat) and this process's own (its threads and waited-for
children, getrusage) around a run: the difference per second of wall time is how many cores
other work kept busy. A result needs at most MAX_OTHER_CORES.
"""
import os
import resource
import time

from absl import logging

MAX_OTHER_CORES = 0.5


def _busy_seconds() -> float:
  """CPU seconds all cores spent busy since boot (user, nice, system, irq, softirq, steal)."""
  with open("/proc/stat") as f:
    fields = [int(v) for v in f.readline().split()[1:]]
  user, nice, system, _, _, irq, softirq, steal = fields[:8]
  return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
  return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                               resource.getrusage(resource.RUSAGE_CHILDREN)))


def wait_for_load(max_load: float, timeout_s: float = 300) -> float:
  """Waits until the 1-minute load average is at most max_load (or timeout_s); returns it."""
  deadline = time.monotonic() + timeout_s
  while os.getloadavg()[0] > max_load and time.monotonic() < deadline:
    logging.info("Load average %.2f > %.2f: waiting.", os.getloadavg()[0], max_load)
    time.sleep(10)
  return os.getloadavg()[0]


class OtherCpu:
  """Context manager; `.cores` = average cores other processes kept busy during the block."""

  def __enter__(self):
    self.load_before = os.getloadavg()[0]
    self._start = (time.monotonic(), _busy_seconds(), _own_seconds())
    return self

  def __exit__(self, *exc):
    wall, busy, own = (b - a for a, b in zip(
        self._start, (time.monotonic(), _busy_seconds(), _own_seconds())))
    self.cores = max(busy - own, 0.0) / wall
    return False

  def idle(self) -> bool:
    return self.cores <= MAX_OTHER_CORES

  def describe(self) -> str:
    return (f"other processes' CPU during the run: {self.cores:.2f} cores (a result needs <= "
            f"{MAX_OTHER_CORES}); 1-minute load average before: {self.load_before:.2f}")
