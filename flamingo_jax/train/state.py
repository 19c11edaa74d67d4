"""Parameter trees by path: flatten to 'a/b/c' keys, split into trainable/frozen, merge back.

The train state is a plain dict that orbax saves as is:
  {'step': int32 [], 'rng': uint32 [2] (for stochastic layers; none train yet),
   'params': trainable tree, 'opt_state': optax state}
Frozen parameters live beside it (loaded from their own checkpoints, never in the train state).
"""
from typing import Any, Callable, Iterable

from flax import traverse_util


def flat(tree: Any) -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  return traverse_util.flatten_dict(tree, sep="/")


def unflat(flat_tree: dict[str, Any]) -> dict:
  return traverse_util.unflatten_dict(flat_tree, sep="/")


def split(tree: Any, is_trainable: Callable[[str], bool]) -> tuple[dict, dict]:
  """(trainable, frozen) subtrees of a nested dict, by parameter path."""
  items = flat(tree)
  return (unflat({k: v for k, v in items.items() if is_trainable(k)}),
          unflat({k: v for k, v in items.items() if not is_trainable(k)}))


def merge(*trees: Any) -> dict:
  """The union of disjoint nested dicts (inverse of `split`)."""
  out = {}
  for tree in trees:
    out.update(flat(tree))
  return unflat(out)


def subtree(tree: Any, prefixes: Iterable[str]) -> dict:
  """The leaves of `tree` whose path starts with one of `prefixes`."""
  prefixes = tuple(prefixes)
  return unflat({k: v for k, v in flat(tree).items() if k.startswith(prefixes)})
