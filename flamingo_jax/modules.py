"""`config.modules`: the modules a run imports first, so that what they register (TFDS datasets,
pp ops, eval tasks) is found by name, as big_vision's `pp_modules`. The core imports none of
them."""
import importlib


def import_modules(config) -> None:
  for name in config.get("modules", ()):
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ImportError(f"config.modules names {name!r}, which cannot be imported: {e}") from e
