"""Reads safetensors checkpoints (a file or a directory of shards) into numpy; never unpickles.

`Checkpoint` reads one tensor at a time, on access, in its stored dtype (bfloat16 as ml_dtypes'
numpy type), so a converter holds one source tensor at a time rather than the whole checkpoint.
Each read opens and closes the file: a handle kept open would keep every page read mapped and
resident, as much memory as loading everything.
"""
from collections.abc import Iterator, Mapping
import json
import os

import ml_dtypes
import numpy as np
import safetensors

# safetensors' dtype names -> numpy dtypes.
_DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
           "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64,
           "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F32": np.float32, "F64": np.float64,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


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


class Checkpoint(Mapping[str, np.ndarray]):
  """{tensor name: array} of a .safetensors file or directory of shards, read lazily: listing
  names, `in`, `len` and `dtype` read only the headers; `[name]` reads that tensor."""

  def __init__(self, path: str):
    self.path = path
    self._file: dict[str, str] = {}
    self._dtype: dict[str, np.dtype] = {}
    for file in _shard_files(path) if os.path.isdir(path) else [path]:
      with safetensors.safe_open(file, framework="numpy") as f:
        names = list(f.keys())
        duplicates = sorted(set(names) & self._file.keys())
        if duplicates:
          raise ValueError(f"{file!r} repeats tensors of an earlier shard: {duplicates[:5]}.")
        for name in names:
          stored = f.get_slice(name).get_dtype()
          if stored not in _DTYPES:
            raise ValueError(f"{file!r}: tensor {name!r} has dtype {stored}, which numpy cannot "
                             f"hold; expected one of {sorted(_DTYPES)}.")
          self._file[name], self._dtype[name] = file, np.dtype(_DTYPES[stored])

  def dtype(self, name: str) -> np.dtype:
    """The stored dtype of tensor `name`, from the header."""
    return self._dtype[name]

  def __getitem__(self, name: str) -> np.ndarray:
    with safetensors.safe_open(self._file[name], framework="numpy") as f:
      return f.get_tensor(name)

  def __contains__(self, name: object) -> bool:
    return name in self._file

  def __iter__(self) -> Iterator[str]:
    return iter(self._file)

  def __len__(self) -> int:
    return len(self._file)


def load(path: str) -> dict[str, np.ndarray]:
  """Returns {tensor name: array} from a .safetensors file or a directory of shards, all in memory
  (`Checkpoint` reads them one by one instead)."""
  return dict(Checkpoint(path).items())
