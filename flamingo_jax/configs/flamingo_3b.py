"""Flamingo-3B as in the paper (Table 1): 24-layer frozen LM (D 2048, 16 heads), xattn every 1.

Parameter counts:
python -m flamingo_jax.models.param_count --config=flamingo_jax/configs/flamingo_3b.py

Training (name the prepared datasets, the tokenizer and the DEV benchmarks' folders; set the batch
sizes for the hardware):
python launch.py --config=flamingo_jax/configs/flamingo_3b.py --workdir=gs://BUCKET/flamingo_3b \
  --config.input.tokenizer=TOKENIZER --config.vision_init=NFNET_CKPT --config.lm_init=LM_CKPT \
  --config.input.datasets.m3w.tfds_name=M3W --config.input.datasets.align.tfds_name=ALIGN \
  --config.input.datasets.ltip.tfds_name=LTIP --config.input.datasets.vtp.tfds_name=VTP \
  --config.evals.coco.data_dir=COCO --config.evals.vqav2.data_dir=VQAV2 \
  --config.evals.okvqa.data_dir=OKVQA
(the DEV benchmarks run every 10k steps; `--config.evals.coco.every_steps=0` turns one off.)

`flamingo_3b.py:tiny` is the same structure (NFNet, Perceiver Resampler, xattn before every LM
layer, the paper's mixture and processing) at sizes that train on a CPU in seconds, with no evals:
to check a data pipeline end to end before booking a pod (README "Train on your own data").
`vocab=N` sets the frozen LM's vocabulary to the tokenizer's (default the paper's 32000).
"""
import ml_collections

from flamingo_jax.configs import common


def _tiny(model: ml_collections.ConfigDict) -> None:
  """Shrinks the 3B model in place, keeping its kinds of layers and the xattn placement."""
  model.vision = dict(variant="F0", depths=(1, 1, 1, 1), channels=(16, 32, 48, 64), stem_chs=16,
                      group_size=8, num_features=64)
  model.resampler.update(dim=32, num_layers=2, num_heads=2, head_dim=16, num_latents=8)
  model.lm.update(dim=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=128)
  model.lm.xattn.update(num_heads=2, head_dim=16)
  model.update(dtype="float32", remat_policy="none")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, tiny=False, vocab=32000)
  config = common.training(total_steps=500_000)
  config.mesh = (1, -1, 1)  # (data, fsdp, model)
  config.model = common.paper_model(lm_layers=24, lm_dim=2048, lm_heads=16, xattn_every=1,
                                    xattn_heads=16)
  config.model.lm.vocab_size = arg.vocab
  config.image_size = 320
  if arg.tiny:
    _tiny(config.model)
    config.image_size = 64
    config.update(total_steps=10, ckpt_every=5, log_every=1)
    config.lr_schedule.warmup_steps = 2
  config.input = common.paper_input(config.image_size, vision=config.model.vision)
  config.evals = ml_collections.ConfigDict() if arg.tiny else common.paper_evals()
  if arg.tiny:
    config.input.worker_processes = 2
    for dataset in config.input.datasets.values():
      dataset.batch_size = 8
  return config
