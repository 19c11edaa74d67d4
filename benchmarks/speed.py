"""Speed of flamingo_jax beside OpenFlamingo (PyTorch) on this machine's CPU, over a grid of shapes.

Both sides are the same OpenFlamingo (CLIP ViT → resampler → LLaMA-style HF LM with gated xattn
blocks), built offline with random weights and converted into ours (`convert/open_flamingo.py`),
in float32. Vision is excluded from both: OpenFlamingo's CLIP ViT runs once and both sides get its
patch features (ours through `features=`, theirs through a stand-in for `vision_encoder`).

A grid point fixes the vocabulary, xattn every n layers, the train sequence length and the images
per sequence (batch 4, LM 8 layers × 512, resampler 6 × 512, 64 latents, 64 patch features per
image). `--grid=full` is every combination of --vocab × --every × --seq × --media; `--grid=axes`
(default) is the base point (first value of each flag), each other value changed one at a time,
and the largest point (the largest value of each).

Measured (medians over --reps repetitions after --warmup untimed calls), ours twice: with the
layer stacks as one rolled scan (`model.unroll_layers=False`, the TPU default) and unrolled (True):
  train step  forward + backward + AdamW on resampler, xattn and new token rows (LM frozen): our
              `trainer.make_update_step` with `optim.make_optimizer`, vs OpenFlamingo's
              `Flamingo.forward` + `torch.optim.AdamW` as its training loop runs it (embedding
              gradients masked to the new rows, global-norm clip 1).
  peak        matmul FLOPs of the train step (its jaxpr, scan bodies × length) / step time, as a
              fraction of a float32 `jnp.dot` of 2048² (torch.mm's beside it), timed at the start.
  compile     lower + compile of the train step.
  generation  greedy, KV-cached, 64-token prompt, 32 new tokens per row, no early stop:
              resampler + `decode.greedy_search` vs `Flamingo.generate` (min_new_tokens), whole
              call: the prompt's forward pass is part of it.
  decoding    one decoding step (a new token for each of the batch's 4 rows): the time of the
              call for 32 new tokens less the call for 1, over 31.
  bound       a decoding step's time if it only read the LM's parameters (frozen LM, xattn,
              output heads; of untied input embeddings only B rows) and the whole KV cache
              (self-attention and xattn visual keys/values) once, at the copy bandwidth (bytes
              read + written per second by a jitted 256 MiB copy). A stream of reads alone can
              beat a copy's rate, so this bound is conservative.
  needs       what issue #21's targets would take at the point, the arithmetic for where they are
              out of reach: 1.3x OpenFlamingo's train step as a fraction of the jnp.dot peak (both
              sides do the same matmul work: above 1.00 no float32 step reaches it), and 3x
              OpenFlamingo's tokens/s as the decoding step it leaves (OpenFlamingo's call / 3, less
              our fastest 1-token call, over 31) and that step as a fraction of the bound.

Ratios are valid only on an idle machine: torch's threads slow far more than XLA under load. The
run waits up to 5 minutes for the 1-minute load average to fall to --max_load, then refuses to
start (unless --allow_load), and the table is marked when other processes kept more than 0.5
cores busy during the run (`machine_load.py`; the load average after a run counts its own) or
when the copy bandwidth at its end differs from its start's by more than MAX_BANDWIDTH_DRIFT
(the host's memory bandwidth is shared beyond what the load average shows).
torch uses as many threads as XLA (os.cpu_count()). Both sides run in one process with
`host_memory.reuse_cpu_step_buffers` (what training and the demo use on a CPU): glibc keeps freed
memory for reuse (torch's allocations too) and XLA computes on the calling thread; without it
large buffers are mapped afresh per call and the copy bandwidth measured page faults.

python benchmarks/speed.py                                  # idle machine: axes grid, RESULTS.md
python benchmarks/speed.py --grid=full
python benchmarks/speed.py --base=tiny --reps=1 --warmup=0 --results= --allow_load  # smoke run
"""
import dataclasses
import itertools
import os
import pathlib
import platform
import re
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

from benchmarks import machine_load
from flamingo_jax.configs import common
from flamingo_jax.convert import open_flamingo
from flamingo_jax import host_memory
from flamingo_jax.eval import decode
from flamingo_jax.models import lm as lm_lib
from flamingo_jax.train import flops as flops_lib
from flamingo_jax.train import optim
from flamingo_jax.train import state as state_lib
from flamingo_jax.train import trainer

_GRID = flags.DEFINE_enum("grid", "axes", ["axes", "full"], "Which grid points (module doc).")
_VOCAB = flags.DEFINE_list("vocab", ["8192", "32768"], "LM vocabulary sizes.")
_EVERY = flags.DEFINE_list("every", ["2", "1", "4"], "xattn before every n-th LM layer.")
_SEQ = flags.DEFINE_list("seq", ["256", "128"], "Train sequence lengths.")
_MEDIA = flags.DEFINE_list("media", ["2", "1"], "Images per sequence.")
_BASE = flags.DEFINE_enum("base", "small", ["small", "tiny"], "Sizes the grid does not vary.")
_REPS = flags.DEFINE_integer("reps", 3, "Timed repetitions per measurement (medians).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls before timing.")
_MAX_LOAD = flags.DEFINE_float("max_load", machine_load.MAX_OTHER_CORES,
                                "Highest 1-minute load average to start at.")
_ALLOW_LOAD = flags.DEFINE_bool("allow_load", False, "Run above --max_load (table marked).")
_RESULTS = flags.DEFINE_string("results", "benchmarks/RESULTS.md",
                               "Markdown file whose speed section is replaced ('' = none).")


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

  def label(self) -> str:
    return f"V={self.vocab} every={self.every} L={self.seq} N={self.media}"


BASES = {
    "tiny": Size(vocab=64, dim=32, layers=4, heads=4, mlp=48, every=2, vis_dim=32, image=16,
                 patch=8, media=2, batch=2, seq=32, prompt=16, new_tokens=8),
    "small": Size(vocab=8192, dim=512, layers=8, heads=8, mlp=1376, every=2, vis_dim=512,
                  image=64, patch=8, media=2, batch=4, seq=256, prompt=64, new_tokens=32),
}
PEAK_MATMUL = 2048


def flag_axes() -> dict[str, list[int]]:
  """Size field -> the values of its flag (--vocab, --every, --seq, --media)."""
  axes = {"vocab": _VOCAB, "every": _EVERY, "seq": _SEQ, "media": _MEDIA}
  return {name: [int(v) for v in flag.value] for name, flag in axes.items()}


def grid(base: Size, axes: dict[str, list[int]], full: bool) -> list[Size]:
  """The grid points (module docstring); axes: Size field -> values, the first the base's."""
  if full:
    return [dataclasses.replace(base, **dict(zip(axes, values)))
            for values in itertools.product(*axes.values())]
  first = dataclasses.replace(base, **{k: v[0] for k, v in axes.items()})
  points = [first] + [dataclasses.replace(first, **{k: v}) for k, vs in axes.items()
                      for v in vs[1:]]
  largest = dataclasses.replace(base, **{k: max(v) for k, v in axes.items()})
  return list(dict.fromkeys(points + [largest]))


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


def base_point():
  """(size, our model, params, CLIP features [B, N, 1, S, C]) at the base grid point (the first
  value of each axis flag), for a process that runs as speed.py does (host_memory's settings
  made first, here): step_profile.py and cpu_matmuls.py."""
  host_memory.reuse_cpu_step_buffers()
  size = grid(BASES["small"], flag_axes(), full=False)[0]
  with tempfile.TemporaryDirectory() as workdir:
    _, model, params, features = build(size, workdir)
  return size, model, params, features.numpy()


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


def ours_train(model, params, features: np.ndarray, tokens: np.ndarray, with_hlo: bool = False,
               compiler_options=None):
  """(step fn, compile seconds, jaxpr matmul FLOPs per step[, optimized HLO text]) of our real
  update step (compiled with XLA `compiler_options` over the project's, if given)."""
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
  compiled = update.lower(state["train"], frozen, batches).compile(compiler_options)
  compile_s = time.perf_counter() - start

  def step():
    state["train"], measured = compiled(state["train"], frozen, batches)
    jax.block_until_ready(measured)

  flops = flops_lib.step_flops(update, state["train"], frozen, batches)
  return (step, compile_s, flops) + ((compiled.as_text(),) if with_hlo else ())


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


def ours_generate(model, params, features: np.ndarray, tokens: np.ndarray, new_tokens: int,
                  with_hlo: bool = False, compiler_options=None):
  """(generate fn, bytes a decoding step reads at least[, optimized HLO text of the search]):
  resampler + `decode.greedy_search`, both compiled here (the search with XLA `compiler_options`
  over the project's, if given).

  The bytes: the LM's parameters (but untied input embedding tables, of which a step reads B rows)
  and its whole KV cache (self-attention and xattn), as `decode._prefill` allocates it.
  """
  lm = lm_lib.LM(model.lm, decode=True)
  resample = jax.jit(lambda p, f: model.apply(
      {"params": p}, f, method=lambda module, x: module.visual_connector(x)))
  media_idx = np.cumsum(tokens == model.lm.vocab_size + 1, 1, dtype=np.int32)
  lengths = np.full(tokens.shape[0], tokens.shape[1], np.int32)
  features, tokens, params = jax.device_put((features, tokens, params))
  no_stop = jnp.array([-1], jnp.int32)
  visual = jax.eval_shape(resample, params, features)
  resample = resample.lower(params, features).compile()
  search = decode.greedy_search.lower(lm, params["lm"], visual, tokens, media_idx, lengths,
                                      no_stop, 0, max_new_tokens=new_tokens
                                      ).compile(compiler_options)

  def generate():
    out, _ = search(params["lm"], resample(params, features), tokens, media_idx, lengths,
                    no_stop, 0)
    return jax.block_until_ready(out)

  cache = jax.eval_shape(lambda p, v: decode._prefill(  # pylint: disable=protected-access
      lm, p, v, tokens, media_idx, lengths, new_tokens)[1], params["lm"], visual)
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  weights = dict(params["lm"])
  if not model.lm.tied_embeddings:  # A step gathers B rows of the input tables, reads no more.
    weights.pop("token_embed"), weights.pop("new_token_embed", None)
  return (generate, nbytes(weights) + nbytes(cache)) + ((search.as_text(),) if with_hlo else ())


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


def matmul_peaks(n: int, reps: int) -> tuple[float, float]:
  """GFLOP/s of an n×n float32 matmul: jitted jnp.dot and torch.mm (medians)."""
  a = np.random.RandomState(0).randn(n, n).astype(np.float32)
  dot, x, t = jax.jit(jnp.dot), jnp.asarray(a), torch.from_numpy(a)
  times = median_seconds({"dot": lambda: dot(x, x).block_until_ready(),
                          "mm": lambda: torch.mm(t, t)}, max(reps, 5), 2)
  return 2 * n ** 3 / times["dot"] / 1e9, 2 * n ** 3 / times["mm"] / 1e9


# A run whose copy bandwidth at its end differs more than this from its start's is not a result:
# the host's memory bandwidth is shared with tenants the load average does not see (on one run
# it read 10.4 GB/s, against 30.9 in the run before and ~36 a minute after).
MAX_BANDWIDTH_DRIFT = 0.25


def not_a_result(idle: bool, bandwidths: tuple[float, float]) -> list[str]:
  """Why a run's table is not a result (none when it is): other processes used the CPU, or the
  copy bandwidth at its end (bandwidths[1]) moved from its start's by over MAX_BANDWIDTH_DRIFT."""
  reasons = [] if idle else ["the machine was not idle"]
  if abs(bandwidths[1] / bandwidths[0] - 1) > MAX_BANDWIDTH_DRIFT:
    reasons.append(f"the copy bandwidth moved from {bandwidths[0]:.1f} to {bandwidths[1]:.1f} "
                   "GB/s during the run")
  return reasons


def copy_bandwidth(reps: int) -> float:
  """GB/s of a jitted copy of 256 MiB (bytes read + bytes written), median."""
  x = jnp.ones(64 << 20, jnp.float32)
  copy = jax.jit(lambda v: v + 0.0)
  seconds = median_seconds({"copy": lambda: copy(x).block_until_ready()}, max(reps, 5), 2)
  return 2 * x.nbytes / seconds["copy"] / 1e9


COLUMNS = ("train s: scan / unrolled / OpenFlamingo", "train ratio (best)",
           "fraction of jnp.dot peak (best)", "compile s: scan / unrolled",
           "generation tok/s: scan / unrolled / OpenFlamingo", "generation ratio (best)",
           "decoding step ms: scan / unrolled / OpenFlamingo", "decoding ratio (best)",
           "bound ms", "fraction of bound (best)", "1.3x train needs: fraction of peak",
           "3x generation needs: step ms (fraction of bound)")


def decoding_step_ms(one_token_s: float, all_tokens_s: float, new_tokens: int) -> float:
  """One decoding step, ms: a call for `new_tokens` new tokens less a call for 1, over the steps
  between them (what is not a step, the resampler and the prompt's pass, cancels)."""
  return (all_tokens_s - one_token_s) / (new_tokens - 1) * 1e3


def run(size: Size, reps: int, warmup: int, peak: float, bandwidth: float) -> dict[str, str]:
  """{column: cell} of COLUMNS for one grid point."""
  with tempfile.TemporaryDirectory() as workdir:
    theirs, model, params, features_t = build(size, workdir)
  features = features_t.numpy()
  train_tokens = tokens_for(size, size.seq, seed=1)
  prompt = tokens_for(size, size.prompt, seed=2)
  models = {"scan": model, "unrolled": model.clone(
      lm=dataclasses.replace(model.lm, unroll_layers=True))}

  steps, compile_s, flops = {}, {}, 0.0
  for name, m in models.items():
    steps[name], compile_s[name], flops = ours_train(m, params, features, train_tokens)
  steps["theirs"] = theirs_train(theirs, train_tokens, size.vocab)
  train = median_seconds(steps, reps, warmup)
  gens, names = {}, ("scan", "unrolled", "theirs")
  for new_tokens in (1, size.new_tokens):
    for name, m in models.items():
      gens[name, new_tokens], nbytes = ours_generate(m, params, features, prompt, new_tokens)
    gens["theirs", new_tokens] = theirs_generate(theirs, prompt, new_tokens)
  gen = median_seconds(gens, reps, warmup)
  tokens_per_s = {k: size.batch * size.new_tokens / gen[k, size.new_tokens] for k in names}
  step_ms = {k: decoding_step_ms(gen[k, 1], gen[k, size.new_tokens], size.new_tokens)
             for k in names}
  bound_ms = nbytes / (bandwidth * 1e9) * 1e3
  fastest = min(("scan", "unrolled"), key=lambda k: gen[k, size.new_tokens])
  best_train, best_gen = min(train["scan"], train["unrolled"]), tokens_per_s[fastest]
  best_step = min(step_ms["scan"], step_ms["unrolled"])
  needed_ms = decoding_step_ms(gen[fastest, 1], gen["theirs", size.new_tokens] / 3,
                               size.new_tokens)
  return dict(zip(COLUMNS, [
      f"{train['scan']:.3f} / {train['unrolled']:.3f} / {train['theirs']:.3f}",
      f"{train['theirs'] / best_train:.2f}×",
      f"{flops / best_train / 1e9 / peak:.2f}",
      f"{compile_s['scan']:.1f} / {compile_s['unrolled']:.1f}",
      f"{tokens_per_s['scan']:.1f} / {tokens_per_s['unrolled']:.1f} / "
      f"{tokens_per_s['theirs']:.1f}",
      f"{best_gen / tokens_per_s['theirs']:.2f}×",
      " / ".join(f"{step_ms[k]:.1f}" for k in names),
      f"{step_ms['theirs'] / best_step:.2f}×",
      f"{bound_ms:.1f}", f"{bound_ms / best_step:.2f}",
      f"{1.3 * flops / train['theirs'] / 1e9 / peak:.2f}",
      f"{needed_ms:.1f} ({bound_ms / needed_ms:.2f})" if needed_ms > 0
      else "none (1-token call > 1/3)"]))


def table(results: dict[str, dict[str, str]]) -> str:
  """Markdown: one row per grid point; ratios are OpenFlamingo's time / ours (≥1: ours faster)."""
  lines = ["| point | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
  lines += [f"| {point} | " + " | ".join(row[c] for c in COLUMNS) + " |"
            for point, row in results.items()]
  return "\n".join(lines)


def cpu_model() -> str:
  """The CPU's model name, and AVX-512 where it has it: the two sides' matmul peaks differ by CPU
  (RESULTS.md: jnp.dot 182 GFLOP/s on one 2-core machine and 283-386 on another, torch.mm 167
  and 181-197), so a table's ratios hold for its CPU."""
  try:
    text = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return platform.processor() or platform.machine()
  name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
  flags_line = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
  avx512 = bool(flags_line) and "avx512f" in flags_line.group(1).split()
  return (name.group(1).strip() if name else platform.machine()) + (", AVX-512" if avx512 else "")


def environment(threads: int, load: str, peaks: tuple[float, float],
                bandwidths: tuple[float, float], reused: bool) -> str:
  parallel = torch.__config__.parallel_info().splitlines()
  blas = [l.strip() for l in torch.__config__.show().splitlines() if "Math Kernel" in l]
  return "\n".join([
      f"- CPU: {cpu_model()}, {os.cpu_count()} cores; jax "
      f"{jax.__version__} ({jax.devices()[0].platform}), XLA_FLAGS="
      f"{os.environ.get('XLA_FLAGS', '')!r}",
      f"- torch {torch.__version__}: {threads} threads "
      f"({'; '.join(l.strip() for l in parallel[1:3])}), "
      f"BLAS {blas[0] if blas else torch.__config__.show().split('BLAS_INFO=')[-1].split(',')[0]}",
      f"- host_memory.reuse_cpu_step_buffers: {reused}",
      f"- {load}",
      f"- f32 {PEAK_MATMUL}² matmul: jnp.dot {peaks[0]:.1f} GFLOP/s, torch.mm {peaks[1]:.1f} "
      f"GFLOP/s; copy bandwidth {bandwidths[0]:.1f} GB/s at the start (the bound's), "
      f"{bandwidths[1]:.1f} at the end",
  ])


def main(argv):
  del argv
  reused = host_memory.reuse_cpu_step_buffers()  # Before the first computation makes the client.
  load = machine_load.wait_for_load(_MAX_LOAD.value)
  if load > _MAX_LOAD.value and not _ALLOW_LOAD.value:
    raise SystemExit(f"Load average {load:.2f} > --max_load={_MAX_LOAD.value} after waiting "
                     "5 minutes: ratios against torch are not valid on a loaded machine. "
                     "--allow_load runs anyway (the table is then marked).")
  threads = os.cpu_count()
  torch.set_num_threads(threads)
  points = grid(BASES[_BASE.value], flag_axes(), _GRID.value == "full")
  results = {}
  with machine_load.OtherCpu() as load:
    peaks, bandwidth = matmul_peaks(PEAK_MATMUL, _REPS.value), copy_bandwidth(_REPS.value)
    for size in points:
      results[size.label()] = run(size, _REPS.value, _WARMUP.value, peaks[0], bandwidth)
      print(table(results).splitlines()[-1], flush=True)
    bandwidths = bandwidth, copy_bandwidth(_REPS.value)
  text = table(results)
  if reasons := not_a_result(load.idle(), bandwidths):
    text = f"**Not a result: {'; '.join(reasons)}.**\n\n{text}"
  text = f"{environment(threads, load.describe(), peaks, bandwidths, reused)}\n\n{text}"
  print(text)
  if _RESULTS.value:
    write_section(_RESULTS.value, f"Command: `{' '.join(['python'] + sys.argv)}`\n\n{text}\n")


SECTION = "# Speed: flamingo_jax vs OpenFlamingo (PyTorch), CPU, float32"


def write_section(path: str, body: str) -> None:
  """Replaces the speed section of `path` (up to the next '# ' heading), keeping the others."""
  text = open(path).read() if os.path.exists(path) else ""
  start = text.find(SECTION)
  end = len(text) if start < 0 else text.find("\n# ", start + 1)
  end = len(text) if end < 0 else end + 1
  head, tail = (text, "") if start < 0 else (text[:start], text[end:])
  section = f"{SECTION}\n\n{__doc__.split(chr(10), 1)[1]}\n{body}\n"
  with open(path, "w") as f:
    f.write(head + section + tail)


if __name__ == "__main__":
  app.run(main)
