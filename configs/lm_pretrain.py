"""The demo's stage 2: next-token pretraining of the plain decoder on the embedded dataset's text.

  python launch.py --config=configs/lm_pretrain.py --workdir=workdir/stage2 \
    --config.input.tokenizer=workdir/tokenizer.model
Text of captions (shapes_pairs), documents (shapes_interleaved) and name episodes (`name_episode`
documents: fresh made-up names repeated in context). Sequences keep their `<image>` tokens, which
the plain LM embeds with its new rows and never predicts. flamingo_jax/demo.py writes the LM in
stage 3's layer layout as the `{'lm': ...}` checkpoint that config.lm_init loads.
`:short` is the end-to-end test's shortened run.
"""
import ml_collections

from configs import demo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  short = arg == "short"
  config = demo.training(total_steps=80 if short else 300, lr=3e-3, short=short)
  config.model_name = "lm"
  config.model = ml_collections.ConfigDict(demo.lm(xattn=False))
  config.image_size = demo.IMAGE_SIZE
  config.schedule = [(".*", {})]
  config.optim.no_decay = r"norm|embed"
  config.input = ml_collections.ConfigDict(dict(
      kind="tfds", tokenizer="", num_workers=2,
      datasets=dict(
          captions=dict(tfds_name="shapes_pairs", split="train", batch_size=32, weight=0.5,
                        pp="tokenize_pair(max_len=32)"),  # Images pass through unused.
          documents=dict(tfds_name="shapes_interleaved", split="train", batch_size=16,
                         weight=1.0, pp="tokenize_document(max_len=96, max_media=5)"),
          names=dict(tfds_name="shapes_fewshot/names", split="train", batch_size=16,
                     weight=1.0, cache=True,
                     pp="name_episode(16)|tokenize_document(max_len=160, max_media=16)"),
      ),
  ))
  return config
