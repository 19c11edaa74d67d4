"""Training metrics: gate values, throughput, MFU, and the writers (TensorBoard, JSONL, progress).

FLOPs per step are counted on the update step's jaxpr (flops.py: every scanned layer counted, the
frozen NFNet's forward-only convs, the LM's activation-only backward and the trainable layers' full
backward, remat recomputation excluded), with no hand formula to keep in sync with the model.
MFU = achieved FLOP/s per device / the device's peak (table below; on CPU the peak is measured by
timing a matmul).
"""
import json
import sys
import time
from typing import Any, Mapping

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from flamingo_jax import paths
from flamingo_jax.train import flops as flops_lib
from flamingo_jax.train import state as state_lib

# Dense bf16 peak FLOP/s per device, by a substring of `device.device_kind`.
# The first substring that matches wins: v5p reports its kind as 'TPU v5', v5e as 'TPU v5 lite'.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12,
              "TPU v6": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: jax.Device) -> float:
  for kind, flops in PEAK_FLOPS.items():
    if kind in device.device_kind:
      return flops
  x = jnp.ones((1024, 1024), jnp.float32)
  dot = jax.jit(lambda a: a @ a)
  dot(x).block_until_ready()
  start = time.perf_counter()
  for _ in range(10):
    x = dot(x)
  x.block_until_ready()
  return 10 * 2 * 1024 ** 3 / (time.perf_counter() - start)


def step_flops(fn, *args, num_devices: int) -> float:
  """Model FLOPs of one step `fn(*args)` per device, counted on its jaxpr (train/flops.py)."""
  return flops_lib.step_flops(fn, *args) / num_devices


def gate_values(trainable: Any, xattn_layers: list[int]) -> dict[str, float]:
  """tanh of every xattn block's attn/ffw gate, keyed by the LM layer the block precedes."""
  out = {}
  for kind in ("attn", "ffw"):
    values = []
    for part in ("groups", "tail"):  # Block order: the scanned groups, then the tail block.
      gate = state_lib.flat(trainable).get(f"lm/{part}/xattn/{kind}_gate")
      if gate is not None:
        values += list(np.tanh(np.asarray(jax.device_get(gate), np.float32)).reshape(-1))
    out.update({f"gates/{kind}/layer_{i:03d}": v for i, v in zip(xattn_layers, values)})
  return out


class AppendOnlyFile:
  """A file written by appending, local or on an object store (gs://), which cannot append.

  Locally each write is appended and flushed. On an object store the file's content (read once, at
  start) is kept and the object rewritten whole by flush(), which write() calls at most every
  `flush_every_s`: metrics and event files are small.
  """

  def __init__(self, path: epath.PathLike, flush_every_s: float = 0.0):
    self._path, self._flush_every_s = epath.Path(path), flush_every_s
    self._local = not paths.is_url(path)
    if self._local:
      self._file = self._path.open("ab")
    else:
      self._data = bytearray(self._path.read_bytes() if self._path.exists() else b"")
      self._flushed = time.monotonic()

  def write(self, data: bytes) -> None:
    if self._local:
      self._file.write(data)
      self._file.flush()
      return
    self._data += data
    if time.monotonic() - self._flushed >= self._flush_every_s:
      self.flush()

  def flush(self) -> None:
    if self._local:
      self._file.flush()
    else:
      self._path.write_bytes(bytes(self._data))
      self._flushed = time.monotonic()

  def close(self) -> None:
    self.flush()
    if self._local:
      self._file.close()


class _ObjectStoreEvents:
  """tensorboardX event files on gs:// through epath (tensorboardX's own gs:// writer would
  bring a second GCS client, with its own credentials and failure modes)."""

  def open(self, path: str) -> AppendOnlyFile:
    return AppendOnlyFile(path, flush_every_s=float("inf"))  # tensorboardX calls flush().

  def directory_check(self, path: str) -> None:
    del path  # Object stores have no directories to create.


def _import_tensorboardx():
  """tensorboardX without torch: its writer imports torch when it is installed (the peers' test
  extra) only to accept torch tensors, which nothing here logs; that import took 3.6 s of every
  process's start (`python -X importtime -m flamingo_jax.demo --helpfull`)."""
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # `import torch` raises ImportError (tensorboardX's fallback).
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  finally:
    if blocked:
      del sys.modules["torch"]
  record_writer.register_writer_factory("gs", _ObjectStoreEvents())
  return tensorboardX


tensorboardX = _import_tensorboardx()


def summary_writer(logdir: str):
  """A TensorBoard event writer for `logdir` (local or gs://)."""
  return tensorboardX.SummaryWriter(logdir)


class Writer:
  """Scalars to TensorBoard and workdir/metrics.jsonl (process 0), and a progress bar or logs."""

  def __init__(self, workdir: str, total_steps: int, first_step: int):
    self._main = jax.process_index() == 0
    self._total, self._last_step, self._last_time = total_steps, first_step, time.perf_counter()
    self._input_wait = 0.0
    if self._main:
      self._tb = summary_writer(f"{workdir}/tensorboard")
      # An object store's copy is rewritten at most every 30 s (and at close).
      self._jsonl = AppendOnlyFile(epath.Path(workdir) / "metrics.jsonl", flush_every_s=30.0)
    self._bar = (tqdm.tqdm(total=total_steps, initial=first_step, dynamic_ncols=True)
                 if self._main and sys.stderr.isatty() else None)

  def waited_for_input(self, seconds: float) -> None:
    self._input_wait += seconds

  def interval(self, step: int) -> tuple[float, float]:
    """(steps/s, fraction of the time spent waiting on input) since the previous call."""
    now = time.perf_counter()
    elapsed = max(now - self._last_time, 1e-9)
    rate, waited = (step - self._last_step) / elapsed, self._input_wait / elapsed
    self._last_step, self._last_time, self._input_wait = step, now, 0.0
    return rate, waited

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._main:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for key, value in scalars.items():
      self._tb.add_scalar(key, value, step)
    self._jsonl.write((json.dumps({"step": step, **scalars}) + "\n").encode())
    brief = {k: scalars[k] for k in ("loss", "lr", "steps_per_s", "input_wait_fraction", "mfu")
             if k in scalars}
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in brief.items()})
    else:
      eta = (self._total - step) / max(scalars.get("steps_per_s", 0.0), 1e-9)
      logging.info("step %d/%d %s eta %.0fs", step, self._total,
                   " ".join(f"{k}={v:.4g}" for k, v in brief.items()), eta)

  def flush(self) -> None:
    """Makes what was written durable (an object store's copy lags by up to 30 s otherwise)."""
    if self._main:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self._main:
      self._tb.close()
      self._jsonl.close()
    if self._bar is not None:
      self._bar.close()
