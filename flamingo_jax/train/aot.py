"""Ahead-of-time compilation of the real update step for a TPU topology, on a CPU host.

python launch.py --mode=compile --config=flamingo_jax/configs/flamingo_80b.py --topology=v4-3072

Needs libtpu (`pip install "jax[tpu]"`; no TPU): `jax.experimental.topologies` gives the topology's
abstract devices, and trainer.make_setup's jitted step is lowered with ShapeDtypeStructs (nothing is
allocated) and compiled. Reports per-chip memory (XLA's memory analysis) against the chip's HBM,
model FLOPs per step (counted on the jaxpr, flops.py), compile time, and the step time at an
assumed MFU.
"""
import dataclasses
import itertools
import os
import time

import jax
from jax.experimental import topologies
import numpy as np

from flamingo_jax import modules
from flamingo_jax.data import pp as pp_lib
from flamingo_jax.train import input as input_lib
from flamingo_jax.train import kinds
from flamingo_jax.train import metrics as metrics_lib
from flamingo_jax.train import sharding as sharding_lib
from flamingo_jax.train import trainer

GiB = 2 ** 30
# Per chip: HBM in GiB, and whether the type name counts TensorCores (2 per chip) rather than chips.
CHIPS = {"v4": (32, True), "v5p": (95, True), "v5e": (16, False), "v6e": (32, False)}


def topology_name(name: str) -> str:
  """'v4-128' (a TPU type: v4 and v5p count TensorCores) or 'v4:4x4x4' -> 'v4:4x4x4'.

  A type becomes the most cube-like (v4, v5p) or square (v5e, v6e) shape of its chip count.
  """
  generation, sep, size = name.partition(":" if ":" in name else "-")
  if generation not in CHIPS or not sep or not size:
    raise ValueError(f"--topology={name!r}; expected e.g. v4-128 or v4:4x4x4, of {sorted(CHIPS)}.")
  if ":" in name:
    return name
  per_core = CHIPS[generation][1]
  if not size.isdigit() or int(size) % (2 if per_core else 1):
    raise ValueError(f"--topology={name!r}: {size!r} is not a whole number of chips.")
  chips, ndim = int(size) // (2 if per_core else 1), 3 if per_core else 2
  divisors = [d for d in range(1, chips + 1) if chips % d == 0]
  shapes = [s for s in itertools.product(divisors, repeat=ndim)
            if np.prod(s) == chips and list(s) == sorted(s, reverse=True)]
  shape = min(shapes, key=lambda s: s[0] / s[-1])
  return f"{generation}:{'x'.join(map(str, shape))}"


def topology_devices(name: str) -> list[jax.Device]:
  """The abstract devices (one per chip) of a TPU topology."""
  name = topology_name(name)
  generation = name.split(":")[0]
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # Beside other processes using libtpu.
  try:
    desc = topologies.get_topology_desc(
        topology_name=name, platform="tpu",
        chip_config_name="megacore" if CHIPS[generation][1] else "default")
  except (RuntimeError, ValueError) as e:
    raise RuntimeError(f"No TPU topology {name!r} ({e}). AOT compilation needs libtpu: "
                       'pip install "jax[tpu]".') from e
  return list(desc.devices)


def abstract_batches(config, mesh) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
  """{dataset: {field: ShapeDtypeStruct}} of one step's global batches, batch axes sharded."""
  input_lib.check_batch_sizes(config, mesh)
  sharding = sharding_lib.batch_sharding(mesh)
  out = {}
  for name, cfg in config.input.datasets.items():
    if config.input.kind == "synthetic":
      one = input_lib.synthetic_batch(
          np.random.default_rng(0), batch_size=1, num_media=cfg.num_media,
          num_frames=cfg.num_frames, seq_len=cfg.seq_len, image_size=config.image_size,
          vocab_size=config.model.lm.vocab_size)
      fields = {k: (v.shape[1:], v.dtype) for k, v in one.items()}
    else:
      fields = pp_lib.output_shapes(cfg.pp)
    out[name] = {k: jax.ShapeDtypeStruct((cfg.batch_size, *shape), dtype, sharding=sharding)
                 for k, (shape, dtype) in fields.items()}
  return out


@dataclasses.dataclass
class Report:
  """One compiled update step: per-chip bytes, FLOPs per chip and step, compile seconds."""
  topology: str
  chips: int
  mesh: dict[str, int]
  datasets: tuple[str, ...]
  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # Outputs that reuse donated arguments (the train state).
  temp_bytes: int
  hbm_bytes: int
  flops: float
  peak_flops: float  # Dense bf16 FLOP/s of one chip.
  compile_s: float

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  def step_seconds(self, mfu: float) -> float:
    return self.flops / (self.peak_flops * mfu)

  def format(self, mfu: float = 0.5) -> str:
    gib = lambda b: f"{b / GiB:.2f} GiB" if b >= GiB else f"{b / 2 ** 20:.1f} MiB"
    return "\n".join([
        f"{self.topology}: {self.chips} chips, mesh {self.mesh}, datasets {list(self.datasets)}",
        f"  per chip: arguments {gib(self.argument_bytes)}, outputs {gib(self.output_bytes)} "
        f"(aliased {gib(self.alias_bytes)}), temporaries {gib(self.temp_bytes)}",
        f"  per chip: total {gib(self.total_bytes)} of {gib(self.hbm_bytes)} HBM "
        f"({100 * self.total_bytes / self.hbm_bytes:.0f}%, headroom "
        f"{100 * (1 - self.total_bytes / self.hbm_bytes):.0f}%)",
        f"  FLOPs per step: {self.flops * self.chips:.3e} ({self.flops:.3e} per chip)",
        f"  step time at {100 * mfu:.0f}% MFU: {self.step_seconds(mfu):.3f} s "
        f"(peak {self.peak_flops / 1e12:.0f} TFLOP/s per chip)",
        f"  compile time: {self.compile_s:.1f} s"])


def compile_step(config, topology: str) -> list[Report]:
  """Compiles the update step of `config` for `topology`: one report per compiled step.

  'accumulate' compiles one step over all datasets, 'round_robin' one per dataset (as training
  does).
  """
  modules.import_modules(config)
  devices = topology_devices(topology)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  batches = abstract_batches(config, mesh)
  weights = {name: float(cfg.weight) for name, cfg in config.input.datasets.items()}
  setup = trainer.make_setup(config, kinds.get(config.model_name).model(config), mesh, weights)
  groups = ([tuple(batches)] if config.mixture_mode == "accumulate"
            else [(name,) for name in batches])
  reports = []
  for names in groups:
    start = time.perf_counter()
    args = (setup.abstract_state, setup.abstract_frozen, {n: batches[n] for n in names})
    compiled = setup.update.lower(*args).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    reports.append(Report(
        topology=topology_name(topology), chips=len(devices), mesh=dict(mesh.shape),
        datasets=names, argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes, alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        hbm_bytes=CHIPS[topology_name(topology).split(":")[0]][0] * GiB,
        flops=metrics_lib.step_flops(setup.update, *args, num_devices=len(devices)),
        peak_flops=metrics_lib.peak_flops(devices[0]),
        compile_s=seconds))
  return reports
