"""Model FLOPs of a step, counted from its jaxpr (the MFU numerator).

XLA's `cost_analysis()` counts a while loop's body once, so it undercounts `nn.scan`-ned layers by
their number (and it counts remat recomputation, which MFU excludes). Counting the step's jaxpr
instead gives exact matmul and convolution FLOPs with each scan body counted `length` times:
forward and backward, for every component (vision encoder, resampler, xattn, LM), and only the
backward work that is really done (frozen weights get no weight gradients, stop_gradient parts no
backward at all). Elementwise work is left out, as in the usual MFU convention.
"""
import jax
import numpy as np


def _eqn_flops(eqn) -> float:
  if eqn.primitive.name == "dot_general":
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contract])
  if eqn.primitive.name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape  # Kernel; rhs_spec[0] is its output-feature axis.
    per_output = np.prod(rhs) / rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    return 2.0 * np.prod(eqn.outvars[0].aval.shape) * per_output
  return 0.0


def jaxpr_flops(jaxpr) -> float:
  """Matmul + convolution FLOPs of a (closed) jaxpr, scan bodies counted `length` times.

  Remat'd (checkpoint) bodies are counted as written, once; while-loop bodies once.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    total += _eqn_flops(eqn)
    reps = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          total += reps * jaxpr_flops(inner)
  return float(total)


def step_flops(fn, *args) -> float:
  """FLOPs of `fn(*args)` (args may be ShapeDtypeStructs: nothing runs or compiles)."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args))
