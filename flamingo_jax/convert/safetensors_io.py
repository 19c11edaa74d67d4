"""Reads safetensors checkpoints (a file or a directory of shards) into numpy; never unpickles."""
import json
import os

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so bf16 checkpoints load)
import numpy as np
import safetensors.numpy


def _shard_files(directory: str) -> list[str]:
  """The shards a `*.safetensors.index.json` names (if there is one), else every *.safetensors."""
  names = os.listdir(directory)
  indices = [n for n in names if n.endswith(".safetensors.index.json")]
  if len(indices) > 1:
    raise ValueError(f"{directory!r} holds several shard indices {sorted(indices)}; keep one.")
  if indices:
    with open(os.path.join(directory, indices[0])) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    missing = [f for f in files if f not in names]
    if missing:
      raise ValueError(f"{indices[0]} in {directory!r} names shards that are not there: {missing}.")
  else:
    files = sorted(n for n in names if n.endswith(".safetensors"))
  if not files:
    raise ValueError(f"path: no *.safetensors files in directory {directory!r}.")
  return [os.path.join(directory, f) for f in files]


def load(path: str) -> dict[str, np.ndarray]:
  """Returns {tensor name: array} from a .safetensors file or a directory of shards."""
  files = _shard_files(path) if os.path.isdir(path) else [path]
  tensors = {}
  for file in files:
    shard = safetensors.numpy.load_file(file)
    duplicates = sorted(tensors.keys() & shard.keys())
    if duplicates:
      raise ValueError(f"{file!r} repeats tensors of an earlier shard: {duplicates[:5]}.")
    tensors.update(shard)
  return tensors
