"""Eval tasks found by name, as big_vision finds its evaluators.

`config.evals` names the runs: `{name: {type: task, every_steps?, ...the task's own fields}}`. A
module registers each task type with `@tasks.register('type')`, and `config.modules` lists the
modules to import first (the demo's `flamingo_jax.demo` registers its shapes tasks, benchmarks.py
the published benchmarks). A task is `fn(task, ctx) -> {'<metric>/<k>shot': value, ...}`: `task`
is its `config.evals` entry, `ctx` the model and what every task needs (`Context`). A task may
register a `check(task, where)` too, which raises on bad fields or missing files: evaluation and
training call it for every run before computing anything.
"""
import dataclasses
from typing import Any, Callable

import numpy as np

Task = Callable[..., dict[str, float]]
Check = Callable[[Any, str], None]
_TASKS: dict[str, Task] = {}
_CHECKS: dict[str, Check] = {}


@dataclasses.dataclass(frozen=True)
class Context:
  """What a task evaluates and with what.

  model/params: the Flamingo and all its parameters; tokenizer: the run's; preprocess: uint8
  images or frames [..., H, W, 3] -> the model's pixels [..., S, S, 3] (the run's image pp);
  cache_dir: where tasks may keep what they compute once per model (e.g. RICES features), or None;
  config: the whole run config; predictions_dir: where tasks write each query's prediction (to
  inspect, or submit to a benchmark's server), or None.
  """
  model: Any
  params: Any
  tokenizer: Any
  preprocess: Callable[[np.ndarray], np.ndarray]
  cache_dir: str | None
  config: Any
  predictions_dir: str | None = None


def register(name: str, check: Check | None = None) -> Callable[[Task], Task]:
  def add(fn: Task) -> Task:
    if name in _TASKS and _TASKS[name] is not fn:
      raise ValueError(f"Eval task {name!r} is registered twice ({_TASKS[name].__module__} and "
                       f"{fn.__module__}).")
    _TASKS[name] = fn
    if check is not None:
      _CHECKS[name] = check
    return fn
  return add


def get(name: str, where: str = "type") -> Task:
  if name not in _TASKS:
    raise ValueError(f"{where} names {name!r}, which no imported module registers; known "
                     f"tasks: {sorted(_TASKS)}. List the module that registers it in "
                     "config.modules.")
  return _TASKS[name]


def check(task, where: str) -> None:
  """Raises on a run (`where`: e.g. 'config.evals.coco') whose type is unknown or whose own check
  fails."""
  if not task.get("type"):
    raise ValueError(f"{where}.type is missing; expected a task name, e.g. 'coco' (known: "
                     f"{sorted(_TASKS)}).")
  get(task.type, f"{where}.type")
  if task.type in _CHECKS:
    _CHECKS[task.type](task, where)
