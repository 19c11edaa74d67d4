"""The device mesh ('data', 'fsdp', 'model') and the logical-axis rules that place parameters on it.

Parameters carry logical axis names (models/layers.py); `config.sharding_rules` maps each name to a
mesh axis, a tuple of mesh axes, or None (replicated), MaxText style. Conflicts are errors, not
silent resolutions: a logical name with two rules, or one mesh axis used twice in a parameter's
spec.
"""
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from flamingo_jax.models import layers

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = layers.BATCH_AXES  # Activations: the batch axis is split over data and FSDP.


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """config.mesh (one entry per MESH_AXES; one may be -1 = fill) -> the concrete mesh shape."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES) or shape.count(-1) > 1 or any(s < 1 and s != -1 for s in shape):
    raise ValueError(f"config.mesh={shape}: expected {len(MESH_AXES)} sizes for axes {MESH_AXES}, "
                     "each >= 1 or a single -1 (fill with the remaining devices).")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"config.mesh={shape}: {known} does not divide the {num_devices} devices.")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if np.prod(shape) != num_devices:
    raise ValueError(f"config.mesh={shape} has {np.prod(shape)} devices; there are {num_devices}. "
                     "Use -1 on one axis to fill.")
  return shape


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh over `devices` (default: all devices; AOT compilation passes a TPU topology's)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(shape, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_rules(rules: Sequence[tuple[str, Any]]) -> dict[str, tuple[str, ...]]:
  """[(logical, mesh axes or None), ...] -> {logical: (mesh axes,)}; errors on conflicts."""
  out = {}
  for logical, axes in rules:
    if logical in out:
      raise ValueError(f"config.sharding_rules maps logical axis {logical!r} twice.")
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"config.sharding_rules[{logical!r}] = {axes}: unknown mesh axes "
                       f"{sorted(unknown)}; expected some of {MESH_AXES}.")
    out[logical] = axes
  return out


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], rules: dict, mesh: Mesh,
                    path: str = "") -> PartitionSpec:
  """A parameter's logical axis names -> its PartitionSpec on `mesh`.

  Names without a rule are replicated (logged); a dim that its mesh axes do not divide is replicated
  (logged), so small tables (e.g. 2 new-token rows) need no special rule.
  """
  spec, used = [], set()
  for name, dim in zip(names, shape):
    if name is not None and name not in rules:
      logging.log_first_n(logging.WARNING, "No sharding rule for logical axis %r (%s): replicated.",
                          10, name, path)
    axes = rules.get(name, ())
    if used & set(axes):
      raise ValueError(f"Parameter {path} {tuple(names)}: mesh axes {sorted(used & set(axes))} are "
                       "used by two of its logical axes; fix config.sharding_rules.")
    used |= set(axes)
    size = int(np.prod([mesh.shape[a] for a in axes]))
    if dim % size:
      logging.warning("Parameter %s: dim %d (%r) is not divisible by mesh axes %s: replicated.",
                      path, dim, name, axes)
      axes = ()
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*spec)


def param_shardings(boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree of boxed (nn.LogicallyPartitioned) arrays or ShapeDtypeStructs."""
  rules = check_rules(rules)

  def one(path, leaf):
    names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else (None,) * leaf.ndim
    value = nn.unbox(leaf)
    spec = logical_to_spec(names, value.shape, rules, mesh, jax.tree_util.keystr(path))
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(
      one, boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
