"""Evaluation of a training run's newest checkpoint (`launch.py --mode=eval`), and during training.

- Flamingo (`model_name='flamingo'`): the runs of `config.evals` (`{name: {type, ...}}`), each a
  task of tasks.py's registry: the published benchmarks (protocol.py, from the files benchmarks.py
  reads) or a module's own (the demo's shapes tasks). fewshot.py holds the prompting, generation
  and scoring they share. `every_steps` > 0 also runs one inside the training loop (`periodic`).
- Contrastive (`model_name='contrastive'`): zero-shot retrieval recall@k on `config.eval.split`.
- Plain LM (`model_name='lm'`): in-context copying of repeated random tokens (copying.py), the
  ability that Flamingo's few-shot learning takes from its frozen LM.
Results go to workdir/eval.json and TensorBoard (workdir/tensorboard, as `eval/<name>/<metric>` at
the checkpoint's step) and are returned.
"""
import dataclasses
import json
import os
from typing import Callable

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from flamingo_jax import modules
from flamingo_jax import paths
from flamingo_jax.data import mixture
from flamingo_jax.data import pp
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.eval import copying
from flamingo_jax.eval import protocol  # noqa: F401  (registers the benchmark tasks)
from flamingo_jax.eval import tasks
from flamingo_jax.models import contrastive
from flamingo_jax.train import checkpoint as ckpt_lib
from flamingo_jax.train import kinds
from flamingo_jax.train import metrics as metrics_lib
from flamingo_jax.train import sharding as sharding_lib
from flamingo_jax.train import state as state_lib
from flamingo_jax.train import trainer


def load(config, workdir: str, with_step: bool = False):
  """(model, params) of the newest checkpoint in workdir/checkpoints, frozen backbones included;
  with_step: (model, params, its step).

  A directory without checkpoints whose config names `init_from` (a converted model directory,
  configs/converted.py) gives those trainable parameters, as a fresh training run starts (step 0).
  """
  trained = (epath.Path(workdir) / "checkpoints").is_dir()  # Before the manager would create it.
  if not trained and not config.get("init_from"):
    raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints: train first (same config).")
  kind = kinds.get(config.model_name)
  model = kind.model(config)
  mesh = sharding_lib.make_mesh(config.mesh)
  weights = {name: float(d.get("weight", 1.0)) for name, d in config.input.datasets.items()}
  setup = trainer.make_setup(config, model, mesh, weights)
  _, frozen = trainer.initial_params(config, kind, setup, jax.random.PRNGKey(0),
                                     init_trainable=False)  # The checkpoint has the trainable.
  if not trained:
    trainable = ckpt_lib.load_params(config.init_from, setup.abstract_state["params"])
    return (model, state_lib.merge(trainable, frozen)) + ((0,) if with_step else ())
  manager = ckpt_lib.make_manager(workdir, config)
  restored = ckpt_lib.restore_latest(manager, setup.abstract_state)
  manager.close()
  if restored is None:
    raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints: train first (same config).")
  params = state_lib.merge(restored[0]["params"], frozen)
  step = int(jax.device_get(restored[0]["step"]))
  return (model, params) + ((step,) if with_step else ())


def records(name: str, split: str, limit: int | None = None) -> list[dict]:
  """The first `limit` (default all) records of a TFDS split, decoded."""
  source = mixture.open_source(name, split)
  return [source[i] for i in range(min(len(source), limit or len(source)))]


def retrieval(config, model, params) -> dict[str, float]:
  """Zero-shot image<->text retrieval recall@1/5 over the whole eval split (one batch)."""
  fn = pp.build(config.eval.pp, tokenizer_lib.load_tokenizer(config.input.tokenizer))
  examples = [fn(dict(ex)) for ex in records(config.eval.tfds_name, config.eval.split)]
  images = np.stack([ex["images"][0, 0] for ex in examples])
  tokens = np.stack([ex["tokens"] for ex in examples])
  img, txt, _ = jax.jit(model.apply)({"params": params}, images, tokens)
  return {k: float(v) for k, v in contrastive.retrieval_recall(img, txt).items()}


def preprocess_fn(config) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 images [..., H, W, 3] -> the model's pixels [..., S, S, 3], by the run's image pp."""
  fn = pp.build(pp.image_spec(config).removeprefix("decode|"))

  def preprocess(images):
    images = np.asarray(images)
    flat = fn({"images": images.reshape(-1, *images.shape[-3:])})["images"]
    return np.asarray(flat).reshape(*images.shape[:-3], *flat.shape[1:])
  return preprocess


def context(config, model, params, workdir: str) -> tasks.Context:
  return tasks.Context(model, params, tokenizer_lib.load_tokenizer(config.input.tokenizer),
                       preprocess_fn(config), os.path.join(workdir, "eval_cache"), config,
                       os.path.join(workdir, "eval_predictions"))


def _run(name: str, task, ctx: tasks.Context) -> dict[str, float]:
  """Run `name` of config.evals; its predictions go to WORKDIR/eval_predictions/<name>/, so two
  runs of one task type keep theirs apart."""
  ctx = dataclasses.replace(ctx, predictions_dir=os.path.join(ctx.predictions_dir, name))
  return tasks.get(task.type)(task, ctx)


def selected(config, only=None) -> dict[str, ml_collections.ConfigDict]:
  """config.evals (or its entries named in `only`), each checked before anything is computed."""
  evals = dict(config.get("evals") or {})
  unknown = sorted(set(only or ()) - set(evals))
  if unknown:
    raise ValueError(f"Evals {unknown} are not in config.evals (it has {sorted(evals)}).")
  evals = {name: task for name, task in evals.items() if not only or name in only}
  if evals and not config.input.get("tokenizer"):
    raise ValueError("config.input.tokenizer is required by config.evals (prompts are text); set "
                     "it to the model's tokenizer.")
  for name, task in evals.items():
    tasks.check(task, f"config.evals.{name}")
  return evals


def configure(config, benchmarks=(), **fields) -> ml_collections.ConfigDict:
  """A copy of config with a run per benchmark ('NAME:DIR', launch.py's --benchmark) added to
  config.evals, and the fields given (not None; e.g. shots, seeds) set on every run."""
  config = ml_collections.ConfigDict(config.to_dict())  # Unlocked, and the caller's stays as is.
  if benchmarks and config.get("model_name", "flamingo") != "flamingo":
    raise ValueError(f"--benchmark: model_name={config.model_name!r} has no few-shot evals.")
  if "evals" not in config:
    config.evals = ml_collections.ConfigDict()
  for spec in benchmarks:
    name, sep, data_dir = spec.partition(":")
    if not sep or not name or not data_dir:
      raise ValueError(f"--benchmark={spec!r}: expected NAME:DIR, e.g. coco:/data/coco.")
    config.evals[name] = ml_collections.ConfigDict(dict(type=name, data_dir=data_dir))
  for task in config.evals.values():
    task.update({k: v for k, v in fields.items() if v is not None})
  return config


def few_shot(config, model, params, workdir: str, evals) -> dict[str, dict[str, float]]:
  """{name: {'<metric>/<k>shot': value, ...}} for each of `evals` (from `selected`)."""
  if not evals:
    raise ValueError("config.evals is empty: nothing to evaluate. Add a benchmark, e.g. "
                     "launch.py --mode=eval --benchmark=coco:/data/coco.")
  ctx = context(config, model, params, workdir)
  return {name: _run(name, task, ctx) for name, task in evals.items()}


def periodic(config, workdir: str) -> Callable[[int, dict], dict[str, float]] | None:
  """The in-training evals (config.evals entries with every_steps > 0) as `fn(step, params) ->
  {'eval/<name>/<metric>': value}` for the trainer, or None when there are none. Their fields are
  checked now, before training starts."""
  config, workdir = paths.resolve_config(config), paths.resolve(workdir)
  modules.import_modules(config)
  due = [name for name, task in (config.get("evals") or {}).items() if task.get("every_steps")]
  if not due:
    return None
  due = selected(config, due)  # Runs for --mode=eval only may leave their files unset.
  # Tokenizer and preprocessing once; each evaluation brings the current parameters.
  base = context(config, kinds.get(config.model_name).model(config), None, workdir)

  def run(step: int, params) -> dict[str, float]:
    out = {}
    ctx = dataclasses.replace(base, params=params)
    for name, task in due.items():
      if step % task.every_steps and step != config.total_steps:
        continue
      logging.info("Eval %s at step %d.", name, step)
      out.update({f"eval/{name}/{k}": v for k, v in _run(name, task, ctx).items()})
    return out
  return run


def _write(workdir: str, results: dict, step: int) -> None:
  """workdir/eval.json, and TensorBoard scalars at `step` (process 0 only)."""
  if jax.process_index():
    return
  (epath.Path(workdir) / "eval.json").write_text(json.dumps(results, indent=2))
  with metrics_lib.summary_writer(f"{workdir}/tensorboard") as writer:
    for name, values in results.items():
      for metric, value in values.items():
        writer.add_scalar(f"eval/{name}/{metric}", float(value), step)


def evaluate(config, workdir: str, only=None) -> dict:
  """Evaluates workdir's newest checkpoint as its model kind asks (Flamingo: config.evals, or the
  runs named in `only`); writes workdir/eval.json and TensorBoard."""
  config, workdir = paths.resolve_config(config), paths.resolve(workdir)
  modules.import_modules(config)
  if config.model_name == "flamingo":
    evals = selected(config, only)  # Bad fields and missing files stop here, before loading.
  model, params, step = load(config, workdir, with_step=True)
  if config.model_name == "contrastive":
    results = {"retrieval": retrieval(config, model, params)}
  elif config.model_name == "flamingo":
    results = few_shot(config, model, params, workdir, evals)
  elif config.model_name == "lm":
    logits_fn = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    results = {"copying": copying.evaluate(
        logits_fn, tokenizer_lib.load_tokenizer(config.input.tokenizer))}
  else:
    raise ValueError(f"--mode=eval: nothing to evaluate for model_name={config.model_name!r}.")
  _write(workdir, results, step)
  return results
