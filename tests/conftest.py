"""Test setup: 8 virtual CPU devices for sharding tests, offline peers, and torchvision next to CPU torch."""
import os

# Must happen before jax initialises its backends.
# Fast compiles: tests run many small programs once each, so XLA's expensive passes cost more
# than they save (about 3x on the tiny models).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _patch_torchvision_ops():
  """Lets `import torchvision` work beside CPU torch (see ../shared/PEERS.md).

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


_patch_torchvision_ops()
