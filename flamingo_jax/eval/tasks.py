"""Few-shot eval tasks found by name, as big_vision finds its evaluators.

`config.eval.tasks` names them; a module registers each with `@tasks.register('name')`, and
`config.modules` lists the modules to import first (the demo's `flamingo_jax.demo` registers its
shapes tasks). A task is `fn(config, model, params, tokenizer) -> {'<metric>/<k>shot': value, ...}`.
"""
from typing import Callable

Task = Callable[..., dict[str, float]]
_TASKS: dict[str, Task] = {}


def register(name: str) -> Callable[[Task], Task]:
  def add(fn: Task) -> Task:
    if name in _TASKS and _TASKS[name] is not fn:
      raise ValueError(f"Eval task {name!r} is registered twice ({_TASKS[name].__module__} and "
                       f"{fn.__module__}).")
    _TASKS[name] = fn
    return fn
  return add


def get(name: str) -> Task:
  if name not in _TASKS:
    raise ValueError(f"config.eval.tasks names {name!r}, which no imported module registers; known "
                     f"tasks: {sorted(_TASKS)}. List the module that registers it in "
                     "config.modules.")
  return _TASKS[name]
