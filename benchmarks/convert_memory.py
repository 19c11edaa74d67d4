"""Peak host memory of `python -m flamingo_jax.convert hf` on a generated ~1 GB bf16 checkpoint.

Writes a random LLaMA-shaped Hugging Face checkpoint (config.json + model.safetensors, bfloat16,
with safetensors' numpy API: no torch) to a temporary directory, converts it in a subprocess with
the checkpoint's dtype and with --dtype=float32, and prints each run's peak RSS (the child's own
`ru_maxrss`, from os.wait4) as a multiple of the checkpoint's size. A Python process that imports
jax, flax and orbax already holds a few hundred MB, so that baseline is measured alone too, and
(peak - baseline) is shown per checkpoint byte and per byte of the converted params (the
checkpoint's elements in the output dtype: twice the checkpoint in float32). The target (issue
#24) is (peak - baseline) <= 1.3x the checkpoint when the dtype is kept. The load average (as
`uptime` shows it) is printed before and after: the machine may be shared.

python benchmarks/convert_memory.py             # ~1 GB
python benchmarks/convert_memory.py --gb=0.1    # quick look
"""
import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

_MB = 2**20
_BASELINE = "import jax, flax, orbax.checkpoint; jax.numpy.zeros(1).block_until_ready()"


def llama_config(gb: float) -> dict:
  """A LLaMA config (2048 wide, untied 32000-token tables) with as many layers as make ~gb GB
  of bfloat16."""
  dim, mlp, vocab = 2048, 5632, 32000
  per_layer, tables = 4 * dim * dim + 3 * dim * mlp + 2 * dim, 2 * vocab * dim + dim
  layers = max(1, round((gb * 1e9 / 2 - tables) / per_layer))
  return {"model_type": "llama", "vocab_size": vocab, "hidden_size": dim,
          "intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": 16,
          "num_key_value_heads": 16, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def write_checkpoint(directory: str, c: dict) -> None:
  """Writes config.json and model.safetensors (random bf16 weights)."""
  d, m = c["hidden_size"], c["intermediate_size"]
  shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,),
            "lm_head.weight": (c["vocab_size"], d)}
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
               p + "mlp.gate_proj.weight": (m, d), p + "mlp.up_proj.weight": (m, d),
               p + "mlp.down_proj.weight": (d, m)}
    shapes |= {p + f"self_attn.{n}_proj.weight": (d, d) for n in "qkvo"}
  rng = np.random.default_rng(0)
  tensors = {k: (0.02 * rng.standard_normal(s, np.float32)).astype(ml_dtypes.bfloat16)
             for k, s in shapes.items()}
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(c, f)
  safetensors.numpy.save_file(tensors, os.path.join(directory, "model.safetensors"),
                              metadata={"format": "pt"})


def peak_rss(args: list[str]) -> int:
  """Peak resident bytes of the subprocess `args` alone (Linux reports ru_maxrss in KiB), run on
  the CPU backend as a converter runs (no accelerator probing)."""
  proc = subprocess.Popen(args, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    raise subprocess.CalledProcessError(proc.returncode, args)
  return usage.ru_maxrss * 1024


def num_elements(file: str) -> int:
  """Elements of all tensors in a safetensors file, from its header."""
  with safetensors.safe_open(file, framework="numpy") as f:
    return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())


def load() -> str:
  """The load average, as `uptime` shows it (the machine may be shared)."""
  return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gb", type=float, default=1.0, help="Checkpoint size to generate, GB.")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, "hf")
    os.makedirs(src)
    c = llama_config(args.gb)
    # In a process of its own: a child forked from a parent that held the tensors would start
    # with the parent's resident memory, and ru_maxrss would count it.
    writer = multiprocessing.get_context("spawn").Process(target=write_checkpoint, args=(src, c))
    writer.start()
    writer.join()
    if writer.exitcode:
      raise RuntimeError(f"Writing the checkpoint failed (exit code {writer.exitcode}).")
    size = os.path.getsize(os.path.join(src, "model.safetensors"))
    elements = num_elements(os.path.join(src, "model.safetensors"))
    load_before = load()
    baseline = peak_rss([sys.executable, "-c", _BASELINE])
    rows = []
    for dtype in (None, "float32"):
      dst = os.path.join(tmp, f"out_{dtype}")
      rss = peak_rss([sys.executable, "-m", "flamingo_jax.convert", "hf", "--src", src, "--dst",
                      dst] + (["--dtype", dtype] if dtype else []))
      with open(os.path.join(dst, "lm_config.json")) as f:
        out_dtype = json.load(f)["param_dtype"]
      rows.append((dtype or "(checkpoint's)", out_dtype, elements * np.dtype(out_dtype).itemsize,
                   rss))
  print(f"{load_before} before, {load()} after.")
  print(f"LLaMA-shaped bf16 checkpoint: {c['num_hidden_layers']} layers, dim "
        f"{c['hidden_size']}, {size / _MB:.0f} MB; baseline (python + import jax, flax, orbax) "
        f"{baseline / _MB:.0f} MB peak RSS.\n")
  print("| --dtype | output dtype | checkpoint MB | params MB | peak RSS MB | peak / ckpt "
        "| (peak - baseline) / ckpt | (peak - baseline) / params |")
  print("|---|---|---:|---:|---:|---:|---:|---:|")
  for flag, out_dtype, params, rss in rows:
    print(f"| {flag} | {out_dtype} | {size / _MB:.0f} | {params / _MB:.0f} | {rss / _MB:.0f} "
          f"| {rss / size:.2f} | {(rss - baseline) / size:.2f} | {(rss - baseline) / params:.2f} |")


if __name__ == "__main__":
  main()
