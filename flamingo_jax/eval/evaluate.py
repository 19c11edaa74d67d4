"""Evaluation of a training run's newest checkpoint: `launch.py --mode=eval` (same config flags).

- Flamingo (`model_name='flamingo'`): the few-shot tasks named in `config.eval.tasks`, found in the
  registry of tasks.py (fewshot.py holds the prompting, generation and scoring they share).
- Contrastive (`model_name='contrastive'`): zero-shot retrieval recall@k on `config.eval.split`.
- Plain LM (`model_name='lm'`): in-context copying of repeated random tokens (copying.py), the
  ability that Flamingo's few-shot learning takes from its frozen LM.
Results go to workdir/eval.json and are returned.
"""
import json

from etils import epath
import jax
import numpy as np

from flamingo_jax import modules
from flamingo_jax import paths
from flamingo_jax.data import mixture
from flamingo_jax.data import pp
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.eval import copying
from flamingo_jax.eval import tasks
from flamingo_jax.models import contrastive
from flamingo_jax.train import checkpoint as ckpt_lib
from flamingo_jax.train import kinds
from flamingo_jax.train import sharding as sharding_lib
from flamingo_jax.train import state as state_lib
from flamingo_jax.train import trainer


def load(config, workdir: str):
  """(model, params) of the newest checkpoint in workdir/checkpoints, frozen backbones included.

  A directory without checkpoints whose config names `init_from` (a converted model directory,
  configs/converted.py) gives those trainable parameters, as a fresh training run starts.
  """
  trained = (epath.Path(workdir) / "checkpoints").is_dir()  # Before the manager would create it.
  if not trained and not config.get("init_from"):
    raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints: train first (same config).")
  kind = kinds.get(config.model_name)
  model = kind.model(config)
  mesh = sharding_lib.make_mesh(config.mesh)
  weights = {name: float(d.get("weight", 1.0)) for name, d in config.input.datasets.items()}
  setup = trainer.make_setup(config, model, mesh, weights)
  trainable, frozen = jax.jit(setup.init, out_shardings=(setup.state_sh["params"],
                                                         setup.frozen_sh))(jax.random.PRNGKey(0))
  _, frozen = kind.load_backbones(config, trainable, frozen)
  if not trained:
    trainable = ckpt_lib.load_params(config.init_from, setup.abstract_state["params"])
    return model, state_lib.merge(trainable, frozen)
  manager = ckpt_lib.make_manager(workdir, config)
  restored = ckpt_lib.restore_latest(manager, setup.abstract_state)
  manager.close()
  if restored is None:
    raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints: train first (same config).")
  return model, state_lib.merge(restored[0]["params"], frozen)


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


def few_shot(config, model, params) -> dict[str, dict[str, float]]:
  """{task: {'<metric>/<k>shot': value, 'chance'?: value}} for each of config.eval.tasks."""
  tokenizer = tokenizer_lib.load_tokenizer(config.input.tokenizer)
  return {name: tasks.get(name)(config, model, params, tokenizer) for name in config.eval.tasks}


def evaluate(config, workdir: str) -> dict:
  """Evaluates workdir's newest checkpoint as its model kind asks; writes workdir/eval.json."""
  config, workdir = paths.resolve_config(config), paths.resolve(workdir)
  modules.import_modules(config)
  model, params = load(config, workdir)
  if config.model_name == "contrastive":
    results = {"retrieval": retrieval(config, model, params)}
  elif config.model_name == "flamingo":
    results = few_shot(config, model, params)
  elif config.model_name == "lm":
    logits_fn = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    results = {"copying": copying.evaluate(
        logits_fn, tokenizer_lib.load_tokenizer(config.input.tokenizer))}
  else:
    raise ValueError(f"--mode=eval: nothing to evaluate for model_name={config.model_name!r}.")
  if jax.process_index() == 0:
    (epath.Path(workdir) / "eval.json").write_text(json.dumps(results, indent=2))
  return results
