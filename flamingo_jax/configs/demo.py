"""The demo's stage 3: Flamingo from the frozen stage-1 NFNet and stage-2 LM, on the embedded data.

Everything (tokenizer, three stages, few-shot evaluation, workdir/report.md) in one command:
  bash scripts/demo.sh                     # = python -m flamingo_jax.demo --workdir=workdir
Stage 3 alone, after stages 1-2 (configs/nfnet_contrastive.py, configs/lm_pretrain.py):
  python launch.py --config=flamingo_jax/configs/demo.py --workdir=workdir/stage3 \
    --config.input.tokenizer=workdir/tokenizer.model \
    --config.vision_init=workdir/stage1/vision --config.lm_init=workdir/stage2/lm
  python launch.py --config=flamingo_jax/configs/demo.py --workdir=workdir/stage3 --mode=eval \
    ...(same flags)
`configs/demo.py:short` is the end-to-end test's shortened run: 400 steps, not 600, with half the
batches of the datasets other than names, and fewer queries (open-ended ones at 0 and 8 shots).
`configs/demo.py:mlp` is the paper's "Resampler: MLP" ablation in place of the Perceiver.

The sizes of all three stages live here, so the stages' checkpoints fit each other. Training mixes
the paper's datasets (interleaved documents, pairs, video with their λ) with name-episode documents
(`name_episode` pp op on shapes_fewshot/names TRAIN episodes, fresh made-up names per document), so
binding names to shapes in context is learnable; evaluation uses the TEST episodes.
"""
import ml_collections

from flamingo_jax.configs import common

VOCAB_SIZE = 512  # SentencePiece pieces (flamingo_jax/demo.py trains them).
IMAGE_SIZE = 32
IMG_PP = f"decode|resize_pad({IMAGE_SIZE})|value_range(-1, 1)"


def vision() -> dict:
  """A tiny NFNet (1x1 feature grid at 32 px), shared by stage 1 and stage 3.

  strides=(1, 2, 1, 1) gives a 4x4 grid at 32 px from the same weights (models/nfnet.py).
  """
  return dict(variant="F0", depths=(1, 1, 1, 1), channels=(16, 32, 64, 96), stem_chs=16,
              group_size=8, num_features=128)


def lm(xattn: bool) -> dict:
  """The decoder of stage 2 (plain) and stage 3 (with gated xattn before every layer).

  2 layers are enough for induction heads (a previous-token head, then a matching one), which is
  what stage 2 must give it (configs/lm_pretrain.py), and each step is cheaper than with 4.
  Unrolled layers (same parameters; also stage 3's resampler): on CPU stages 2 and 3 run faster
  than under the TPU-default scan (docs/DEMO_RESULTS.md, 2026-12-06 (night)).
  """
  cfg = dict(vocab_size=VOCAB_SIZE, num_new_tokens=2, dim=128, num_layers=2, num_heads=4,
             mlp_dim=512, norm="rmsnorm", position="rotary", activation="gelu",
             tied_embeddings=False, max_len=192, unroll_layers=True)
  if xattn:
    cfg["xattn"] = dict(every=1, num_heads=4, head_dim=32, ffw_mult=2, activation="sqrelu")
  return cfg


def training(total_steps: int, lr: float, short: bool) -> ml_collections.ConfigDict:
  """The demo's training fields: CPU-sized, warmup then cosine, few checkpoints, frequent logs."""
  config = common.training(total_steps=total_steps)
  config.modules = ("flamingo_jax.demo",)  # Its shapes datasets, pp ops and eval tasks.
  config.lr = lr
  config.lr_schedule = dict(warmup_steps=max(total_steps // 10, 1), decay_type="cosine",
                            end_lr_frac=0.1)
  config.mesh = (-1, 1, 1)
  config.ckpt_every = total_steps
  config.keep_last = 1
  config.log_every = 5 if short else 10
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, short=False, mlp=False)
  # `:short`: names learned in 3 of 3 stage-3 seeds (4 shots 0.71-0.87) on the `:short` stage 1
  # and 2; at 300 steps, in 2 of 3 (docs/DEMO_RESULTS.md, 2026-12-06 (night, again)).
  config = training(total_steps=400 if arg.short else 600, lr=3e-3, short=arg.short)
  side_div = 2 if arg.short else 1  # The datasets other than names.
  if not arg.mlp:
    # The paper's Perceiver Resampler (8 latents, 2 layers) over a 4x4 feature grid, the stage-1
    # NFNet run at strides (1, 2, 1, 1) (same weights; stage 1 trains at 1x1). Small latents (std
    # 0.01; OpenFlamingo's are N(0, 1)) let the attention output, not the latents, carry the visual
    # tokens, and projections at 1/sqrt(dim) (not 0.02) make each latent attend differently from
    # the start: with N(0, 1) latents the tokens were image-independent and no run learned naming;
    # with near-zero latents and 0.02 projections all latents gave the same pooled token. It learns
    # more slowly than the MLP: 600 steps, not 400 (docs/DEMO_RESULTS.md, 2026-12-05).
    # center_features: the 4x4 grid is mostly background, so each position's features are nearly
    # the same in every image; in ~1 run in 9 the resampler never made its tokens image-dependent
    # and naming failed. Their per-position mean over step 1's images is subtracted
    # (models/perceiver.py; docs/DEMO_RESULTS.md, 2026-12-06).
    vision_cfg = dict(vision(), strides=(1, 2, 1, 1))
    resampler = dict(kind="perceiver", dim=64, num_layers=2, num_heads=4, head_dim=16,
                     num_latents=8, ffw_mult=2, activation="sqrelu", latent_std=1e-2,
                     kernel_std=64 ** -0.5, center_features=True)
  else:
    # `:mlp` (python -m flamingo_jax.demo --mlp): the paper's "Resampler: MLP" ablation
    # (models/perceiver.py:MlpConnector) over the NFNet's one feature per image.
    vision_cfg = vision()
    resampler = dict(kind="mlp", dim=64, num_latents=1, ffw_mult=2, activation="sqrelu")
  config.model = ml_collections.ConfigDict(dict(
      vision=vision_cfg, resampler=resampler,
      lm=lm(xattn=True), dtype="float32", param_dtype="float32", remat_policy="none"))
  config.image_size = IMAGE_SIZE
  # The frozen NFNet's features are computed once per image and cached under a hash of its config
  # and weights (flamingo_jax/demo/features.py; workdir/features/<key>.npz), and stage 3 trains
  # on them (the flamingo kind's `features`): stage 3 runs no encoder.
  config.cache_features = True
  config.optim.no_decay = r"^resampler/|_gate$"
  # The tanh gates start at 0; at this scale they need a larger step to open within the run. With
  # perfect per-shape features instead of the NFNet's, stage 3 learns in-context naming at lr 3e-3
  # (gates 3e-2) within 300 steps and not at 1e-3 (1e-2).
  config.schedule = [(r"^lm/.*xattn/.*_gate$", {"lr": 3e-2}), *common.FLAMINGO_SCHEDULE]
  config.input = ml_collections.ConfigDict(dict(
      kind="tfds", tokenizer="", num_workers=2,
      datasets=dict(
          # cache: every dataset is small and read once into memory (reading a record costs as
          # much as its pp; names: 20 episodes of 40 images).
          names=dict(tfds_name="shapes_fewshot/names", split="train", batch_size=16, weight=1.0,
                     cache=True,
                     pp=f"name_episode(8)|{IMG_PP}|tokenize_document(max_len=80, max_media=8)"),
          m3w=dict(tfds_name="shapes_interleaved", split="train", batch_size=8 // side_div,
                   weight=1.0,
                   cache=True, pp=f"{IMG_PP}|tokenize_document(max_len=96, max_media=5)"),
          pairs=dict(tfds_name="shapes_pairs", split="train", batch_size=16 // side_div,
                     weight=0.2,
                     cache=True, pp=f"{IMG_PP}|tokenize_pair(max_len=32)"),
          vtp=dict(tfds_name="shapes_video", split="train", batch_size=4 // side_div,
                   weight=0.03, cache=True,
                   pp=f"sample_frames(8)|{IMG_PP}|tokenize_video(max_len=32)"),
      ),
  ))
  shots, beam_size = (0, 4, 8), 1 if arg.short else 3
  # `:short` generates at 0 and 8 shots only: each k compiles its own decoding (~2.5 s each).
  open_shots = (0, 8) if arg.short else shots
  config.evals = ml_collections.ConfigDict(dict(  # The demo's tasks (flamingo_jax/demo/tasks.py).
      names=dict(type="shapes_names", shots=shots,
                 num_episodes=16 if arg.short else 50),  # TEST episodes (8 queries each).
      vqa=dict(type="shapes_vqa", shots=open_shots, num_queries=8 if arg.short else 48,  # TEST.
               beam_size=beam_size, max_new_tokens=16),
      captioning=dict(type="shapes_captioning", shots=open_shots,
                      num_queries=8 if arg.short else 48, beam_size=beam_size, max_new_tokens=16),
  ))
  return config
