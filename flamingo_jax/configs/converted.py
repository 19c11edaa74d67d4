"""A converted model directory (`python -m flamingo_jax.convert openflamingo --out=DIR`) as a run.

Ask it about images (DIR is also its workdir; nothing is written there):
  python launch.py --mode=predict --config=flamingo_jax/configs/converted.py:dir=DIR \
      --workdir=DIR --prompt="<image>Output:" --image=cat.jpg
Fine-tune it on prepared datasets (the paper's mixture, with the backbone's preprocessing):
  python launch.py --config=flamingo_jax/configs/converted.py:dir=DIR --workdir=runs/ft \
      --config.input.datasets.m3w.tfds_name=my_docs ...

The frozen backbones come from DIR/vision and DIR/lm, the trained parameters from DIR/init
(config.init_from); see flamingo_jax/convert/model_dir.py.
"""
import ml_collections

from flamingo_jax.configs import common
from flamingo_jax.convert import model_dir


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, dir="")
  if not args.dir:
    raise ValueError("configs/converted.py needs the model directory: "
                     "--config=flamingo_jax/configs/converted.py:dir=DIR.")
  spec = model_dir.read(args.dir)
  config = common.training(total_steps=1000)
  config.model = ml_collections.ConfigDict(spec["model"])
  config.image_size = spec["image_size"]
  config.input = common.paper_input(spec["image_size"], image_pp=spec["image_pp"])
  config.input.tokenizer = spec["paths"][model_dir.LM]
  config.vision_init = spec["paths"][model_dir.VISION]
  config.lm_init = spec["paths"][model_dir.LM]
  config.init_from = spec["paths"][model_dir.INIT]
  config.lr_schedule.warmup_steps = 100
  return config
