"""The demo's stage 1: contrastive NFNet + text tower (paper App. B.1.3) on shapes_pairs.

  python launch.py --config=flamingo_jax/configs/nfnet_contrastive.py --workdir=workdir/stage1 \
    --config.input.tokenizer=workdir/tokenizer.model
(flamingo_jax/demo.py runs it, reports zero-shot retrieval recall on the test split and writes the
`{'vision': ...}` checkpoint that stage 3 loads through config.vision_init.) Everything trains;
AGC (paper: 0.01) clips the NFNet's gradients. `:short` is the end-to-end test's shortened run:
200 steps (recall@1 ~0.14; after 60, ~0.01, stage 3 learned naming less reliably).
"""
import ml_collections

from flamingo_jax.configs import common
from flamingo_jax.configs import demo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  short = common.parse_arg(arg, short=False).short
  config = demo.training(total_steps=200 if short else 400, lr=2e-3, short=short)
  config.model_name = "contrastive"
  config.model = ml_collections.ConfigDict(dict(
      vision=demo.vision(),
      text=dict(vocab_size=demo.VOCAB_SIZE + 2, dim=64, num_layers=2, num_heads=4, mlp_dim=128,
                max_len=32, pad_id=3),  # + <image>, <EOC>; SentencePiece's pad is id 3.
      embed_dim=64))
  config.image_size = demo.IMAGE_SIZE
  config.schedule = [(".*", {})]
  config.optim.update(agc=0.01, agc_params=r"^vision/", grad_clip=0.0, weight_decay=1e-4,
                      no_decay="")
  config.input = ml_collections.ConfigDict(dict(
      kind="tfds", tokenizer="", num_workers=2,
      # 256, not 64: a batch then holds captions that differ only in the shape, so the tower must
      # see shapes (not just colours) to tell them apart; names episodes need it.
      # cache: the 4,000 records are read once into memory (reading one costs as much as its pp).
      datasets=dict(pairs=dict(tfds_name="shapes_pairs", split="train", batch_size=256, cache=True,
                               pp=f"flip|{demo.IMG_PP}|tokenize_pair(max_len=32)"))))
  config.eval = ml_collections.ConfigDict(dict(  # Zero-shot retrieval (flamingo_jax/eval/).
      tfds_name="shapes_pairs", split="test", pp=f"{demo.IMG_PP}|tokenize_pair(max_len=32)"))
  return config
