"""Fills a parameter tree from a checkpoint, all or nothing: the one check every converter uses.

A spec maps each parameter ('/'-joined path) to (checkpoint key or keys, fn(*arrays) -> value).
Shapes come from abstract params (`jax.eval_shape`), so nothing is allocated on devices, and one
ValueError lists every parameter not filled, every checkpoint key not used and every shape
mismatch: never a silent partial load.

It reads the checkpoint one parameter's keys at a time (`state[key]`) and keeps only converted
values, so with a lazy `state` (`safetensors_io.Checkpoint`) the checkpoint is never held twice.
"""
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

from flax import traverse_util
import numpy as np

Spec = Mapping[str, tuple[str | Sequence[str], Callable[..., np.ndarray]]]


def fill(spec: Spec, state: Mapping[str, Any], abstract: Mapping[str, Any], what: str, *,
         fit: Callable[[np.ndarray, tuple[int, ...], str], np.ndarray] = lambda v, shape, name: v,
         ignore: Sequence[str | re.Pattern] = (), used: Iterable[str] = (),
         problems: Sequence[str] = (), hints: Mapping[str, str] | None = None,
         put: Callable[[str, np.ndarray], None] | None = None) -> dict:
  """Nested numpy params shaped like `abstract` (nested, or flat with '/'-joined keys).

  what: the checkpoint, named in the error's first line.
  fit(value, shape, name): the value reshaped for its parameter (a mismatch keeps its shape).
  ignore: regexes of checkpoint keys that need no parameter; used: keys accounted for elsewhere.
  problems: more lines for the error ("inconsistencies"). hints: {regex: line} added to the error
  when the regex matches the line of a parameter not filled or of a key not used.
  put(name, value): receives each value instead of the returned tree (then empty), so that a
  caller can copy it into place (e.g. a preallocated stack of layers) without a second copy.
  """
  params, missing, mismatched, used = {}, [], [], set(used)
  for name, struct in traverse_util.flatten_dict(abstract, sep="/").items():
    if name not in spec:
      missing.append(f"{name} (nothing in the checkpoint converts to it)")
      continue
    keys, fn = spec[name]
    keys = [keys] if isinstance(keys, str) else keys
    absent = [k for k in keys if k not in state]
    if absent:
      missing.append(f"{name} (checkpoint key {', '.join(absent)})")
      continue
    used.update(keys)
    arrays = [np.asarray(state[k]) for k in keys]
    try:
      value = fit(fn(*arrays), struct.shape, name)
    except ValueError:  # A fused tensor that does not split into the expected parts.
      value = None
    if value is None or value.shape != struct.shape:
      got = ", ".join(f"{k} {a.shape}" for k, a in zip(keys, arrays)) or np.shape(value)
      mismatched.append(f"{got} -> {name} expects {struct.shape}")
      continue
    value = value.astype(struct.dtype, copy=False)
    if put is None:
      params[name] = value
    else:
      put(name, value)
    del arrays, value  # Before the next key's read.
  unused = sorted(k for k in state if k not in used and not any(re.search(p, k) for p in ignore))
  if missing or unused or mismatched or problems:
    lines = [f"{what} does not match the model."]
    for title, items in (("model parameters not filled", missing),
                         ("checkpoint keys not used", unused), ("shape mismatches", mismatched),
                         ("inconsistencies", problems)):
      if items:
        lines += [f"{len(items)} {title}:"] + [f"  {item}" for item in items]
    lines += [hint for p, hint in (hints or {}).items()
              if any(re.search(p, line) for line in missing + unused)]
    raise ValueError("\n".join(lines))
  return traverse_util.unflatten_dict(params, sep="/")


def flat_params(params: Mapping[str, Any], abstract: Mapping[str, Any], what: str
                ) -> dict[str, np.ndarray]:
  """{'/'-joined path: array} of `params`, checked against `abstract` (nested, with .shape) before
  an export: one ValueError names every missing, unexpected and wrongly shaped parameter."""
  flat = {p: np.asarray(x) for p, x in traverse_util.flatten_dict(
      dict(params), sep="/").items()}
  shapes = {p: tuple(s.shape) for p, s in traverse_util.flatten_dict(
      dict(abstract), sep="/").items()}
  missing, extra = sorted(shapes.keys() - flat.keys()), sorted(flat.keys() - shapes.keys())
  wrong = [f"{p} {flat[p].shape} (expected {s})" for p, s in shapes.items()
           if p in flat and flat[p].shape != s]
  if missing or extra or wrong:
    raise ValueError(f"params do not match the {what}: missing {missing}, unexpected {extra}, "
                     f"wrong shapes {wrong}.")
  return flat
