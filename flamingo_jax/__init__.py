"""Flamingo visual language models in JAX/Flax. `flamingo_jax.load(workdir)` loads a trained
model to ask about images (predict.py); it is imported on first use, so `import flamingo_jax`
stays cheap."""


def __getattr__(name: str):
  if name == "load":
    from flamingo_jax import predict  # pylint: disable=g-import-not-at-top
    return predict.load
  raise AttributeError(f"module 'flamingo_jax' has no attribute {name!r}")
