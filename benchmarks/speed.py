"""Speed of flamingo_jax beside OpenFlamingo (PyTorch) on this machine's CPU, in one run.

Both sides are the same tiny/small OpenFlamingo (CLIP ViT → resampler → LLaMA-style HF LM with
gated xattn blocks), built offline with random weights and converted into ours
(`convert/open_flamingo.py`), in float32. Vision is excluded from both: OpenFlamingo's CLIP ViT
runs once and both sides get its patch features (ours through `features=`, theirs through a
stand-in for `vision_encoder`).

Measured (medians over --reps interleaved repetitions, after --warmup untimed calls):
  train step  forward + backward + AdamW on resampler, xattn and new token rows (LM frozen): our
              `trainer.make_update_step` with `optim.make_optimizer`, vs OpenFlamingo's
              `Flamingo.forward` + `torch.optim.AdamW` as its training loop runs it (embedding
              gradients masked to the new rows, global-norm clip 1).
  generation  greedy, KV-cached: `decode.greedy_search` vs `Flamingo.generate`, max_new_tokens new
              tokens each, no early stop (ours: no stop ids; theirs: min_new_tokens).
  FLOP/s      matmul FLOPs of the train step, counted on its jaxpr (scan bodies × length; XLA's
              cost analysis, shown beside it, counts a scanned layer stack's body once), / its
              median time, as a fraction of a float32 `jnp.dot` of Size.matmul² timed interleaved
              with the train steps (torch.mm beside it).
  compile     first-step compile time (lower + compile) of the train step and of decoding.

python benchmarks/speed.py --sizes=tiny,small --reps=7
python benchmarks/speed.py --sizes=tiny --reps=1 --warmup=1 --results=  # quick look, no file
"""
import dataclasses
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from tests import peers
peers.patch_torchvision_ops()  # Before transformers/open_clip import torchvision.
import open_clip
from open_flamingo.src import flamingo as of_flamingo
from open_flamingo.src import flamingo_lm
from open_flamingo.src import utils as of_utils
import torch
import transformers

from flamingo_jax.configs import common
from flamingo_jax.convert import open_flamingo
from flamingo_jax.eval import decode
from flamingo_jax.models import lm as lm_lib
from flamingo_jax.train import flops as flops_lib
from flamingo_jax.train import optim
from flamingo_jax.train import state as state_lib
from flamingo_jax.train import trainer

_SIZES = flags.DEFINE_list("sizes", ["tiny", "small"], "Sizes to run (keys of SIZES).")
_REPS = flags.DEFINE_integer("reps", 7, "Timed repetitions per measurement (medians).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls before timing.")
_THREADS = flags.DEFINE_integer("threads", 0, "torch threads (0: os.cpu_count(), as XLA uses).")
_RESULTS = flags.DEFINE_string("results", "benchmarks/RESULTS.md", "Markdown output ('' = none).")


@dataclasses.dataclass(frozen=True)
class Size:
  """One OpenFlamingo architecture and workload (LM: LLaMA, untied, MHA)."""
  vocab: int
  dim: int
  layers: int
  heads: int
  mlp: int
  every: int  # cross_attn_every_n_layers
  vis_dim: int  # CLIP width = resampler width (OpenFlamingo: 6 layers, 8 heads × 64, 64 latents).
  image: int
  patch: int
  media: int  # Images per sequence.
  batch: int
  seq: int  # Train sequence length.
  prompt: int  # Generation prompt length.
  new_tokens: int
  matmul: int  # Side of the square matmul that measures the peak.


SIZES = {
    "tiny": Size(vocab=64, dim=32, layers=4, heads=4, mlp=48, every=2, vis_dim=32, image=16,
                 patch=8, media=2, batch=2, seq=32, prompt=16, new_tokens=8, matmul=512),
    "small": Size(vocab=8192, dim=512, layers=8, heads=8, mlp=1376, every=2, vis_dim=512,
                  image=64, patch=8, media=2, batch=4, seq=256, prompt=64, new_tokens=32,
                  matmul=2048),
}
MEASURES = ("train step (s)", "train tokens/s", "generation tokens/s",
            "train GFLOP/step (jaxpr matmuls)", "train GFLOP/step (XLA cost analysis)",
            "achieved GFLOP/s", "f32 matmul peak GFLOP/s (jnp.dot / torch.mm)",
            "fraction of matmul peak", "compile: train step (s)", "compile: decoding (s)")


def median_seconds(fns: dict[str, Callable[[], object]], reps: int, warmup: int
                   ) -> dict[str, float]:
  """Median wall time of each blocking fn; repetitions interleave the fns (same machine load)."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def build(size: Size, workdir: str):
  """(OpenFlamingo model, our model, our params, CLIP features [B, N, 1, S, C] as torch)."""
  torch.manual_seed(0)
  clip = open_clip.CLIP(
      embed_dim=16, vision_cfg=dict(layers=1, width=size.vis_dim,
                                    head_width=min(64, size.vis_dim),
                                    patch_size=size.patch, image_size=size.image),
      text_cfg=dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1))
  clip.visual.output_tokens = True
  lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=size.vocab, hidden_size=size.dim, intermediate_size=size.mlp,
      num_hidden_layers=size.layers, num_attention_heads=size.heads,
      max_position_embeddings=max(size.seq, size.prompt + size.new_tokens),
      tie_word_embeddings=False))
  lm.save_pretrained(os.path.join(workdir, "lm"))
  of_utils.extend_instance(lm, flamingo_lm.FlamingoLMMixin)
  lm.set_decoder_layers_attr_name("model.layers")
  lm.resize_token_embeddings(size.vocab + 2)  # <|endofchunk|> = vocab, <image> = vocab + 1.
  theirs = of_flamingo.Flamingo(clip, lm, eoc_token_id=size.vocab, media_token_id=size.vocab + 1,
                                vis_dim=size.vis_dim, cross_attn_every_n_layers=size.every)
  with torch.no_grad():  # Open gates, so the xattn blocks matter (as after training).
    for name, p in theirs.named_parameters():
      if name.endswith(("attn_gate", "ff_gate")):
        p.fill_(0.5)
  torch.save(theirs.state_dict(), os.path.join(workdir, "checkpoint.pt"))
  ours, params = open_flamingo.load(os.path.join(workdir, "checkpoint.pt"),
                                    os.path.join(workdir, "lm"), resampler_heads=8, xattn_heads=8)
  images = torch.randn(size.batch * size.media, 3, size.image, size.image)
  with torch.no_grad():
    features = theirs.vision_encoder(images)[1]  # [B·N, S, C]
  features = features.reshape(size.batch, size.media, 1, *features.shape[1:])
  theirs.vision_encoder = Features(features)
  return theirs, ours, params, features


class Features(torch.nn.Module):
  """Stands in for OpenFlamingo's CLIP ViT: returns the precomputed patch features [B·N, S, C]."""

  def __init__(self, features):
    super().__init__()
    self.features = features.flatten(0, 2)

  def forward(self, x):
    return None, self.features[:x.shape[0]]


def tokens_for(size: Size, length: int, seed: int) -> np.ndarray:
  """[B, length] ids: text with `media` <image> tokens spread out, each followed by text."""
  tokens = np.random.RandomState(seed).randint(0, size.vocab, (size.batch, length)).astype(np.int32)
  tokens[:, np.linspace(0, length - 1, size.media + 1).astype(int)[:-1]] = size.vocab + 1
  return tokens


def ours_train(model, params, features: np.ndarray, tokens: np.ndarray):
  """(step fn, compile seconds, (XLA, jaxpr) FLOPs per step) of our real update step."""
  config = common.training(total_steps=1000)
  rules = optim.param_rules(params, config.schedule)
  tx, _ = optim.make_optimizer(config, rules)
  trainable, frozen = state_lib.split(params, optim.trainable_paths(rules).__contains__)
  apply_fn = lambda p, b: model.apply({"params": p}, None, b["tokens"], b["media_idx"],
                                      features=b["features"])
  update = jax.jit(trainer.make_update_step(apply_fn, tx, {"m3w": 1.0}, config.microbatches),
                   donate_argnums=0)
  batches = {"m3w": {"tokens": tokens, "features": features,
                     "media_idx": np.cumsum(tokens == model.lm.vocab_size + 1, 1, dtype=np.int32),
                     "loss_mask": np.ones(tokens.shape, np.float32)}}
  batches, frozen = jax.device_put((batches, frozen))
  state = {"train": {"step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(0),
                     "params": trainable, "opt_state": tx.init(trainable)}}
  start = time.perf_counter()
  compiled = update.lower(state["train"], frozen, batches).compile()
  compile_s = time.perf_counter() - start

  def step():
    state["train"], measured = compiled(state["train"], frozen, batches)
    jax.block_until_ready(measured)

  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return step, compile_s, (float(analysis["flops"]),
                           flops_lib.step_flops(update, state["train"], frozen, batches))


def theirs_train(theirs, tokens: np.ndarray, vocab: int):
  """OpenFlamingo's training step (its repository's train/train_utils.py) on the same batch."""
  theirs.train().requires_grad_(False)
  theirs.perceiver.requires_grad_(True)  # As open_flamingo/src/factory.py.
  theirs.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
  embed = theirs.lang_encoder.get_input_embeddings()
  embed.requires_grad_(True)
  trainable = [p for p in theirs.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1)
  lang_x = torch.from_numpy(tokens).long()
  vision_x = torch.zeros(tokens.shape[0], theirs.vision_encoder.features.shape[0] //
                         tokens.shape[0], 1, 1, 1, 1)

  def step():
    loss = theirs(vision_x, lang_x, attention_mask=torch.ones_like(lang_x), labels=lang_x).loss
    loss.backward()
    embed.weight.grad[:vocab] = 0  # Only <|endofchunk|> and <image> rows learn.
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

  return step


def ours_generate(model, params, features: np.ndarray, tokens: np.ndarray, new_tokens: int):
  """(generate fn, compile seconds): resampler + `decode.greedy_search`, no stop ids."""
  lm = lm_lib.LM(model.lm, decode=True)
  resample = jax.jit(lambda p, f: model.apply(
      {"params": p}, f, method=lambda module, x: module.visual_connector(x)))
  media_idx = np.cumsum(tokens == model.lm.vocab_size + 1, 1, dtype=np.int32)
  lengths = np.full(tokens.shape[0], tokens.shape[1], np.int32)
  features, tokens, params = jax.device_put((features, tokens, params))
  no_stop = jnp.array([-1], jnp.int32)

  def generate():
    visual = resample(params, features)
    out, _ = decode.greedy_search(lm, params["lm"], visual, tokens, media_idx, lengths, no_stop,
                                  0, max_new_tokens=new_tokens)
    return jax.block_until_ready(out)

  start = time.perf_counter()
  generate()
  return generate, time.perf_counter() - start


def theirs_generate(theirs, tokens: np.ndarray, new_tokens: int):
  """OpenFlamingo's `Flamingo.generate`, greedy, exactly new_tokens per row."""
  theirs.eval()
  lang_x = torch.from_numpy(tokens).long()
  vision_x = torch.zeros(tokens.shape[0], theirs.vision_encoder.features.shape[0] //
                         tokens.shape[0], 1, 1, 1, 1)

  def generate():
    with torch.inference_mode():
      return theirs.generate(vision_x, lang_x, attention_mask=torch.ones_like(lang_x),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=1,
                             do_sample=False, pad_token_id=0)

  return generate


def matmuls(n: int) -> dict[str, Callable[[], object]]:
  """n×n float32 matmuls (the peak): jitted jnp.dot and torch.mm, blocking."""
  a = np.random.RandomState(0).randn(n, n).astype(np.float32)
  dot, x, t = jax.jit(jnp.dot), jnp.asarray(a), torch.from_numpy(a)
  return {"dot": lambda: dot(x, x).block_until_ready(), "mm": lambda: torch.mm(t, t)}


def run(size_name: str, reps: int, warmup: int) -> dict[str, tuple[float, float | None]]:
  """{measure: (ours, theirs or None)} for one size (MEASURES, in order).

  The matmuls are timed interleaved with the train steps, so the peak sees the same machine load.
  """
  size = SIZES[size_name]
  with tempfile.TemporaryDirectory() as workdir:
    theirs, model, params, features_t = build(size, workdir)
  features = features_t.numpy()
  train_tokens = tokens_for(size, size.seq, seed=1)
  prompt = tokens_for(size, size.prompt, seed=2)

  ours_step, compile_train, (xla_flops, flops) = ours_train(model, params, features, train_tokens)
  theirs_step = theirs_train(theirs, train_tokens, size.vocab)
  train = median_seconds({"ours": ours_step, "theirs": theirs_step, **matmuls(size.matmul)}, reps,
                         warmup)
  ours_gen, compile_decode = ours_generate(model, params, features, prompt, size.new_tokens)
  gen = median_seconds({"ours": ours_gen,
                        "theirs": theirs_generate(theirs, prompt, size.new_tokens)}, reps, warmup)
  tokens, generated, peak = train_tokens.size, size.batch * size.new_tokens, 2 * size.matmul ** 3
  values = [(train["ours"], train["theirs"]),
            (tokens / train["ours"], tokens / train["theirs"]),
            (generated / gen["ours"], generated / gen["theirs"]),
            (flops / 1e9, None), (xla_flops / 1e9, None),
            (flops / train["ours"] / 1e9, None),
            (peak / train["dot"] / 1e9, peak / train["mm"] / 1e9),
            (flops / train["ours"] / (peak / train["dot"]), None),
            (compile_train, None), (compile_decode, None)]
  return dict(zip(MEASURES, values))


def table(results: dict[str, dict[str, tuple[float, float | None]]]) -> str:
  """Markdown: one row per (size, measure); ratio = ours/theirs (≥1: ours faster or higher)."""
  lines = ["| size | measure | flamingo_jax | OpenFlamingo (torch) | ratio |",
           "|---|---|---:|---:|---:|"]
  for size, rows in results.items():
    for measure, (ours, theirs) in rows.items():
      ratio = ""
      if theirs is not None:
        ratio = f"{theirs / ours:.2f}×" if measure.endswith("(s)") else f"{ours / theirs:.2f}×"
      lines.append(f"| {size} | {measure} | {ours:.4g} | "
                   f"{'' if theirs is None else f'{theirs:.4g}'} | {ratio} |")
  return "\n".join(lines)


def environment(threads: int) -> str:
  parallel = torch.__config__.parallel_info().splitlines()
  blas = [l.strip() for l in torch.__config__.show().splitlines() if "Math Kernel" in l]
  return "\n".join([
      f"- CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax "
      f"{jax.__version__} ({jax.devices()[0].platform}), XLA_FLAGS="
      f"{os.environ.get('XLA_FLAGS', '')!r}",
      f"- torch {torch.__version__}: {threads} threads "
      f"({'; '.join(l.strip() for l in parallel[1:3])}), "
      f"BLAS {blas[0] if blas else torch.__config__.show().split('BLAS_INFO=')[-1].split(',')[0]}; "
      f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}",
  ])


def main(argv):
  del argv
  threads = _THREADS.value or os.cpu_count()
  torch.set_num_threads(threads)
  results = {s: run(s, _REPS.value, _WARMUP.value) for s in _SIZES.value}
  text = table(results)
  print(text)
  if _RESULTS.value:
    with open(_RESULTS.value, "w") as f:
      f.write("# Speed: flamingo_jax vs OpenFlamingo (PyTorch), CPU, float32\n\n"
              f"{__doc__.split(chr(10), 1)[1]}\nCommand: `{' '.join(['python'] + sys.argv)}`\n\n"
              f"{environment(threads)}\n\n{text}\n")


if __name__ == "__main__":
  app.run(main)
