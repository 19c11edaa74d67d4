"""Evaluation of a training run's newest checkpoint: `launch.py --mode=eval` (same config flags).

- Flamingo (`model_name='flamingo'`): the few-shot tasks of `config.eval` on shapes_fewshot TEST
  splits (fewshot.py): accuracy per k with chance for `names`, VQA accuracy / CIDEr-D otherwise.
- Contrastive (`model_name='contrastive'`): zero-shot retrieval recall@k on `config.eval.split`.
- Plain LM (`model_name='lm'`): in-context copying of repeated random tokens (copying.py), the
  ability that Flamingo's few-shot learning takes from its frozen LM.
Results go to workdir/eval.json and are returned.
"""
import json

from etils import epath
import jax
import numpy as np

from flamingo_jax import paths
from flamingo_jax.data import mixture
from flamingo_jax.data import pp
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.eval import copying
from flamingo_jax.eval import fewshot
from flamingo_jax.models import contrastive
from flamingo_jax.train import checkpoint as ckpt_lib
from flamingo_jax.train import kinds
from flamingo_jax.train import sharding as sharding_lib
from flamingo_jax.train import state as state_lib
from flamingo_jax.train import trainer


def load(config, workdir: str):
  """(model, params) of the newest checkpoint in workdir/checkpoints, frozen backbones included."""
  kind = kinds.get(config.model_name)
  model = kind.model(config)
  mesh = sharding_lib.make_mesh(config.mesh)
  weights = {name: float(d.get("weight", 1.0)) for name, d in config.input.datasets.items()}
  setup = trainer.make_setup(config, model, mesh, weights)
  trainable, frozen = jax.jit(setup.init, out_shardings=(setup.state_sh["params"],
                                                         setup.frozen_sh))(jax.random.PRNGKey(0))
  _, frozen = kind.load_backbones(config, trainable, frozen)
  manager = ckpt_lib.make_manager(workdir, config)
  restored = ckpt_lib.restore_latest(manager, setup.abstract_state)
  manager.close()
  if restored is None:
    raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints: train first (same config).")
  return model, state_lib.merge(restored[0]["params"], frozen)


def _records(name: str, split: str, limit: int | None = None) -> list[dict]:
  source = mixture.open_source(name, split)
  return [source[i] for i in range(min(len(source), limit or len(source)))]


def retrieval(config, model, params) -> dict[str, float]:
  """Zero-shot image<->text retrieval recall@1/5 over the whole eval split (one batch)."""
  fn = pp.build(config.eval.pp, tokenizer_lib.load_tokenizer(config.input.tokenizer))
  examples = [fn(dict(ex)) for ex in _records(config.eval.tfds_name, config.eval.split)]
  images = np.stack([ex["images"][0, 0] for ex in examples])
  tokens = np.stack([ex["tokens"] for ex in examples])
  img, txt, _ = jax.jit(model.apply)({"params": params}, images, tokens)
  return {k: float(v) for k, v in contrastive.retrieval_recall(img, txt).items()}


def few_shot(config, model, params) -> dict[str, dict[str, float]]:
  """{task: {'<metric>/<k>shot': value, 'chance'?: value}} on the TEST splits."""
  tokenizer = tokenizer_lib.load_tokenizer(config.input.tokenizer)
  resize = pp.build(f"resize_pad({config.image_size})|value_range(-1, 1)")
  preprocess = lambda images: resize({"images": np.asarray(images)})["images"]
  e = config.eval
  results = {}
  for task in e.tasks:
    name = f"shapes_fewshot/{task}"
    if task == "names":
      data, options = {"test": _records(name, "test", e.num_episodes)}, {}
    else:
      data = {"train": _records(name, "train"), "test": _records(name, "test", e.num_queries)}
      options = dict(beam_size=e.beam_size, max_new_tokens=e.max_new_tokens)
    results[task] = fewshot.evaluate_task(task, model, params, tokenizer, data, e.shots,
                                          preprocess=preprocess, **options)
  return results


def evaluate(config, workdir: str) -> dict:
  """Evaluates workdir's newest checkpoint as its model kind asks; writes workdir/eval.json."""
  config, workdir = paths.resolve_config(config), paths.resolve(workdir)
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
