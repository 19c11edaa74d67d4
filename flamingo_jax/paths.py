"""Paths taken from a user, resolved once where they enter (CLIs, `train`, `evaluate`).

Orbax refuses relative checkpoint paths, and a relative path means something else once a process
changes directory, so every local path is made absolute (with `~` expanded) at the edge; URLs such
as `gs://bucket/run` are kept as they are.

Every file under a workdir goes through etils.epath, local and gs:// alike; orbax does the same
(its arrays through TensorStore's own GCS driver). For gs:// epath would pick TensorFlow's file
system whenever TF is installed (tfds needs it); we pin it to gcsfs, the fsspec standard, which
honours STORAGE_EMULATOR_HOST, so the test against a local GCS emulator runs the code a pod runs.
"""
import os
import re

import ml_collections

os.environ.setdefault("EPATH_USE_TF", "false")

# Config fields that hold paths; '*' matches every key at that level (each dataset).
CONFIG_PATH_FIELDS = ("vision_init", "lm_init", "init_from", "input.tokenizer",
                      "input.datasets.*.data_dir")

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path: os.PathLike | str) -> bool:
  """A URL such as gs://bucket/run: an object store, which has no appends, locks or local tools."""
  return bool(_URL.match(os.fspath(path)))


def resolve(path: str) -> str:
  """An absolute local path (`~` expanded), a URL unchanged, '' (not set) unchanged."""
  if not path or is_url(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def _resolve_field(node, keys: list[str]) -> None:
  head, rest = keys[0], keys[1:]
  children = list(node.keys()) if head == "*" else [head] if head in node else []
  for key in children:
    if rest:
      if isinstance(node[key], (dict, ml_collections.ConfigDict)):
        _resolve_field(node[key], rest)
    elif isinstance(node[key], str):
      node[key] = resolve(node[key])


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with every field of CONFIG_PATH_FIELDS that it has resolved."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for field in CONFIG_PATH_FIELDS:
      _resolve_field(config, field.split("."))
  return config
