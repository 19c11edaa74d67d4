"""Reuse XLA:CPU's per-step temporary buffer instead of mapping it afresh every step.

XLA:CPU allocates an executable's temporary buffer at every run: 100-185 MB for the demo's
update steps. glibc maps a block that large with a fresh mmap (always when the allocating thread
is the pool thread that runs asynchronously dispatched computations: its arena's heaps stop at
64 MB) and unmaps it on free, so every step faults its pages in and the kernel zeroes them again:
~30 % of stage 3's CPU time was in the kernel (docs/DEMO_RESULTS.md, 2026-12-07). Running
computations on the calling thread, whose main heap may grow without mmap and keeps what it
frees, makes every step reuse the same block; results are the same to every bit.
"""
import ctypes

from absl import logging
import jax

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_MAX = -4


def reuse_cpu_step_buffers() -> bool:
  """In a single process that computes on the CPU (`jax_platforms` 'cpu', e.g. set by
  `console.setup` on a host without accelerators), before JAX creates its CPU client: computations
  run on the calling thread and glibc's main heap serves every size and keeps what is freed.

  Returns whether both took effect. Freed host memory then stays with the process (it holds its
  peak), which is why accelerator hosts, whose large host transfers would stay resident, are left
  as they are. False without glibc's mallopt (the default allocation: slower only).
  """
  if (jax.config.jax_platforms or "").split(",")[0] != "cpu":
    return False
  jax.config.update("jax_cpu_enable_async_dispatch", False)  # Read when the CPU client is made.
  mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
  if mallopt is None:
    logging.info("No mallopt in this C library: XLA:CPU's step buffers are mapped per step.")
    return False
  return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
