"""Flamingo-9B as in the paper (Table 1): 40-layer frozen LM (D 4096, 32 heads), xattn every 4.

Parameter counts:
python -m flamingo_jax.models.param_count --config=flamingo_jax/configs/flamingo_9b.py

Training (name the prepared datasets, the tokenizer and the DEV benchmarks' folders; set the batch
sizes for the hardware):
python launch.py --config=flamingo_jax/configs/flamingo_9b.py --workdir=gs://BUCKET/flamingo_9b \
  --config.input.tokenizer=TOKENIZER --config.vision_init=NFNET_CKPT --config.lm_init=LM_CKPT \
  --config.input.datasets.m3w.tfds_name=M3W --config.input.datasets.align.tfds_name=ALIGN \
  --config.input.datasets.ltip.tfds_name=LTIP --config.input.datasets.vtp.tfds_name=VTP \
  --config.evals.coco.data_dir=COCO --config.evals.vqav2.data_dir=VQAV2 \
  --config.evals.okvqa.data_dir=OKVQA
(the DEV benchmarks run every 10k steps; `--config.evals.coco.every_steps=0` turns one off.)
"""
import ml_collections

from flamingo_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  common.parse_arg(arg)  # Takes none: any argument is an error.
  config = common.training(total_steps=500_000)
  config.mesh = (1, -1, 4)  # (data, fsdp, model)
  config.model = common.paper_model(lm_layers=40, lm_dim=4096, lm_heads=32, xattn_every=4,
                                    xattn_heads=32)
  config.image_size = 320
  config.input = common.paper_input(config.image_size)
  config.evals = common.paper_evals()
  return config
