"""Flamingo-80B as in the paper (Table 1): 80-layer frozen LM (D 8192, 64 heads), xattn every 7.

Parameter counts:
python -m flamingo_jax.models.param_count --config=flamingo_jax/configs/flamingo_80b.py

Training (name the prepared datasets, the tokenizer and the DEV benchmarks' folders; set the batch
sizes for the hardware):
python launch.py --config=flamingo_jax/configs/flamingo_80b.py --workdir=gs://BUCKET/flamingo_80b \
  --config.input.tokenizer=TOKENIZER --config.vision_init=NFNET_CKPT --config.lm_init=LM_CKPT \
  --config.input.datasets.m3w.tfds_name=M3W --config.input.datasets.align.tfds_name=ALIGN \
  --config.input.datasets.ltip.tfds_name=LTIP --config.input.datasets.vtp.tfds_name=VTP \
  --config.evals.coco.data_dir=COCO --config.evals.vqav2.data_dir=VQAV2 \
  --config.evals.okvqa.data_dir=OKVQA
(the DEV benchmarks run every 10k steps; `--config.evals.coco.every_steps=0` turns one off.)

Per-chip memory on the paper's 1,536 TPUv4 chips (16-way model parallelism, so 96 data-parallel
groups: the batch sizes become multiples of 96; benchmarks/AOT.md):
python launch.py --mode=compile --config=flamingo_jax/configs/flamingo_80b.py --topology=v4-3072 \
  --config.input.datasets.m3w.batch_size=288 --config.input.datasets.align.batch_size=576 \
  --config.input.datasets.ltip.batch_size=576 --config.input.datasets.vtp.batch_size=96
"""
import ml_collections

from flamingo_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  common.parse_arg(arg)  # Takes none: any argument is an error.
  config = common.training(total_steps=500_000)
  # (data, fsdp, model): FSDP must divide the widths (8192, 1536), which 96 does not; 1,536 chips
  # are 3 x 32 x 16 (still 96 data-parallel groups), 512 v5p chips 1 x 32 x 16.
  config.mesh = (-1, 32, 16)
  config.model = common.paper_model(lm_layers=80, lm_dim=8192, lm_heads=64, xattn_every=7,
                                    xattn_heads=64)
  config.image_size = 320
  config.frozen_dtype = "bfloat16"  # The frozen 70B LM as stored: 140 GB, not 280 GB.
  config.input = common.paper_input(config.image_size)
  config.evals = common.paper_evals()
  return config
