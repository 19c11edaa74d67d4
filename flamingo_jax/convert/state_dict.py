"""A peer's state dict (safetensors or torch), read without running pickled code."""
import os

import numpy as np

from flamingo_jax.convert import safetensors_io


def read(path: str) -> dict[str, np.ndarray]:
  """{key: float32/int array} from a safetensors file/directory or a torch `.pt` state dict.

  `.pt` files are read with `torch.load(weights_only=True)`, which never runs pickled code.
  OpenFlamingo training checkpoints ({'model_state_dict': ...}) and DDP's 'module.' prefix work.
  """
  if os.path.isdir(path) or path.endswith(".safetensors"):
    return safetensors_io.load(path)
  try:
    import torch  # pylint: disable=g-import-not-at-top  (a peer, needed only for .pt files)
  except ImportError as e:
    raise ImportError(f"Reading {path!r} needs torch; install it or re-save the checkpoint as "
                      "safetensors.") from e
  try:
    state = torch.load(path, weights_only=True, map_location="cpu")
  except Exception as e:  # pylint: disable=broad-except  (torch raises several kinds)
    raise ValueError(f"{path!r} cannot be read safely: torch.load(weights_only=True) refused it "
                     f"({type(e).__name__}: {e}). Re-save its state dict of tensors (or "
                     "safetensors) where it is trusted.") from e
  if not isinstance(state, dict):
    raise ValueError(f"{path!r} holds a {type(state).__name__}, expected a state dict.")
  state = state.get("model_state_dict", state)
  out = {}
  for key, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{path!r}: {key!r} is a {type(value).__name__}, expected a tensor; pass a "
                       "state dict (or an OpenFlamingo checkpoint with 'model_state_dict').")
    value = value.detach()
    out[key.removeprefix("module.")] = (
        value.float() if value.dtype == torch.bfloat16 else value).numpy()
  return out
