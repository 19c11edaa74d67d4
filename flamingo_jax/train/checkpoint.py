"""Orbax checkpoints: the train state in `workdir/checkpoints`, and parameter trees on their own.

A step directory holds two items: 'state' (trainable params, optimizer state, step, RNG; arrays) and
'data' (the input iterator's state, JSON). Frozen backbones are never in it: they are parameter
trees written by `save_params` (converters do the same) and read at start by `load_params`. A
converted LM is a directory: its parameter tree in LM_PARAMS and its LMConfig as JSON in LM_CONFIG.
Loading never unpickles: arrays come from OCDBT/TensorStore, the rest is JSON.

A newest checkpoint that cannot be read is moved to `workdir/checkpoints_corrupt/` with a warning
and the previous one is used; nothing is deleted. One whose shapes differ from the model's is an
error naming the paths, and is left as it is.
"""
import dataclasses
import itertools
import json
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from flamingo_jax.models import lm as lm_lib

LM_PARAMS, LM_CONFIG = "params", "lm_config.json"  # In a converted LM's directory.


# Replica-parallel saving slices every replicated array with one compiled slice per shape: below
# 1 MiB per replica that costs more than it saves (seconds per checkpoint on CPU).
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=1 << 20),
    override=True)


class ShapeMismatchError(ValueError):
  """A checkpoint's tree does not fit the model's (a different config): never fall back silently."""


_CHUNK_BYTES = 16 << 20  # Of a params checkpoint's arrays: bounds what one write holds.


class SaveError(RuntimeError):
  """A checkpoint could not be written (disk or quota full, permissions): the run must stop."""


@dataclasses.dataclass(frozen=True, eq=False)
class _Taken:
  """A numpy leaf of `save_params(consume=True)`: popped from its dict when its write starts."""
  parent: dict
  key: Any
  size: int  # Orbax refuses empty arrays by their size.

  def take(self) -> np.ndarray:
    return self.parent.pop(self.key)


class _OneAtATimeNumpyHandler(ocp.type_handlers.NumpyHandler):
  """Writes host arrays in place (`save_params` returns when written, so none changes meanwhile),
  one after another and chunk by chunk: orbax's default copies every array and writes them all
  at once, 2.8x a converted checkpoint's size in host memory (issue #24). Stored as orbax's own
  (chunked) numpy arrays, so its default handlers read them."""

  def __init__(self):
    super().__init__(deepcopy_host_arrays=False)

  async def _background_serialize(self, values, infos, args):
    for value, info, arg in zip(values, infos, args):
      array = value.take() if isinstance(value, _Taken) else value
      arg = dataclasses.replace(arg, chunk_byte_size=arg.chunk_byte_size or _CHUNK_BYTES)
      await super()._background_serialize([array], [info], [arg])
      del array  # Freed (if taken) before the next one is taken.

  async def _open_and_write(self, value, tspec, ts_context):
    """One write per chunk: TensorStore holds a write's encoded chunks (and a contiguous copy of
    a transposed source) until the write is committed."""
    store = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
    chunk = store.chunk_layout.write_chunk.shape or ()  # None for a 0-d array.
    for start in itertools.product(*(range(0, n, c) for n, c in zip(value.shape, chunk))):
      box = tuple(slice(i, i + c) for i, c in zip(start, chunk))
      await store[box].write(value[box], can_reference_source_data_indefinitely=True)


def _params_checkpointer() -> ocp.Checkpointer:
  """Orbax's standard handlers, but numpy arrays go through `_OneAtATimeNumpyHandler`."""
  handlers = [(ty, ocp.type_handlers.get_type_handler(ty))
              for ty in ocp.type_handlers.supported_types()]
  one_at_a_time = _OneAtATimeNumpyHandler()
  registry = ocp.type_handlers.create_type_handler_registry(
      *handlers, (np.ndarray, one_at_a_time), (_Taken, one_at_a_time))
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))


def _taken(tree: Any) -> Any:
  """`tree` with the numpy arrays of its dicts as `_Taken` leaves (the rest as it is)."""
  if not isinstance(tree, dict):
    return tree
  return {k: _Taken(tree, k, v.size) if isinstance(v, np.ndarray) else _taken(v)
          for k, v in tree.items()}


def save_params(path: str, tree: Any, consume: bool = False) -> None:
  """Writes a parameter tree (e.g. a converted backbone) as an orbax checkpoint at `path`.

  Orbax writes it under a temporary name and renames it when complete, so a failed or killed
  save leaves nothing at `path`. Numpy arrays are written one at a time, in place; `consume` also
  removes each from `tree` once written (its dicts end empty), so host memory falls during the
  save instead of holding the whole tree to the end (converters, issue #24).
  """
  try:
    _params_checkpointer().save(epath.Path(path), args=ocp.args.PyTreeSave(
        _taken(tree) if consume else tree))
  except Exception as e:  # pylint: disable=broad-except  (whatever storage raised)
    raise SaveError(f"Writing the parameter checkpoint {path} failed ({type(e).__name__}: "
                    f"{str(e)[:1000]}); {path} is as it was before: a partial write stays under a "
                    "temporary name beside it, which the next save there replaces.") from e


def _leaves_by_path(tree: Any) -> dict[str, Any]:
  """{'a/0/mu/w': leaf}; a tuple or namedtuple gets the path of the list or dict orbax stores."""
  name = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
  return {"/".join(name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _suspect_files(path: epath.Path) -> str:
  """What is visibly wrong with the files of checkpoint item `path`, for error messages."""
  if not path.exists():
    return f"{path} does not exist"
  problems = [f"{f} is missing" for f in (path / "_METADATA", path / "manifest.ocdbt")
              if not f.exists()]
  files = [f for depth in ("*", "*/*", "*/*/*") for f in path.glob(depth)]  # OCDBT's depth.
  empty = sorted(str(f) for f in files if f.is_file() and f.stat().length == 0)
  problems += [f"{f} has 0 bytes" for f in empty[:5]]
  problems += [f"and {len(empty) - 5} more empty files"] if len(empty) > 5 else []
  return "; ".join(problems) or "no file is missing or empty (truncated or garbled data?)"


def stored_leaves(path: epath.PathLike) -> dict[str, Any]:
  """{'a/b/c': metadata with .shape} of the checkpoint at `path`, read without loading arrays."""
  path = epath.Path(path)
  metadata = ocp.StandardCheckpointer().metadata(path).item_metadata
  if metadata is None:
    raise ValueError(f"checkpoint {path} has no readable tree metadata (_METADATA)")
  return _leaves_by_path(metadata.tree)


def shape_problems(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
  """Every leaf missing, unexpected or differently shaped in `stored` ({path: leaf with .shape})."""
  problems = [f"{k}: missing in the checkpoint" for k in sorted(set(wanted) - set(stored))]
  problems += [f"{k}: in the checkpoint but not in the model"
               for k in sorted(set(stored) - set(wanted))]
  problems += [f"{k}: checkpoint {tuple(stored[k].shape)} != model {tuple(wanted[k].shape)}"
               for k in sorted(set(stored) & set(wanted))
               if tuple(stored[k].shape) != tuple(wanted[k].shape)]
  return problems


def check_tree(path: epath.PathLike, abstract: Any) -> None:
  """Raises ShapeMismatchError naming every missing, unexpected or differently shaped leaf."""
  problems = shape_problems(stored_leaves(path), _leaves_by_path(abstract))
  if problems:
    raise ShapeMismatchError(f"Checkpoint {path} does not match the model ({len(problems)} "
                             "problems; is it from another config?):\n  " + "\n  ".join(problems))


def load_params(path: str, abstract: Any) -> Any:
  """The tree at `path` with `abstract`'s structure, dtypes and shardings (ShapeDtypeStructs)."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"No parameter checkpoint at {path}.")
  check_tree(path, abstract)
  return ocp.StandardCheckpointer().restore(path, abstract)


def restore_leaves(path: epath.PathLike, abstract: Any) -> Any:
  """The leaves of `abstract` (ShapeDtypeStructs, part of the stored tree) with its dtypes and
  shardings; the checkpoint's other leaves are not read. Shapes are the caller's to check."""
  return ocp.PyTreeCheckpointer().restore(epath.Path(path), args=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True))


def read_lm_config(directory: epath.PathLike) -> lm_lib.LMConfig:
  """The LMConfig of the converted LM in `directory`."""
  return lm_lib.make_config(json.loads((epath.Path(directory) / LM_CONFIG).read_text()))


def saved_steps(workdir: str) -> list[int]:
  """The steps of workdir/checkpoints' complete (finalized) checkpoints; creates nothing."""
  directory = epath.Path(workdir) / "checkpoints"
  return ocp.utils.checkpoint_steps(directory) if directory.is_dir() else []


def make_manager(workdir: str, config) -> ocp.CheckpointManager:
  """Async manager under workdir/checkpoints: keeps the last `keep_last` and every `keep_every`."""
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=config.ckpt_every, max_to_keep=config.keep_last,
      keep_period=config.get("keep_every") or None, enable_async_checkpointing=config.ckpt_async,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", options=options,
                               item_names=("state", "data"))


def _save_error(manager: ocp.CheckpointManager, error: Exception) -> SaveError:
  return SaveError(
      f"Writing a checkpoint under {manager.directory} failed ({type(error).__name__}: "
      f"{str(error)[:1000]}). The checkpoints saved before it are intact (steps "
      f"{sorted(manager.all_steps())}); free space or fix the storage and re-run to resume.")


def save(manager: ocp.CheckpointManager, step: int, train_state: Any, data_state: dict,
         force: bool = False) -> bool:
  """Starts writing step `step` (async); a failure of this or the previous write is a SaveError."""
  logging.info("Checkpoint of step %d -> %s/%d", step, manager.directory, step)
  try:
    return manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state), data=ocp.args.JsonSave(data_state)),
                        force=force)
  except Exception as e:  # pylint: disable=broad-except  (whatever storage raised)
    raise _save_error(manager, e) from e


def finish(manager: ocp.CheckpointManager) -> None:
  """Waits for the last write and closes the manager; a failed write is a SaveError."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(manager, e) from e
  finally:
    manager.close()


class UnreadableCheckpointsError(RuntimeError):
  """Checkpoints exist but none can be read: starting over would lose all progress."""


def _quarantine(manager: ocp.CheckpointManager, step: int, error: Exception, why: str) -> None:
  src = epath.Path(manager.directory) / str(step)
  dst = epath.Path(manager.directory).parent / "checkpoints_corrupt" / str(step)
  while dst.exists():  # Never overwrite an earlier quarantined copy.
    dst = dst.with_name(dst.name + "_")
  logging.warning("Checkpoint %s cannot be read (%s: %s; files: %s); moving it to %s %s.", src,
                  type(error).__name__, error, _suspect_files(src / "state"), dst, why)
  if jax.process_index() == 0:
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dst)
  multihost_utils.sync_global_devices(f"quarantine_{step}")


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   start_over_if_unreadable: bool = False) -> tuple[Any, dict] | None:
  """(train state, data state) from the newest readable checkpoint, or None if there is none.

  Unreadable newer checkpoints are moved to checkpoints_corrupt/ once an older one has been read.
  When checkpoints exist and none can be read (a storage or permission fault hits them all the
  same way), nothing is moved and UnreadableCheckpointsError lists each one with its error, unless
  `start_over_if_unreadable` (config.start_over_if_unreadable) asks to move them all aside and
  start from step 0.
  """
  failures = {}
  for step in sorted(manager.all_steps(), reverse=True):
    item = epath.Path(manager.directory) / str(step) / "state"
    try:
      check_tree(item, abstract_state)
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except ShapeMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (any read failure: truncated, garbled)
      failures[step] = e
      continue
    for bad, error in failures.items():
      _quarantine(manager, bad, error, f"and resuming from step {step}")
    if failures:
      manager.reload()
    logging.info("Resuming from %s.", item.parent)
    return restored.state, dict(restored.data)
  if failures and not start_over_if_unreadable:
    raise UnreadableCheckpointsError(
        f"No checkpoint in {manager.directory} can be read, so resuming would lose all progress; "
        "nothing was moved or deleted:\n  " + "\n  ".join(
            f"step {step}: {type(e).__name__}: {e}" for step, e in failures.items()) +
        "\nFix the cause (storage, permissions) and re-run, or pass "
        "--config.start_over_if_unreadable=True to move them to checkpoints_corrupt/ and start "
        "from step 0.")
  for bad, error in failures.items():
    _quarantine(manager, bad, error, "and starting over (config.start_over_if_unreadable)")
  if failures:
    manager.reload()
  return None
