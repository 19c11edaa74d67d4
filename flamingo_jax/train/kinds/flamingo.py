"""Flamingo (paper §3): next-token NLL over the target tokens of interleaved sequences.

The frozen vision encoder and LM come from their own checkpoints and are never in the train state.
`config.vision_init` is a params checkpoint (`checkpoint.save_params`) holding `{'vision': ...}`.
`config.lm_init` is either a params checkpoint holding `{'lm': ...}` (the demo's stage 2 writes
one) or a converter's output directory (`python -m flamingo_jax.convert hf --dst D`: D/params and
D/lm_config.json, whose fields that change the LM's outputs must equal config.model.lm's). The LM
may be stored in any layer layout, the plain LM's or grouped for any xattn placement (as older
checkpoints are): it is regrouped for this model's at load (`models/lm.py:to_layout`).
"""
from absl import logging
from etils import epath
import jax
import jax.numpy as jnp

from flamingo_jax.models import flamingo
from flamingo_jax.models import losses
from flamingo_jax.models import lm as lm_lib
from flamingo_jax.train import checkpoint as ckpt_lib
from flamingo_jax.train import state as state_lib

BACKBONES = (("vision_init", "vision/"), ("lm_init", "lm/"))  # Frozen parts with their own ckpts.


def model(config):
  for field, _ in BACKBONES:
    if config.get(field) and not epath.Path(config[field]).exists():
      raise FileNotFoundError(f"config.{field}={config[field]!r}: no checkpoint there.")
  return flamingo.from_config(config.model)


def init_inputs(config):
  return (jnp.zeros((1, 1, 1, config.image_size, config.image_size, 3)),
          jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32))


def apply(module, params, batch):
  """The model on a batch of images, or of their precomputed frozen 'features' [B, N, T, S, C]
  (the demo's feature cache, flamingo_jax/demo/features.py)."""
  return module.apply({"params": params}, batch.get("images"), batch["tokens"], batch["media_idx"],
                      features=batch.get("features"))


LOSS_NORMALIZATIONS = ("token", "sequence")


def loss(logits, batch, normalization: str = "token"):
  """(NLL sum, weight, {}): the dataset's loss is the sum over microbatches of the first divided
  by that of the weight, so either way microbatching is exact.

  normalization (config.input.loss_normalization): 'token', weight = the number of target tokens
  (the mean NLL per token); 'sequence', weight = the number of sequences with a target: the
  paper's Eq. (2), the batch mean of each sequence's summed NLL: the objective its λ were set
  for, where a 256-token document weighs more than a short caption.
  """
  if normalization not in LOSS_NORMALIZATIONS:
    raise ValueError(f"config.input.loss_normalization={normalization!r}; expected one of "
                     f"{LOSS_NORMALIZATIONS}.")
  counted = batch["loss_mask"][:, 1:]  # Target tokens...
  if normalization == "sequence":
    counted = jnp.any(counted > 0, axis=1)  # ... or sequences that have one.
  return (losses.next_token_nll(logits, batch["tokens"], batch["loss_mask"]),
          jnp.sum(counted, dtype=jnp.float32), {})


def load_backbones(config, trainable, frozen):
  """Frozen parts from their checkpoints, on the shardings of `frozen`. Trainable leaves that a
  backbone checkpoint also holds (stage 2's `lm/new_token_embed` rows for <image> and <EOC>) start
  from it, so that with gates at 0 the model is exactly the LM that was trained, new tokens
  included."""
  for field, prefix in BACKBONES:
    if not config.get(field):
      logging.warning("config.%s is not set: %s* is randomly initialised.", field, prefix)
      continue
    load = _load_lm if field == "lm_init" else _load_vision
    loaded, in_trainable = load(config, trainable, frozen), state_lib.flat(trainable)
    carried = {p: x for p, x in loaded.items() if p in in_trainable}
    trainable = state_lib.merge(trainable, state_lib.unflat(carried))
    frozen = state_lib.merge(frozen, state_lib.unflat(
        {p: x for p, x in loaded.items() if p not in carried}))
  return trainable, frozen


FEATURE_MEAN = "resampler/feature_mean"


def init_from_data(config, module, trainable, frozen, batches):
  """`trainable` with the leaves that are statistics of the data set from the first step's
  `batches` (a fresh run's; a resumed or `init_from` run has them in its checkpoint): the
  Perceiver's `feature_mean` (model.resampler.center_features) is the per-position mean of the
  frozen encoder's features over every real (unpadded) image or frame in them."""
  leaves = state_lib.flat(trainable)
  if FEATURE_MEAN not in leaves:
    return trainable
  params = state_lib.merge(trainable, frozen)

  @jax.jit
  def sums(p, batch):  # -> (sum of the features [S, C], their number): real media only.
    feats = batch.get("features")
    if feats is None:
      feats = module.apply({"params": p}, batch["images"], method=module.vision_features)
    real = batch["media_mask"][:, :, None, None, None].astype(jnp.float32)
    return jnp.sum(feats.astype(jnp.float32) * real, axis=(0, 1, 2)), jnp.sum(real) * feats.shape[2]

  total, count = 0.0, 0.0
  for batch in batches.values():
    s, n = sums(params, batch)
    total, count = total + s, count + n
  if float(count) == 0:
    raise ValueError(f"model.resampler.center_features: the first batches of "
                     f"{sorted(batches)} hold no real image (media_mask all False), so there is "
                     "no feature mean to centre on.")
  target = leaves[FEATURE_MEAN]
  if total.shape != target.shape:
    raise ValueError(f"model.resampler.center_features: the encoder gives [S, C] = "
                     f"{list(total.shape)} features per frame in the data, but the resampler was "
                     f"built for {list(target.shape)} (config.image_size).")
  mean = jax.device_put((total / count).astype(target.dtype), target.sharding)
  logging.info("%s set from %d frames: RMS %.4g.", FEATURE_MEAN, int(count),
               float(jnp.sqrt(jnp.mean(mean ** 2))))
  return state_lib.merge(trainable, state_lib.unflat({FEATURE_MEAN: mean}))


def _abstract(x) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def _load_vision(config, trainable, frozen) -> dict:
  """{path: array} of config.vision_init: every frozen vision leaf and the trainable ones it has."""
  stored = ckpt_lib.stored_leaves(config.vision_init)
  part = {p: x for p, x in state_lib.flat(frozen).items() if p.startswith("vision/")}
  part |= {p: x for p, x in state_lib.flat(trainable).items()
           if p.startswith("vision/") and p in stored}
  abstract = state_lib.unflat({p: _abstract(x) for p, x in part.items()})
  return state_lib.flat(ckpt_lib.load_params(config.vision_init, abstract))


def _lm_checkpoint(config) -> tuple[epath.Path, str]:
  """(params checkpoint, path of the LM tree in it) of config.lm_init. A converter's directory
  says which LM it holds: config.model.lm must agree wherever that changes the LM's outputs."""
  path = epath.Path(config.lm_init)
  if not (path / ckpt_lib.LM_CONFIG).exists():
    return path, "lm/"
  stored = lm_lib.forward_fields(ckpt_lib.read_lm_config(path))
  wanted = lm_lib.forward_fields(flamingo.lm_config(config.model))
  differ = [f"{k}: {stored[k]!r} in {ckpt_lib.LM_CONFIG}, {wanted[k]!r} in config.model.lm"
            for k in wanted if k in stored and stored[k] != wanted[k]]
  if differ:
    raise ValueError(f"config.lm_init={config.lm_init!r} holds another LM than config.model.lm: "
                     f"set these fields as its {ckpt_lib.LM_CONFIG} has them.\n  "
                     + "\n  ".join(differ))
  return path / ckpt_lib.LM_PARAMS, ""


def _stored_lm(config, path: epath.Path, root: str) -> dict[str, jax.ShapeDtypeStruct]:
  """{path in the LM tree: shape and dtype} of the LM at `root` in the checkpoint at `path`."""
  leaves = ckpt_lib.stored_leaves(path)
  outside = sorted(p for p in leaves if not p.startswith(root))
  if outside:
    raise ckpt_lib.ShapeMismatchError(
        f"config.lm_init={config.lm_init!r} holds {outside[:3]}...: expected a tree "
        "{'lm': the LM's parameters} or a converter's output directory.")
  return {p[len(root):]: jax.ShapeDtypeStruct(m.shape, m.dtype) for p, m in leaves.items()}


def _restacked(x, axes: int, stored_axes: int) -> jax.sharding.Sharding:
  """The sharding of model leaf `x` (`axes` leading layer axes) for a stored leaf of the same
  layer parameter with `stored_axes`: layer axes unsharded, the rest as the model shards them."""
  if not isinstance(x.sharding, jax.sharding.NamedSharding):
    return x.sharding  # One device: any shape.
  spec = tuple(x.sharding.spec) + (None,) * (len(x.shape) - len(x.sharding.spec))
  return jax.sharding.NamedSharding(x.sharding.mesh,
                                    jax.sharding.PartitionSpec(*[None] * stored_axes, *spec[axes:]))


def _check_lm_shapes(config, stored: dict, model: dict, trainable: set[str]) -> None:
  """Raises naming each leaf of the stored LM that is missing, unexpected or shaped differently
  from the model's, compared in the plain layout; trainable leaves may be missing."""
  plain = lambda leaves: state_lib.flat(jax.eval_shape(lm_lib.to_plain, state_lib.unflat(leaves)))
  try:
    have = plain(stored)
  except ValueError as e:
    raise ValueError(f"config.lm_init={config.lm_init!r}: {e}") from e
  want = {p: s for p, s in plain(model).items() if p in have or p not in trainable}
  problems = ckpt_lib.shape_problems(have, want)
  if problems:
    raise ckpt_lib.ShapeMismatchError(
        f"config.lm_init={config.lm_init!r} does not fit config.model.lm ({len(problems)} "
        "problems; layer stacks compared as the plain LM's [num_layers, ...]):\n  "
        + "\n  ".join(problems))


def _restore_abstract(stored: dict, model: dict) -> dict:
  """{stored path: ShapeDtypeStruct} of the stored LM's leaves but xattn blocks, in the dtypes of
  the model's leaves of the same parameters and sharded as they are."""
  model_leaf = {}  # Plain path -> (a model leaf of that parameter, its leading layer axes).
  for p, x in model.items():
    key, axes = lm_lib.plain_path(p)
    model_leaf.setdefault(key, (x, axes))
  abstract = {}
  for p, s in stored.items():
    key, axes = lm_lib.plain_path(p)
    if key is not None:
      x, model_axes = model_leaf[key]
      abstract[p] = jax.ShapeDtypeStruct(s.shape, x.dtype, sharding=_restacked(x, model_axes, axes))
  return abstract


def _load_lm(config, trainable, frozen) -> dict:
  """{path: array} of config.lm_init (see the module docstring) in this model's layout and on its
  shardings: every frozen LM leaf, and the trainable ones the checkpoint has (new-token rows; not
  xattn blocks, which belong to a placement)."""
  path, root = _lm_checkpoint(config)
  stored = _stored_lm(config, path, root)
  in_lm = lambda tree: {p[len("lm/"):]: x for p, x in state_lib.flat(tree).items()
                        if p.startswith("lm/")}
  model = in_lm(state_lib.merge(trainable, frozen))
  _check_lm_shapes(config, stored, model, set(in_lm(trainable)))
  abstract = _restore_abstract(stored, model)
  if len(abstract) < len(stored):
    logging.warning("config.lm_init holds xattn blocks: not loaded (they train; config.init_from "
                    "starts them from a checkpoint).")
  restored = ckpt_lib.restore_leaves(path, state_lib.unflat(
      {root + p: x for p, x in abstract.items()}))
  tree = state_lib.unflat({p[len(root):]: x for p, x in state_lib.flat(restored).items()})
  relayout = lambda t: lm_lib.to_layout(t, flamingo.lm_config(config.model))
  shardings = {p: model[p].sharding for p in state_lib.flat(jax.eval_shape(relayout, tree))}
  relaid = jax.jit(relayout, out_shardings=state_lib.unflat(shardings))(tree)
  return {f"lm/{p}": x for p, x in state_lib.flat(relaid).items()}


def gate_layers(config):
  return lm_lib.xattn_layer_indices(flamingo.lm_config(config.model))
