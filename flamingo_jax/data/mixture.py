"""The training mixture: one batch per dataset per step, deterministic and exactly resumable.

Each dataset is a TFDS builder read through random access (`builder.as_data_source`, ArrayRecord
files), not a tf.data pipeline. Random access makes the input a pure function of the step:
  stream position p = step * batch_size + i  (i < batch_size, the global batch)
  record           = permutation_epoch(p // n)[p % n]   (a fresh seeded shuffle every epoch)
  example rng      = seeded by (seed, dataset, p)       (flips, jitter, caption choice, p_next)
so the iterator's whole state is `{'step': int}` (JSON), a resumed run sees exactly the batches an
uninterrupted one would, and host h of P computes only its slice [h * B/P, (h + 1) * B/P) of the
global batch. tf.data would need its own (non-JSON) iterator checkpoints or an O(steps) skip on
resume.

The per-example pp (Python and numpy) runs in the calling thread, in `num_workers` threads (which
overlap only where PIL and numpy release the GIL, and while XLA runs the step) or in
`worker_processes` spawned processes, which share no GIL with the trainer. Each worker process
unpickles the sources (a cached dataset's records too) and builds the pp functions once. With
either kind of worker a task is one worker's share of one dataset's host batch, and the next
step's tasks run while the current step trains. All three modes give the same batches bit
for bit: an example depends only on (seed, dataset, position). The pool is the standard library's,
not grain's (grain 0.2.18 would install cleanly): grain's multiprocess prefetch hands whole
elements to workers under its own iterator state, so keeping `{'step'}`, host slicing and these
error messages would take as much code around it as the pool takes, plus a dependency. Spawn, not
fork: the parent runs XLA threads.

TFDS builders are opened with file_format='array_record' and prepared if needed (as `tfds.load`
does), so the embedded demo datasets generate themselves locally on first use.
"""
import concurrent.futures
import functools
import multiprocessing
import pickle
import zlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flamingo_jax import modules as modules_lib
from flamingo_jax.data import pp
from flamingo_jax.data import tokenizer as tokenizer_lib

# One dataset's config: tfds_name, split, batch_size (global), pp, weight (λ, default 1), data_dir,
# cache (default False: True reads every record once into memory, for small datasets).
_FIELDS = {"tfds_name", "split", "batch_size", "pp", "weight", "data_dir", "cache"}
_REQUIRED = {"tfds_name", "split", "batch_size", "pp"}


def open_source(tfds_name: str, split: str, data_dir: str | None = None,
                name: str = "") -> Sequence[dict]:
  """A TFDS split as a random-access sequence of decoded examples (`name`: the mixture's, for
  errors)."""
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"config.input.datasets.{name or '<name>'}.tfds_name={tfds_name!r}: no such TFDS dataset "
        f"(data_dir={data_dir!r}). Use the name it was prepared under, and list its module in "
        "config.modules if a module registers it.") from e
  builder.download_and_prepare()
  return builder.as_data_source(split)


def _key(name: str) -> int:
  return zlib.crc32(name.encode())


@functools.lru_cache(maxsize=16)
def _permutation(num_records: int, seed: int, name: str, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, _key(name), 0, epoch]).permutation(num_records)


def record_indices(num_records: int, positions: np.ndarray, *, seed: int, name: str) -> np.ndarray:
  """Stream positions -> record indices: each epoch is a fresh seeded permutation of the records."""
  epochs, offsets = np.divmod(positions, num_records)
  return np.array([_permutation(num_records, seed, name, int(e))[o]
                   for e, o in zip(epochs, offsets)], np.int64)


class PPError(RuntimeError):
  """Reading or preprocessing one record failed; the message names the dataset and record."""


def host_records(num_records: int, *, step: int, batch_size: int, seed: int, name: str,
                 process_index: int = 0, process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(stream positions, record indices) of this host's slice of dataset `name`'s batch `step`."""
  if batch_size % process_count:
    raise ValueError(f"dataset {name!r}: batch_size={batch_size} is not divisible by "
                     f"process_count={process_count}.")
  if not num_records:
    raise ValueError(f"dataset {name!r} has no records.")
  per_host = batch_size // process_count
  positions = step * batch_size + process_index * per_host + np.arange(per_host)
  return positions, record_indices(num_records, positions, seed=seed, name=name)


def example(source: Sequence[dict], pp_fn, *, seed: int, name: str, position: int,
            record: int) -> dict[str, Any]:
  """Record `record` of `source` through `pp_fn`, its rng seeded by (seed, name, position)."""
  try:
    ex = dict(source[int(record)])
    ex["_rng"] = np.random.default_rng([seed, _key(name), 1, int(position)])
    return pp_fn(ex)
  except Exception as e:  # pylint: disable=broad-except  (any op or reader may fail)
    raise PPError(f"dataset {name!r}: record {int(record)} (stream position {int(position)}) "
                  f"failed: {type(e).__name__}: {e}") from e


def stack(examples: Sequence[dict[str, Any]], name: str) -> dict[str, np.ndarray]:
  """Examples -> a batch; every field must have one shape."""
  batch = {}
  for field in examples[0]:
    shapes = {np.shape(e.get(field)) for e in examples}
    if len(shapes) != 1:
      raise ValueError(f"dataset {name!r}: pp field {field!r} has shapes {sorted(shapes)} across "
                       "examples; the pp string must produce fixed shapes (resize_pad, max_len).")
    batch[field] = np.stack([e[field] for e in examples])
  return batch


def examples(source: Sequence[dict], pp_fn, *, seed: int, name: str, positions: np.ndarray,
             records: np.ndarray) -> list[dict[str, Any]]:
  """`example` for each (position, record): one task of a worker thread or process."""
  return [example(source, pp_fn, seed=seed, name=name, position=p, record=r)
          for p, r in zip(positions, records)]


def host_batch(source: Sequence[dict], pp_fn, *, step: int, batch_size: int, seed: int, name: str,
               process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
  """This host's slice of dataset `name`'s global batch at `step` (numpy, leading axis B/P)."""
  positions, records = host_records(len(source), step=step, batch_size=batch_size, seed=seed,
                                    name=name, process_index=process_index,
                                    process_count=process_count)
  return stack(examples(source, pp_fn, seed=seed, name=name, positions=positions,
                        records=records), name)


_WORKER = {}  # In a worker process: its sources, pp functions and seed (`_init_worker`).


def _init_worker(payload: bytes, modules: Sequence[str]) -> None:
  modules_lib.import_modules({"modules": modules})  # Registered pp ops and TFDS builders.
  datasets, sources, tokenizer, seed = pickle.loads(payload)
  if isinstance(tokenizer, str):
    tokenizer = tokenizer_lib.load_tokenizer(tokenizer)
  _WORKER.update(sources=sources, seed=seed,
                 pp={name: pp.build(cfg["pp"], tokenizer) for name, cfg in datasets.items()})


def _process_pool(count: int, init: tuple, modules: Sequence[str]
                  ) -> concurrent.futures.ProcessPoolExecutor:
  """`count` spawned workers, each set up by `_init_worker(pickled init, modules)`."""
  try:
    payload = pickle.dumps(init)
  except Exception as e:  # pylint: disable=broad-except  (pickle raises several types)
    raise ValueError(f"worker_processes={count}: the sources and tokenizer must pickle to reach "
                     f"the workers ({type(e).__name__}: {e}); pass the tokenizer as its path."
                     ) from e
  return concurrent.futures.ProcessPoolExecutor(
      count, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
      initargs=(payload, tuple(modules)))


def _worker_examples(name: str, positions: np.ndarray, records: np.ndarray) -> list[dict]:
  return examples(_WORKER["sources"][name], _WORKER["pp"][name], seed=_WORKER["seed"], name=name,
                  positions=positions, records=records)


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh,
              batch_axes: Sequence[str] = ("data", "fsdp")) -> dict[str, jax.Array]:
  """Host batches -> global jax.Arrays, batch axis sharded over `batch_axes` of `mesh`."""
  missing = set(batch_axes) - set(mesh.axis_names)
  if missing:
    raise ValueError(f"batch_axes {tuple(batch_axes)} name axes {sorted(missing)} that the mesh "
                     f"{tuple(mesh.axis_names)} lacks.")
  sharding = NamedSharding(mesh, PartitionSpec(tuple(batch_axes)))
  shards = int(np.prod([mesh.shape[a] for a in batch_axes]))
  out = {}
  for field, x in batch.items():
    global_b = x.shape[0] * jax.process_count()
    if global_b % shards:
      raise ValueError(f"global batch {global_b} (field {field!r}) is not divisible by the "
                       f"{shards} devices of mesh axes {tuple(batch_axes)}.")
    out[field] = jax.make_array_from_process_local_data(sharding, x)
  return out


def _check_config(datasets: Mapping[str, Mapping[str, Any]]) -> None:
  if not datasets:
    raise ValueError("the mixture has no datasets.")
  for name, cfg in datasets.items():
    keys = set(cfg.keys())
    if keys - _FIELDS or _REQUIRED - keys:
      raise ValueError(f"dataset {name!r}: fields {sorted(keys)}; expected {sorted(_REQUIRED)} and "
                       f"optionally {sorted(_FIELDS - _REQUIRED)}.")
    if cfg["batch_size"] < 1:
      raise ValueError(f"dataset {name!r}: batch_size={cfg['batch_size']}; expected >= 1.")


class Mixture:
  """Iterator of `{name: batch}`, one batch per dataset per step; state is `{'step': int}`.

  With worker processes, `close()` (or `with`) stops them; unreferenced, they stop on their own.
  """

  def __init__(self, datasets: Mapping[str, Mapping[str, Any]],
               sources: Mapping[str, Sequence[dict]], *,
               tokenizer: tokenizer_lib.Tokenizer | str | None, seed: int,
               mesh: Mesh | None = None, batch_axes: Sequence[str] = ("data", "fsdp"),
               process_index: int | None = None, process_count: int | None = None,
               num_workers: int = 0, worker_processes: int = 0, modules: Sequence[str] = ()):
    """See `make_mixture`; `sources` maps each dataset name to its random-access records."""
    _check_config(datasets)
    self.datasets = {name: {k: cfg[k] for k in cfg.keys()} for name, cfg in datasets.items()}
    self.weights = {name: float(cfg.get("weight", 1.0)) for name, cfg in datasets.items()}
    self._sources = sources
    loaded = tokenizer_lib.load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    # Built here also with worker processes: a bad pp string fails before any worker starts.
    self._pp = {name: pp.build(cfg["pp"], loaded) for name, cfg in datasets.items()}
    self._seed = seed
    self._mesh, self._batch_axes = mesh, tuple(batch_axes)
    self._process_index = jax.process_index() if process_index is None else process_index
    self._process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= self._process_index < self._process_count:
      raise ValueError(
          f"process_index={self._process_index} is outside [0, {self._process_count}).")
    self._pending = {}  # {step: its tasks}, submitted while the previous step trains.
    if worker_processes:
      self._executor = _process_pool(worker_processes, (self.datasets, sources, tokenizer, seed),
                                     modules)
      self._task, self._tasks_per_batch = _worker_examples, worker_processes
    elif num_workers > 0:
      self._executor = concurrent.futures.ThreadPoolExecutor(num_workers)
      self._task, self._tasks_per_batch = self._examples, num_workers
    else:
      self._executor = None
    self._step = 0

  def get_state(self) -> dict[str, int]:
    return {"step": self._step}

  def set_state(self, state: Mapping[str, int]) -> None:
    if set(state) != {"step"} or int(state["step"]) < 0:
      raise ValueError(f"mixture state {dict(state)!r}; expected {{'step': int >= 0}}.")
    self._step = int(state["step"])

  def close(self) -> None:
    """Stops the workers (threads or processes), dropping prefetched work."""
    if self._executor is not None:
      self._executor.shutdown(wait=True, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  def __iter__(self):
    return self

  def _examples(self, name: str, positions: np.ndarray, records: np.ndarray) -> list[dict]:
    return examples(self._sources[name], self._pp[name], seed=self._seed, name=name,
                    positions=positions, records=records)

  def _submit(self, step: int) -> dict[str, list[concurrent.futures.Future]]:
    """Each dataset's host batch `step` as one task per worker (thread or process)."""
    futures = {}
    for name, cfg in self.datasets.items():
      positions, records = host_records(
          len(self._sources[name]), step=step, batch_size=cfg["batch_size"], seed=self._seed,
          name=name, process_index=self._process_index, process_count=self._process_count)
      futures[name] = [self._executor.submit(self._task, name, p, r) for p, r in
                       zip(np.array_split(positions, self._tasks_per_batch),
                           np.array_split(records, self._tasks_per_batch)) if len(p)]
    return futures

  def _from_workers(self) -> dict[str, dict[str, np.ndarray]]:
    try:
      # Prefetched unless this is the first step or set_state moved (then that work is dropped).
      current = self._pending.pop(self._step, None) or self._submit(self._step)
      self._pending = {self._step + 1: self._submit(self._step + 1)}  # Runs while this trains.
      return {name: stack([e for f in futures for e in f.result()], name)
              for name, futures in current.items()}
    except concurrent.futures.process.BrokenProcessPool as e:
      raise RuntimeError("an input worker process died or failed to start (its error is logged "
                         f"above): {e}") from e

  def __next__(self) -> dict[str, dict[str, Any]]:
    if self._executor is not None:
      host = self._from_workers()
    else:
      host = {name: host_batch(
          self._sources[name], self._pp[name], step=self._step, batch_size=cfg["batch_size"],
          seed=self._seed, name=name, process_index=self._process_index,
          process_count=self._process_count)
              for name, cfg in self.datasets.items()}
    self._step += 1
    if self._mesh is None:
      return host
    return {name: to_global(batch, self._mesh, self._batch_axes) for name, batch in host.items()}


def make_mixture(datasets: Mapping[str, Mapping[str, Any]], *,
                 tokenizer: tokenizer_lib.Tokenizer | str | None, seed: int,
                 mesh: Mesh | None = None, batch_axes: Sequence[str] = ("data", "fsdp"),
                 process_index: int | None = None,
                 process_count: int | None = None, num_workers: int = 0,
                 worker_processes: int = 0, modules: Sequence[str] = (),
                 state: Mapping[str, int] | None = None) -> Mixture:
  """The mixture over TFDS datasets.

  Args:
    datasets: {name: {'tfds_name', 'split', 'batch_size' (global), 'pp', 'weight' (λ),
      'data_dir', 'cache'}}; the sequence length is the pp string's max_len.
    tokenizer: for the pp strings' tokenize ops: a Tokenizer or its path (worker processes need
      the path: a loaded Tokenizer does not pickle).
    seed: fixes the shuffle and every random pp op.
    mesh: when given, batches are global jax.Arrays sharded on `batch_axes`; numpy otherwise.
    batch_axes: mesh axes the batch axis is split over.
    process_index, process_count: this host and the host count (default: jax's).
    num_workers: threads running pp (0: in the calling thread); unused with worker_processes.
    worker_processes: spawned processes running pp (0: none); they import `modules` first.
    modules: config.modules, which register the TFDS builders and pp ops the workers need.
    state: a `get_state()` to resume from.
  """
  _check_config(datasets)
  opened = {}  # Datasets on the same split (e.g. one pairs split, two pp strings) share its source.
  sources = {}
  for name, cfg in datasets.items():
    key = (cfg["tfds_name"], cfg["split"], cfg.get("data_dir") or None, bool(cfg.get("cache")))
    if key not in opened:
      source = open_source(*key[:3], name)
      opened[key] = list(source) if key[3] else source
    sources[name] = opened[key]
  mixture = Mixture(datasets, sources, tokenizer=tokenizer, seed=seed, mesh=mesh,
                    batch_axes=batch_axes, process_index=process_index,
                    process_count=process_count, num_workers=num_workers,
                    worker_processes=worker_processes, modules=modules)
  if state is not None:
    mixture.set_state(state)
  return mixture
