"""Flamingo-80B as in the paper (Table 1): 80-layer frozen LM (D 8192, 64 heads), xattn every 7.

Parameter counts: python -m flamingo_jax.models.param_count --config=configs/flamingo_80b.py

Training (set config.input.tokenizer and the batch sizes for the hardware):
python launch.py --config=configs/flamingo_80b.py --workdir=gs://BUCKET/flamingo_80b \
  --config.input.tokenizer=TOKENIZER --config.vision_init=NFNET_CKPT --config.lm_init=LM_CKPT
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = common.training(total_steps=500_000)
  config.mesh = (1, -1, 16)  # (data, fsdp, model)
  config.model = common.paper_model(lm_layers=80, lm_dim=8192, lm_heads=64, xattn_every=7,
                                    xattn_heads=64)
  config.image_size = 320
  config.frozen_dtype = "bfloat16"  # The frozen 70B LM as stored: 140 GB, not 280 GB.
  config.input = common.paper_input(config.image_size)
  return config
