"""What the trainer trains, selected by `config.model_name` (big_vision style: a module per kind).

Each module exposes
  model(config) -> nn.Module                     (raises on bad sizes)
  init_inputs(config) -> tuple                   (dummy inputs for model.init; shapes only matter)
  apply(model, params, batch) -> outputs
  loss(outputs, batch) -> (loss sum, weight, metrics): the dataset's loss is the sum over
      microbatches of `loss sum` divided by that of `weight` (e.g. target tokens), so
      microbatching keeps a token mean exact.
  load_backbones(config, trainable, frozen) -> (trainable, frozen)   (parts with their own ckpts;
      leaves may be ShapeDtypeStructs with shardings: those it loads come back as arrays)
  gate_layers(config) -> [int]                   (LM layers with a gated xattn block, for metrics)
  init_from_data(config, model, trainable, frozen, batches) -> trainable
                                                 (leaves that are statistics of the data, set from
      the first step's batches of a fresh run; the others return trainable)
"""
import importlib

KINDS = ("flamingo", "lm", "contrastive")


def get(name: str):
  if name not in KINDS:
    raise ValueError(f"config.model_name={name!r}; expected one of {KINDS}.")
  return importlib.import_module(f"flamingo_jax.train.kinds.{name}")
