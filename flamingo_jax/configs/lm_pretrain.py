"""The demo's stage 2: next-token pretraining of the plain decoder on the embedded dataset's text.

  python launch.py --config=flamingo_jax/configs/lm_pretrain.py --workdir=workdir/stage2 \
    --config.input.tokenizer=workdir/tokenizer.model
Text of captions (shapes_pairs) and documents (shapes_interleaved), plus `copy_tokens` runs (random
text pieces repeated): the in-context copying (induction heads) that few-shot naming needs, which a
large LM gets from web text and this one did not get from the demo's text in a CPU budget (copy
gain, eval/copying.py: 0.36 nats after the earlier text-only stage 2, 5.95 now). Sequences keep
their `<image>` tokens, which the plain LM embeds with its new rows and never predicts.
flamingo_jax/demo/run.py writes the plain LM as the `{'lm': ...}` checkpoint that stage 3's
config.lm_init loads (in any xattn placement).
`:short` (the end-to-end test's) quarters the captions' and documents' batches and makes the
copies 40 tokens long (not 64), but keeps the copies' batch and the 800 steps: induction heads form
between steps ~500 and ~700 (copy gain 0.7 nats after 500 steps, 5.9 after 800; with half text
batches, 0.25 after 650 with 64-token copies and 3.41 after 800 with 40-token ones; with `:short`'s
quarter batches and 40-token copies, 2.99 after 800; docs/DEMO_RESULTS.md).
"""
import ml_collections

from flamingo_jax.configs import common
from flamingo_jax.configs import demo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  short = common.parse_arg(arg, short=False).short
  config = demo.training(total_steps=800, lr=1e-3, short=short)
  config.model_name = "lm"
  config.model = ml_collections.ConfigDict(demo.lm(xattn=False))
  config.image_size = demo.IMAGE_SIZE
  config.schedule = [(".*", {})]
  config.optim.no_decay = r"norm|embed"
  text_div, copy_len = (4, 40) if short else (1, 64)
  config.input = ml_collections.ConfigDict(dict(
      kind="tfds", tokenizer="", num_workers=2,
      # cache: the small datasets are read once into memory (reading a record costs more than
      # its pp).
      datasets=dict(
          captions=dict(tfds_name="shapes_pairs", split="train", batch_size=32 // text_div,
                        weight=0.5, cache=True,
                        pp="tokenize_pair(max_len=32)"),  # Images pass through unused.
          documents=dict(tfds_name="shapes_interleaved", split="train",
                         batch_size=16 // text_div, weight=1.0, cache=True,
                         pp="tokenize_document(max_len=96, max_media=5)"),
          copies=dict(tfds_name="shapes_pairs", split="train", batch_size=32, weight=1.0,
                      cache=True,
                      pp=f"copy_tokens(max_len={copy_len}, min_period=4, max_period=16)"),
      ),
  ))
  return config
