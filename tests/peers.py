"""Peer libraries (torch, torchvision) made importable here; shared by tests and benchmarks."""
import numpy as np


def patch_torchvision_ops():
  """Lets `import torchvision` work beside CPU torch (docs/PEERS.md).

  The only torchvision 0.28 wheel is a CUDA build whose compiled ops fail to load next to CPU torch;
  its import then dies registering fake kernels for `torchvision::nms`/`qnms`. Declaring the two
  schemas lets the import succeed; nms itself stays unavailable (no test needs it).
  """
  try:
    import torch
  except ImportError:
    return
  try:
    from torchvision import extension  # noqa: F401  (loads the compiled ops if they work)
    torch.ops.torchvision.nms  # pylint: disable=pointless-statement
    return
  except Exception:  # pylint: disable=broad-except
    pass
  lib = torch.library.Library("torchvision", "DEF")  # pylint: disable=unused-variable
  lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  globals()["_torchvision_lib"] = lib  # keep the registration alive


def state_of(module) -> dict:
  """A torch module's state dict as numpy arrays."""
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def rel_error(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs|: the parity tests' measure."""
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())
