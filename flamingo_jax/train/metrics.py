"""Training metrics: gate values, throughput, MFU, and the writers (TensorBoard, JSONL, progress).

FLOPs per step are counted on the update step's jaxpr (flops.py: every scanned layer counted, the
frozen NFNet's forward-only convs, the LM's activation-only backward and the trainable layers' full
backward, remat recomputation excluded), with no hand formula to keep in sync with the model.
MFU = achieved FLOP/s per device / the device's peak (table below; on CPU the peak is measured by
timing a matmul).
"""
import json
import os
import sys
import time
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tensorboardX
import tqdm

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


class Writer:
  """Scalars to TensorBoard and workdir/metrics.jsonl (process 0), and a progress bar or logs."""

  def __init__(self, workdir: str, total_steps: int, first_step: int):
    self._main = jax.process_index() == 0
    self._total, self._last_step, self._last_time = total_steps, first_step, time.perf_counter()
    if self._main:
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._bar = (tqdm.tqdm(total=total_steps, initial=first_step, dynamic_ncols=True)
                 if self._main and sys.stderr.isatty() else None)

  def steps_per_second(self, step: int) -> float:
    """Steps/s since the previous call."""
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    return rate

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._main:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for key, value in scalars.items():
      self._tb.add_scalar(key, value, step)
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    brief = {k: scalars[k] for k in ("loss", "lr", "steps_per_s", "tflops_per_device", "mfu")
             if k in scalars}
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in brief.items()})
    else:
      eta = (self._total - step) / max(scalars.get("steps_per_s", 0.0), 1e-9)
      logging.info("step %d/%d %s eta %.0fs", step, self._total,
                   " ".join(f"{k}={v:.4g}" for k, v in brief.items()), eta)

  def close(self) -> None:
    if self._main:
      self._tb.close()
      self._jsonl.close()
    if self._bar is not None:
      self._bar.close()
