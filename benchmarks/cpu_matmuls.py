"""Would our train step or decoding be faster with Eigen's matmuls than with YNNPACK's on a CPU?

XLA:CPU hands matmuls to YNNPACK by default; the compiler option
`xla_cpu_experimental_ynn_fusion_type=''` leaves them to Eigen. First the matmuls alone: a
while loop of 32 steps, each a batch-4 activation through 8 layers' MLP-shaped weights (D x F,
F x D; speed.py's small LM, 45 MB: more than the cache), in GB/s of weights read. Then speed.py's
train step and greedy generation (1 and 32 new tokens; rolled and unrolled layers) both
ways at speed.py's base grid point (the first value of its --vocab, --every, --seq and --media)
and times them interleaved in one process: separate runs on a shared 2-core machine differ by
more than the effect. A decoding step is speed.decoding_step_ms (32-token call - 1-token call) / 31.

python benchmarks/cpu_matmuls.py
python benchmarks/cpu_matmuls.py --tied  # The LM's head tied to its input embeddings.
"""
import dataclasses
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import speed

_REPS = flags.DEFINE_integer("cpu_matmul_reps", 9, "Interleaved timed repetitions (medians).")
_TIED = flags.DEFINE_bool("tied", False, "The base point's LM with its head tied to the input "
                          "embeddings (the same tables; its own head dropped).")

LIBRARIES = {"YNNPACK (XLA's default)": {"xla_cpu_experimental_ynn_fusion_type":
                                         "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
             "Eigen": {"xla_cpu_experimental_ynn_fusion_type": ""}}


def matmul_loop_gbps(size: speed.Size, options, reps: int) -> float:
  """GB/s of weights read by a decoding-shaped loop of MLP matmuls compiled with `options`."""
  batch, layers, dim, hidden, steps = size.batch, size.layers, size.dim, size.mlp, size.new_tokens
  rng = np.random.default_rng(0)
  wi, wo = (jnp.asarray(rng.standard_normal((layers, *shape), np.float32) * 0.02)
            for shape in ((dim, hidden), (hidden, dim)))
  wi, wo = list(wi), list(wo)  # One array per layer: no slicing in the loop.

  def loop(wi, wo, x):
    def body(carry):
      t, x = carry
      for a, b in zip(wi, wo):
        x = jnp.tanh(jnp.tanh(x @ a) @ b)
      return t + 1, x
    return jax.lax.while_loop(lambda c: c[0] < steps, body, (0, x))[1]

  compiled = jax.jit(loop).lower(wi, wo, jnp.ones((batch, dim))).compile(options)
  x = jnp.ones((batch, dim))
  seconds = speed.median_seconds({"loop": lambda: jax.block_until_ready(compiled(wi, wo, x))},
                                 reps, warmup=1)["loop"]
  return 2 * layers * dim * hidden * 4 * steps / seconds / 1e9


def main(argv):
  del argv
  size, model, params, features = speed.base_point()
  if _TIED.value:
    model = model.clone(lm=dataclasses.replace(model.lm, tied_embeddings=True))
    params = dict(params, lm={k: v for k, v in params["lm"].items()
                              if k not in ("lm_head", "new_lm_head")})
  train_tokens = speed.tokens_for(size, size.seq, seed=1)
  prompt = speed.tokens_for(size, size.prompt, seed=2)
  fns = {}
  for unroll in (False, True):
    m = model.clone(lm=dataclasses.replace(model.lm, unroll_layers=unroll))
    for library, options in LIBRARIES.items():
      fns["train step s", unroll, library] = speed.ours_train(
          m, params, features, train_tokens, compiler_options=options)[0]
      for new in (1, size.new_tokens):
        fns[new, unroll, library] = speed.ours_generate(m, params, features, prompt, new,
                                                        compiler_options=options)[0]
  seconds = speed.median_seconds(fns, _REPS.value, warmup=1)
  gbps = {library: matmul_loop_gbps(size, options, _REPS.value)
          for library, options in LIBRARIES.items()}
  rows = {"train step s": lambda u, l: seconds["train step s", u, l],
          "generation, 1 token, ms": lambda u, l: seconds[1, u, l] * 1e3,
          f"generation, {size.new_tokens} tokens, ms": (
              lambda u, l: seconds[size.new_tokens, u, l] * 1e3),
          "decoding step ms": lambda u, l: speed.decoding_step_ms(
              seconds[1, u, l], seconds[size.new_tokens, u, l], size.new_tokens)}
  ynn, eigen = LIBRARIES
  tied = ", the head tied to the input embeddings" if _TIED.value else ""
  lines = [f"{size.label()}{tied}, 1-minute load average {os.getloadavg()[0]:.2f}, medians of "
           f"{_REPS.value}. MLP matmuls alone: "
           + ", ".join(f"{library} {v:.1f} GB/s" for library, v in gbps.items()) + ".",
           "", f"| measure | layers | {ynn} | {eigen} | Eigen / YNNPACK |",
           "|---|---|---:|---:|---:|"]
  for measure, value in rows.items():
    for unroll in (False, True):
      a, b = value(unroll, ynn), value(unroll, eigen)
      lines.append(f"| {measure} | {'unrolled' if unroll else 'rolled scan'} | {a:.3f} | "
                   f"{b:.3f} | {b / a:.2f} |")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
