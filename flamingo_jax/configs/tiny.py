"""A tiny Flamingo that trains in seconds on a CPU (synthetic batches); tests and smoke runs use it.

python launch.py --config=flamingo_jax/configs/tiny.py --workdir=/tmp/flamingo_tiny
python launch.py --config=flamingo_jax/configs/tiny.py --workdir=/tmp/flamingo_tiny_2p \
  --mode=local_multiprocess --num_processes=2
"""
import ml_collections

from flamingo_jax.configs import common


def get_model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      vision=dict(variant="F0", depths=(1, 1, 1, 1), channels=(16, 32, 48, 64), stem_chs=16,
                  group_size=8, num_features=64),
      resampler=dict(dim=32, num_layers=2, num_heads=2, head_dim=16, num_latents=4, max_frames=4,
                     ffw_mult=2, activation="sqrelu"),
      lm=dict(vocab_size=64, num_new_tokens=2, dim=32, num_layers=4, num_heads=4, mlp_dim=64,
              norm="rmsnorm", position="rotary", activation="silu", gated_mlp=True,
              tied_embeddings=False, max_len=128,
              xattn=dict(every=2, num_heads=2, head_dim=16, ffw_mult=2)),
      dtype="float32",
      param_dtype="float32",
      remat_policy="none",
  ))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  common.parse_arg(arg)  # Takes none: any argument is an error.
  config = common.training(total_steps=20)
  config.model = get_model_config()
  config.image_size = 32
  config.input = ml_collections.ConfigDict(dict(
      kind="synthetic",
      datasets=dict(
          interleaved=dict(batch_size=8, weight=1.0, num_media=2, num_frames=1, seq_len=32),
          pairs=dict(batch_size=8, weight=0.2, num_media=1, num_frames=1, seq_len=16),
      ),
  ))
  config.lr = 1e-3
  config.lr_schedule.warmup_steps = 5
  config.mesh = (-1, 1, 1)
  config.ckpt_every = 5
  config.log_every = 5
  return config
