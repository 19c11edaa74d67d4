"""Pieces shared by the paper's configs (Flamingo paper, Table 1 and Appendix B)."""
import ml_collections

from flamingo_jax.models import flamingo


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """A config's argument (`--config=file.py:ARG`), big_vision style: 'name=value,flag,...' over
  `defaults`, a bare name setting a boolean. An unknown name is an error that lists the known ones,
  so a typo never runs the default config."""
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    name, has_value, value = item.partition("=")
    if name not in defaults:
      raise ValueError(f"Unknown config argument {name!r} in {arg!r}; this config takes "
                       f"{sorted(defaults) or 'no argument'}.")
    default = defaults[name]
    if isinstance(default, bool):
      if has_value and value not in ("True", "False"):
        raise ValueError(f"Config argument {name}={value!r}; expected True or False.")
      parsed[name] = value != "False"
    else:
      parsed[name] = type(default)(value)
  return parsed


def paper_model(*, lm_layers: int, lm_dim: int, lm_heads: int, xattn_every: int,
                xattn_heads: int) -> ml_collections.ConfigDict:
  """A Flamingo model config as the paper describes it.

  Frozen LM: Chinchilla-style pre-norm decoder (RMSNorm, GeLU MLP of 4·D, key size 128, untied
  embeddings, SentencePiece 32k vocab, context 2048). Chinchilla uses Transformer-XL relative
  positions; rotary embeddings are our relative-position stand-in. Vision: NFNet-F6 (final conv
  to 2·1536). Resampler: 6 layers, D 1536, 16 heads × 128, 64 latents. New layers use squared ReLU
  FFWs of 4·D. xattn blocks: key size 128, placed before layer 0 and every n-th layer.
  """
  return ml_collections.ConfigDict(dict(
      # scan_blocks=False unrolls F6's 84 blocks: ~3x the HLO, far slower AOT compiles (AOT.md).
      vision=dict(variant="F6", scan_blocks=True),
      resampler=dict(dim=1536, num_layers=6, num_heads=16, head_dim=128, num_latents=64,
                     max_frames=8, ffw_mult=4, activation="sqrelu"),
      lm=dict(vocab_size=32000, num_new_tokens=2, dim=lm_dim, num_layers=lm_layers,
              num_heads=lm_heads, head_dim=128, mlp_dim=4 * lm_dim, norm="rmsnorm",
              position="rotary", activation="gelu", tied_embeddings=False, max_len=2048,
              xattn=dict(every=xattn_every, placement="paper", num_heads=xattn_heads,
                         head_dim=128, ffw_mult=4, activation="sqrelu")),
      dtype="bfloat16",
      param_dtype="float32",
      remat_policy="dots",
  ))


# Logical axis -> mesh axes (flamingo_jax/train/sharding.py): FSDP over model widths, Megatron-style
# tensor parallelism over heads, MLP and vocabulary; scanned stacks and small tables replicated.
SHARDING_RULES = [
    ("embed", "fsdp"), ("vocab", "model"), ("heads", "model"), ("kv_heads", "model"),
    ("mlp", "model"), ("kv", None), ("layers", None), ("groups", None), ("positions", None),
    ("latents", None), ("frames", None), ("vis_embed", None), ("conv_h", None), ("conv_w", None),
    ("conv_in", None), ("conv_out", "fsdp"), ("classes", None),
]

# Flamingo's parameter groups (paper §3): resampler, xattn blocks and the new-token rows train; the
# vision encoder and the LM stay frozen. {} = the default lr schedule; None = frozen.
FLAMINGO_SCHEDULE = [
    (r"^vision/", None),
    (r"^lm/.*xattn/", {}),
    (r"^lm/new_(token_embed|lm_head)", {}),
    (r"^lm/", None),
    (r"^resampler/feature_mean$", {"lr": 0.0}),  # A statistic set from data (models/perceiver.py).
    (r"^resampler/", {}),
]


def training(total_steps: int) -> ml_collections.ConfigDict:
  """Training fields with the paper's hyper-parameters (App. B.1.2); see flamingo_jax/train/."""
  return ml_collections.ConfigDict(dict(
      model_name="flamingo",  # What trains: 'flamingo' | 'lm' | 'contrastive' (train/kinds/).
      modules=(),  # Imported first: they register datasets, pp ops, eval tasks (modules.py).
      seed=0,
      total_steps=total_steps,
      mixture_mode="accumulate",  # 'accumulate' (paper) | 'round_robin' (ablation)
      microbatches=1,  # Gradient accumulation within each dataset's batch.
      lr=1e-4,
      lr_schedule=dict(warmup_steps=5000, decay_type="constant", end_lr_frac=0.0),
      optim=dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, no_decay=r"^resampler/",
                 grad_clip=1.0, agc=0.0, agc_params=""),  # agc > 0: adaptive gradient clipping
      # (NFNet training) of the parameters whose path matches the agc_params regex ("" = all).
      schedule=FLAMINGO_SCHEDULE,
      unfreeze=(),  # Modules ('vision', 'lm') to train although the schedule freezes them.
      frozen_dtype="",  # e.g. 'bfloat16': store frozen parameters in it ('' = as initialised).
      mesh=(1, -1, 1),  # (data, fsdp, model); one -1 fills with the remaining devices.
      sharding_rules=SHARDING_RULES,
      # Frozen backbones ('' = random initialisation: tests, smoke runs). vision_init: a
      # checkpoint.save_params tree {'vision': ...}. lm_init: a tree {'lm': ...} (the demo's stage
      # 2 writes one) or the directory `python -m flamingo_jax.convert hf --dst` writes, its LM in
      # any layer layout (the plain one serves every xattn placement; train/kinds/flamingo.py).
      vision_init="",
      lm_init="",
      init_from="",  # save_params checkpoint of the trainable parameters (fresh runs only).
      ckpt_every=1000,
      keep_last=3,
      keep_every=0,  # Also keep every keep_every-th step (0 = none).
      ckpt_async=True,
      # Checkpoints exist but none can be read: False stops with an error listing each; True
      # moves them to checkpoints_corrupt/ and starts from step 0.
      start_over_if_unreadable=False,
      # gs:// workdirs (local ones use flock, train/workdir_lock.py): a lock whose holder has not
      # refreshed it for this long is taken over.
      lock_stale_after_s=600,
      log_every=50,
      profile_steps=(),  # (first, last): a JAX profiler trace of those steps (train/profiler.py).
  ))


def vision_pp(vision, image_size: int) -> str:
  """Pixel pp ops for the vision backbone `vision` (a config.model.vision): the paper's resize and
  pad to image_size, then the mean/std its weights were trained with (each backbone its own)."""
  cfg = flamingo.vision_config(vision)
  return (f"resize_pad({image_size})|"
          f"normalize({tuple(map(float, cfg.mean))}, {tuple(map(float, cfg.std))})")


def paper_input(image_size: int, image_pp: str = "", vision=None) -> ml_collections.ConfigDict:
  """The paper's mixture and its processing (§2.4, App. A.3): λ M3W 1.0, ALIGN 0.2, LTIP 0.2,
  VTP 0.03; M3W a random 256-token window, its first 5 images, p_next = ½; pairs 32 (ALIGN) / 64
  (LTIP) tokens, a space prepended to the caption with p = ½; video 8 frames at 1 FPS from a
  random start; the loss of Eq. (2) (`loss_normalization`).

  The datasets (TFDS names, e.g. prepared from the user's own files) and the tokenizer are required
  fields ('' until set): training stops at once with an error naming each one that is missing.
  Batch sizes are placeholders to set for the hardware. image_pp: the pixel preprocessing ops
  (default: `vision_pp` of `vision`, a config.model.vision, by default the paper's NFNet).
  """
  img = f"decode|{image_pp or vision_pp(vision or dict(variant='F6'), image_size)}"
  pair = f"{img}|prepend_space(0.5)|tokenize_pair"
  return ml_collections.ConfigDict(dict(
      kind="tfds",
      tokenizer="",  # Required: SentencePiece model or HF tokenizer.json (data/tokenizer.py).
      # The pp runs in this many spawned processes, free of the trainer's GIL (data/mixture.py;
      # set it to the host's cores less one); num_workers threads only when it is 0.
      worker_processes=8,
      num_workers=0,
      # Each dataset's loss (train/kinds/flamingo.py:loss): 'sequence', Eq. (2)'s mean over the
      # batch of each sequence's summed NLL; 'token' (without this field), the mean per token.
      loss_normalization="sequence",
      datasets=dict(  # tfds_name is required for each; data_dir: where it is prepared.
          m3w=dict(tfds_name="", data_dir="", split="train", batch_size=256, weight=1.0,
                   pp=f"{img}|tokenize_document(max_len=256, max_media=5, p_next=0.5, "
                      "random_window=True)"),
          align=dict(tfds_name="", data_dir="", split="train", batch_size=512, weight=0.2,
                     pp=f"{pair}(max_len=32)"),
          ltip=dict(tfds_name="", data_dir="", split="train", batch_size=512, weight=0.2,
                    pp=f"{pair}(max_len=64)"),
          vtp=dict(tfds_name="", data_dir="", split="train", batch_size=64, weight=0.03,
                   pp=f"sample_frames(8, fps=1.0, random_start=True)|{img}|"
                      "tokenize_video(max_len=32)"),
      ),
  ))


# The paper's benchmarks (Table 1) that eval/benchmarks.py reads: (name, in its DEV set (§3)).
PAPER_BENCHMARKS = (("coco", True), ("vqav2", True), ("okvqa", True), ("msrvtt_qa", False),
                    ("flickr30k", False), ("textvqa", False), ("vizwiz", False),
                    ("hateful_memes", False))


def paper_evals(every_steps: int = 10_000, dev_queries: int = 500) -> ml_collections.ConfigDict:
  """config.evals with the paper's benchmarks (eval/protocol.py: its prompts, beam 3, 0-32 shots).

  Each `data_dir` is required (the benchmark's files as published; eval/benchmarks.py): a run that
  is due without it stops before anything is computed, naming the field. The DEV benchmarks (§3:
  COCO, VQAv2, OK-VQA) also run during training, every `every_steps` on their first
  `dev_queries` queries and 4 shots; `--mode=eval` runs them all (--num_queries=0 --shots=...
  for the full protocol).
  """
  evals = {}
  for name, dev in PAPER_BENCHMARKS:
    evals[name] = dict(type=name, data_dir="", every_steps=every_steps if dev else 0)
    if dev:
      evals[name].update(num_queries=dev_queries, shots=(4,))
  return ml_collections.ConfigDict(evals)
