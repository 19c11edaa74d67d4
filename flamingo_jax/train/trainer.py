"""The training loop (paper §3 / App. B.1.2), read top to bottom like big_vision's train.py.

logging → mesh → input → model, optimizer & step (`make_setup`, shared with AOT compilation in
aot.py) → init → checkpoint → update step → loop.

What is trained is selected by `config.model_name` ('flamingo' | 'lm' | 'contrastive', default
'flamingo'): a module of flamingo_jax/train/kinds/ gives the model, its loss and its backbones.

One update: for every dataset of the mixture, its loss (e.g. the mean next-token NLL over its target
tokens) and its gradient (summed over `config.microbatches`), weighted by λ and accumulated; then
one optimizer step ('accumulate', the paper's choice). `mixture_mode='round_robin'` (the paper's
ablation) uses one dataset per step in turn. Gradients are taken only w.r.t. the trainable subtree.
"""
import functools
import signal
import time
from typing import Any, Callable, NamedTuple

from absl import logging
from etils import epath
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
import jax.numpy as jnp
import numpy as np
import optax

from flamingo_jax import modules
from flamingo_jax import paths
from flamingo_jax.train import checkpoint as ckpt_lib
from flamingo_jax.train import input as input_lib
from flamingo_jax.train import kinds
from flamingo_jax.train import metrics as metrics_lib
from flamingo_jax.train import optim
from flamingo_jax.train import profiler as profiler_lib
from flamingo_jax.train import sharding as sharding_lib
from flamingo_jax.train import state as state_lib
from flamingo_jax.train import workdir_lock
from flamingo_jax.train.kinds import flamingo as flamingo_kind


def make_update_step(apply_fn, tx: optax.GradientTransformation, weights: dict[str, float],
                     microbatches: int, loss_fn=flamingo_kind.loss):
  """(train_state, frozen, {name: batch}) -> (train_state, metrics); see the module docstring.

  apply_fn(params, batch) -> outputs; loss_fn(outputs, batch) -> (loss sum, weight, metrics) (see
  kinds/__init__.py); gradients flow only into train_state['params'].
  """

  def dataset_loss_and_grad(params, frozen, batch):
    """sum(loss sum) / sum(weight) over microbatches, its gradient and the mean metrics."""

    def loss_and_aux(p, mb):
      total, weight, metrics = loss_fn(apply_fn(state_lib.merge(p, frozen), mb), mb)
      return total, (weight, metrics)

    value_and_grad = jax.value_and_grad(loss_and_aux, has_aux=True)
    if microbatches == 1:
      (total, (weight, metrics)), grads = value_and_grad(params, batch)
    else:
      # [B, ...] -> [k, B/k, ...] taking every k-th example, so each device keeps its own examples.
      k = microbatches
      mbs = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1),
                         batch)
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(value_and_grad, params,
                                                          jax.tree.map(lambda x: x[0], mbs)))
      acc = lambda carry, mb: (jax.tree.map(jnp.add, carry, value_and_grad(params, mb)), None)
      (total, (weight, metrics)), grads = jax.lax.scan(acc, zeros, mbs)[0]
      metrics = jax.tree.map(lambda m: m / k, metrics)
    weight = jnp.maximum(weight, 1.0)
    return total / weight, jax.tree.map(lambda g: g / weight, grads), metrics

  def update_step(train_state, frozen, batches):
    params = train_state["params"]
    measured, loss = {}, 0.0
    grads = jax.tree.map(jnp.zeros_like, params)
    for name, batch in batches.items():
      value, g, metrics = dataset_loss_and_grad(params, frozen, batch)
      measured[f"loss/{name}"] = value
      measured.update({f"{name}/{k}": v for k, v in metrics.items()})
      loss += weights[name] * value
      grads = jax.tree.map(lambda a, b, w=weights[name]: a + w * b, grads, g)
    updates, opt_state = tx.update(grads, train_state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    measured.update(loss=loss, grad_norm=optax.global_norm(grads),
                    param_norm=optax.global_norm(new_params),
                    update_norm=optax.global_norm(updates))
    return {**train_state, "step": train_state["step"] + 1, "params": new_params,
            "opt_state": opt_state}, measured

  return update_step


class Setup(NamedTuple):
  """What training and AOT compilation (aot.py) share, built from abstract shapes only."""
  init: Callable  # rng -> (trainable, frozen), frozen cast to config.frozen_dtype.
  tx: optax.GradientTransformation
  schedules: dict[str, optax.Schedule]  # Learning rate per parameter group.
  state_sh: dict  # Shardings of the train state {'step', 'rng', 'params', 'opt_state'}...
  frozen_sh: dict  # ... and of the frozen parameters.
  abstract_state: dict  # Their ShapeDtypeStructs, with those shardings.
  abstract_frozen: dict
  update: Any  # jitted (train_state, frozen, {name: batch}) -> (train_state, metrics); donates 0.


def make_setup(config, model: nn.Module, mesh: Mesh, weights: dict[str, float]) -> Setup:
  """The parameter groups, optimizer, shardings and jitted update step of `config` on `mesh`."""
  kind = kinds.get(config.model_name)
  # ----------------------------------------------------------------------- model & optimizer
  init_params = lambda rng: model.init(  # Parameter shapes do not depend on B, N, T or L.
      rng, *kind.init_inputs(config))["params"]
  boxed = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  rules = optim.param_rules(nn.unbox(boxed), config.schedule,
                            config.get("unfreeze", ()))
  is_trainable = optim.trainable_paths(rules).__contains__
  tx, schedules = optim.make_optimizer(config, rules)

  # ----------------------------------------------------------------------- shard
  shardings = sharding_lib.param_shardings(boxed, mesh, config.sharding_rules)
  train_sh, frozen_sh = state_lib.split(shardings, is_trainable)
  frozen_dtype = jnp.dtype(config.frozen_dtype) if config.get("frozen_dtype") else None
  cast = lambda x: x.astype(frozen_dtype) if frozen_dtype and jnp.issubdtype(
      x.dtype, jnp.floating) else x

  def init(rng):
    trainable, frozen = state_lib.split(nn.unbox(init_params(rng)), is_trainable)
    return trainable, jax.tree.map(cast, frozen)

  abstract_train, abstract_frozen = jax.eval_shape(init, jax.random.PRNGKey(0))
  abstract_opt = jax.eval_shape(tx.init, abstract_train)
  repl = sharding_lib.replicated(mesh)
  state_sh = {"step": repl, "rng": repl, "params": train_sh,
              "opt_state": optax.tree_map_params(tx, lambda _, s: s, abstract_opt, train_sh,
                                                 transform_non_params=lambda _: repl)}
  with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  abstract_state = jax.tree.map(
      with_sharding,
      {"step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
       "params": abstract_train, "opt_state": abstract_opt}, state_sh)

  # ----------------------------------------------------------------------- update step
  def apply_fn(params, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # For layers.constrain_batch.
      return kind.apply(model, params, batch)

  loss_fn = kind.loss
  if "loss_normalization" in config.get("input", {}):  # The paper's Eq. (2) (kinds/flamingo.py).
    if config.input.loss_normalization not in flamingo_kind.LOSS_NORMALIZATIONS:  # Before init.
      raise ValueError(f"config.input.loss_normalization={config.input.loss_normalization!r}; "
                       f"expected one of {flamingo_kind.LOSS_NORMALIZATIONS}.")
    loss_fn = functools.partial(kind.loss, normalization=config.input.loss_normalization)
  update = jax.jit(
      make_update_step(apply_fn, tx, weights, config.microbatches, loss_fn),
      in_shardings=(state_sh, frozen_sh, sharding_lib.batch_sharding(mesh)),
      out_shardings=(state_sh, repl), donate_argnums=0)
  return Setup(init, tx, schedules, state_sh, frozen_sh, abstract_state,
               jax.tree.map(with_sharding, abstract_frozen, frozen_sh), update)


def initial_params(config, kind, setup: Setup, rng, init_trainable: bool = True
                   ) -> tuple[dict, dict]:
  """(trainable, frozen) to start from: the leaves the backbones' checkpoints hold
  (`kind.load_backbones`), the rest from the model's init (trainable ones only with
  `init_trainable`; else left abstract, for a checkpoint to fill). One init, compiled only for the
  leaves it gives (JAX drops the rest): compiling the random initialisers of the whole tree took
  ~10 s of the demo's stage 3 and of each evaluation's load on 2 CPU cores, mostly for frozen
  backbones that the checkpoints then overwrote (docs/DEMO_RESULTS.md, 2026-12-06). Each leaf gets
  the value that one init of the whole tree would give it: flax draws a parameter from `rng` and
  its path alone.
  """
  loaded = kind.load_backbones(config, setup.abstract_state["params"], setup.abstract_frozen)
  trees = [state_lib.flat(tree) for tree in loaded]  # [trainable, frozen]
  missing = [[p for p, x in tree.items() if not isinstance(x, jax.Array)] for tree in trees]
  if not init_trainable:
    missing[0] = []
  if any(missing):
    def init_missing(r):
      made = [state_lib.flat(tree) for tree in setup.init(r)]
      return [{p: tree[p] for p in paths} for tree, paths in zip(made, missing)]
    shardings = [state_lib.flat(setup.state_sh["params"]), state_lib.flat(setup.frozen_sh)]
    made = jax.jit(init_missing, out_shardings=[
        {p: sh[p] for p in paths} for sh, paths in zip(shardings, missing)])(rng)
    trees = [tree | new for tree, new in zip(trees, made)]
  return state_lib.unflat(trees[0]), state_lib.unflat(trees[1])


class _Sigterm:
  """Remembers a SIGTERM so the loop can finish its step, save and exit 0."""

  def __init__(self):
    self.received = False
    # Several processes: JAX's preemption service (started by jax.distributed.initialize) holds
    # SIGTERM and agrees on a step across hosts; a Python handler would hide the signal from it.
    self._previous = (None if jax.process_count() > 1
                      else signal.signal(signal.SIGTERM, self._handle))

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: finishing this step, saving a checkpoint, then exiting.")
    self.received = True

  def stop(self, step: int) -> bool:
    if jax.process_count() > 1:  # JAX's preemption notifier sees SIGTERM; hosts agree on a step.
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train(config, workdir: str,
          evaluator: Callable[[int, Any], dict[str, float]] | None = None
          ) -> tuple[dict, dict, dict]:
  """Trains until config.total_steps (resuming from workdir).

  Returns (train state, frozen params, the last logged metrics), e.g. for a notebook. Relative
  paths (workdir and the config's, `paths.CONFIG_PATH_FIELDS`) are taken from the current directory.
  evaluator(step, params) -> scalars runs after every step and its scalars are logged with the
  metrics (`eval/evaluate.py:periodic` makes one of config.evals; launch.py passes it).
  """
  config, workdir = paths.resolve_config(config), paths.resolve(workdir)
  modules.import_modules(config)
  if epath.Path(workdir).exists() and not epath.Path(workdir).is_dir():
    raise NotADirectoryError(f"--workdir={workdir} is a file; expected a directory (new, or the "
                             "workdir of an earlier run to resume).")
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  with workdir_lock.WorkdirLock(workdir, config.get("lock_stale_after_s", 600)) as lock:
    if evaluator is None and any(t.get("every_steps") for t in config.get("evals", {}).values()):
      logging.warning("config.evals has runs with every_steps, but no evaluator was passed: they "
                      "do not run (launch.py passes eval/evaluate.py:periodic(config, workdir)).")
    return _train(config, workdir, lock, evaluator)


def _train(config, workdir: str, lock: workdir_lock.WorkdirLock,
           evaluator) -> tuple[dict, dict, dict]:
  """train() once the workdir is ours."""
  # ----------------------------------------------------------------------- logging
  logging.info("%d processes, %d devices (%s).", jax.process_count(), jax.device_count(),
               jax.devices()[0].device_kind)

  # ----------------------------------------------------------------------- mesh
  mesh = sharding_lib.make_mesh(config.mesh)
  logging.info("Mesh %s.", dict(mesh.shape))

  # ----------------------------------------------------------------------- input
  kind = kinds.get(config.model_name)
  model = kind.model(config)  # First: raises on bad sizes or missing backbone checkpoints.
  if config.get("init_from") and not epath.Path(config.init_from).exists():
    raise FileNotFoundError(f"config.init_from={config.init_from!r}: no parameter checkpoint "
                            "there (a checkpoint.save_params tree of the trainable parameters).")
  if config.mixture_mode not in ("accumulate", "round_robin"):
    raise ValueError(f"config.mixture_mode={config.mixture_mode!r}; expected 'accumulate' or "
                     "'round_robin'.")
  profiler = profiler_lib.StepProfiler(config.get("profile_steps"), workdir)
  data = input_lib.make_input(config, mesh)
  try:
    return _train_on(data, config, workdir, lock, evaluator, mesh, kind, model, profiler)
  finally:
    data.close()  # Its worker processes, if any, however the run ends (a setup error too).


def _train_on(data, config, workdir: str, lock: workdir_lock.WorkdirLock, evaluator, mesh: Mesh,
              kind, model, profiler: profiler_lib.StepProfiler) -> tuple[dict, dict, dict]:
  """_train() once its input is made: set up or resume, then the loop."""
  names = list(data.weights)

  # ----------------------------------------------------------------------- model, optimizer, step
  setup = make_setup(config, model, mesh, data.weights)
  tx, state_sh, abstract_state = setup.tx, setup.state_sh, setup.abstract_state

  # ----------------------------------------------------------------------- init
  rng = jax.random.PRNGKey(config.seed)
  trainable, frozen = initial_params(config, kind, setup, rng)  # Backbones: their checkpoints.

  # ----------------------------------------------------------------------- checkpoint (resume)
  manager = ckpt_lib.make_manager(workdir, config)
  first_batches, first_wait = None, 0.0
  restored = ckpt_lib.restore_latest(manager, abstract_state,
                                     config.get("start_over_if_unreadable", False))
  if restored is not None:
    train_state, data_state = restored
    data.set_state(data_state)
  else:
    if config.get("init_from"):
      trainable = ckpt_lib.load_params(config.init_from, abstract_state["params"])
    else:  # Statistics of the data (kinds/__init__.py), from the batches step 1 then trains on.
      waited = time.perf_counter()
      first_batches = next(data)
      first_wait = time.perf_counter() - waited
      trainable = kind.init_from_data(config, model, trainable, frozen, first_batches)
    train_state = jax.jit(
        lambda p: {"step": jnp.zeros((), jnp.int32), "rng": rng, "params": p,
                   "opt_state": tx.init(p)}, out_shardings=state_sh, donate_argnums=0)(trainable)
  del trainable
  first_step = int(jax.device_get(train_state["step"]))
  if jax.process_index() == 0:  # Only now: a failed resume leaves the workdir's record as it was.
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))

  # ----------------------------------------------------------------------- update step
  compiled = {}  # Dataset names -> the compiled step ('round_robin' has one per dataset).
  compile_seconds = {}
  flops_per_device = {}  # Model FLOPs of each compiled step (jaxpr count, remat excluded).

  def step_fn(train_state, batches):
    key = tuple(batches)
    if key not in compiled:
      logging.info("Compiling the update step for %s; this might take a few minutes...", key)
      start = time.perf_counter()
      compiled[key] = setup.update.lower(train_state, frozen, batches).compile()
      compile_seconds[key] = time.perf_counter() - start
      flops_per_device[key] = metrics_lib.step_flops(setup.update, train_state, frozen, batches,
                                                     num_devices=jax.device_count())
    return compiled[key](train_state, frozen, batches)

  # ----------------------------------------------------------------------- loop
  sigterm = _Sigterm()
  writer = metrics_lib.Writer(workdir, config.total_steps, first_step)
  xattn_layers = kind.gate_layers(config)
  peak = metrics_lib.peak_flops(jax.devices()[0])
  pending, last = None, {}

  def check_and_log(step, measured, examples, tokens):
    """Host side of step `step`'s metrics: NaN check every step, writers every log_every."""
    nonlocal last
    measured = jax.device_get(measured)
    if not np.isfinite(measured["loss"]):
      raise FloatingPointError(f"Loss is {measured['loss']} at step {step} ({measured}).")
    if step % config.log_every and step != config.total_steps:
      return
    rate, input_wait = writer.interval(step)
    flops = sum(flops_per_device.values()) / len(flops_per_device)
    last = {**measured, **metrics_lib.gate_values(train_state["params"], xattn_layers),
            **{f"lr/{g}": s(step - 1) for g, s in setup.schedules.items()},
            "lr": setup.schedules["group0"](step - 1), "steps_per_s": rate,
            "input_wait_fraction": input_wait, "examples_per_s": rate * examples,
            "tokens_per_s": rate * tokens,
            "tflops_per_device": rate * flops / 1e12, "mfu": rate * flops / peak,
            **{f"compile_s/{'-'.join(k)}": v for k, v in compile_seconds.items()}}
    writer.write(step, last)

  step = first_step
  try:
    while step < config.total_steps:
      profiler.before(step + 1)
      waited = time.perf_counter()
      batches = next(data) if first_batches is None else first_batches
      writer.waited_for_input(time.perf_counter() - waited + first_wait)
      first_batches, first_wait = None, 0.0
      if config.mixture_mode == "round_robin":
        batches = {names[step % len(names)]: batches[names[step % len(names)]]}
      with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
        train_state, measured = step_fn(train_state, batches)
      step += 1
      profiler.after(step, train_state)
      if pending is not None:  # One step behind, so the host never waits on the device.
        check_and_log(*pending)
      pending = (step, measured, sum(b["tokens"].shape[0] for b in batches.values()),
                 sum(b["tokens"].size for b in batches.values()))
      if evaluator is not None:
        scores = evaluator(step, state_lib.merge(train_state["params"], frozen))
        if scores:
          writer.write(step, scores)
      stop = sigterm.stop(step)
      lock.heartbeat()
      if stop or step == config.total_steps or manager.should_save(step):
        check_and_log(*pending)
        pending = None
        writer.flush()  # The metrics up to a checkpoint survive whatever ends the run later.
        # Forced at the last step: orbax's interval check would skip a total_steps that
        # ckpt_every does not divide.
        ckpt_lib.save(manager, step, train_state, data.get_state(),
                      force=stop or step == config.total_steps)
      if stop:
        break
    if pending is not None:
      check_and_log(*pending)
  finally:
    writer.close()
    sigterm.restore()
    ckpt_lib.finish(manager)
  return train_state, frozen, last
