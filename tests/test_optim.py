"""Parameter groups, freezing and the optimizer (flamingo_jax/train/optim.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flamingo_jax.configs import tiny
from flamingo_jax.models import param_count
from flamingo_jax.train import input as input_lib
from flamingo_jax.train import optim
from flamingo_jax.train import sharding as sharding_lib
from flamingo_jax.train import state as state_lib
from flamingo_jax.train import trainer
from flamingo_jax.train.kinds import flamingo as flamingo_kind


@pytest.fixture(scope="module")
def params():
  return param_count.abstract_params(tiny.get_model_config(), image_size=32)


def test_default_schedule_trains_resampler_xattn_and_new_rows(params):
  rules = optim.param_rules(params, tiny.get_config().schedule)
  trainable = optim.trainable_paths(rules)
  assert trainable and all(p.startswith("resampler/") or "/xattn/" in p or "/new_" in p
                           for p in trainable)
  assert {"lm/new_token_embed", "lm/new_lm_head/kernel"} <= trainable
  assert any(p.startswith("resampler/") for p in trainable)
  assert not any(p.startswith("vision/") for p in trainable)
  assert "lm/token_embed" not in trainable


def test_unmatched_paths_are_listed(params):
  with pytest.raises(ValueError, match=r"no regex matches .*lm/token_embed"):
    optim.param_rules(params, [(r"^vision/", None), (r"^resampler/", {})])


def test_optimizer_state_is_twice_the_trainable_params(params):
  config = tiny.get_config()
  rules = optim.param_rules(params, config.schedule)
  tx, _ = optim.make_optimizer(config, rules)
  trainable, _ = state_lib.split(params, optim.trainable_paths(rules).__contains__)
  opt = jax.eval_shape(tx.init, trainable)
  n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
  floats = [x for x in jax.tree.leaves(opt) if jnp.issubdtype(x.dtype, jnp.floating)]
  counters = [x for x in jax.tree.leaves(opt) if not jnp.issubdtype(x.dtype, jnp.floating)]
  assert sum(x.size for x in floats) == 2 * n_trainable
  assert all(x.size == 1 for x in counters)


def test_warmup_then_constant_or_cosine():
  constant = optim.make_schedule(1.0, total_steps=100, warmup_steps=10)
  cosine = optim.make_schedule(1.0, total_steps=100, warmup_steps=10, decay_type="cosine")
  np.testing.assert_allclose([constant(0), constant(5), constant(10), constant(99)],
                             [0, 0.5, 1, 1], atol=1e-6)
  assert cosine(10) == pytest.approx(1.0) and cosine(100) == pytest.approx(0.0, abs=1e-6)
  with pytest.raises(ValueError, match="decay_type"):
    optim.make_schedule(1.0, 10, decay_type="linear")


def test_weight_decay_skips_the_resampler_and_groups_get_their_schedules():
  config = tiny.get_config()
  config.lr_schedule.warmup_steps = 0
  config.optim.grad_clip = 0.0
  params = {"resampler": {"w": jnp.ones(3)}, "lm": {"xattn": {"w": jnp.ones(3)}},
            "vision": {"w": jnp.ones(3)}}
  schedule = [(r"^vision/", None), (r"^resampler/", {"lr": 0.5}), (r".*", {})]
  rules = optim.param_rules(params, schedule)
  tx, schedules = optim.make_optimizer(config, rules)
  assert len(schedules) == 2
  trainable, _ = state_lib.split(params, optim.trainable_paths(rules).__contains__)
  zero_grads = jax.tree.map(jnp.zeros_like, trainable)
  updates, _ = tx.update(zero_grads, tx.init(trainable), trainable)
  # Zero gradients: the only update is weight decay, -lr * wd * w, and none on the resampler.
  np.testing.assert_allclose(updates["lm"]["xattn"]["w"], -config.lr * 0.1 * np.ones(3), rtol=1e-6)
  np.testing.assert_array_equal(updates["resampler"]["w"], 0.0)
  assert "vision" not in updates


def test_agc_is_optional():
  config = tiny.get_config()
  config.optim.agc = 0.01
  params = {"w": jnp.ones((4, 4))}
  tx, _ = optim.make_optimizer(config, optim.param_rules(params, [(".*", {})]))
  grads = {"w": 100.0 * jnp.ones((4, 4))}
  updates, _ = tx.update(grads, tx.init(params), params)
  assert np.isfinite(np.asarray(updates["w"])).all()
  assert isinstance(tx, optax.GradientTransformation)


def test_unfreeze_names_top_level_modules(params):
  rules = optim.param_rules(params, tiny.get_config().schedule, unfreeze=("lm",))
  trainable = optim.trainable_paths(rules)
  assert "lm/token_embed" in trainable and not any(p.startswith("vision/") for p in trainable)
  with pytest.raises(ValueError, match=r"config.unfreeze=\('lm', 'img'\): expected a tuple of "
                                       r"top-level modules among \['lm', 'resampler', 'vision'\]"):
    optim.param_rules(params, tiny.get_config().schedule, unfreeze=("lm", "img"))


@pytest.mark.parametrize("unfreeze", [(), ("vision",)])
def test_vision_encoder_trains_only_when_unfrozen(unfreeze):
  """Two update steps of the trainer: the encoder's parameters move iff config.unfreeze names it
  (the model has no stop_gradient that would silently keep an unfrozen encoder still)."""
  config = tiny.get_config()
  config.unfreeze, config.optim.weight_decay, config.lr_schedule.warmup_steps = unfreeze, 0.0, 0
  mesh = sharding_lib.make_mesh(config.mesh)
  data = input_lib.make_input(config, mesh)
  setup = trainer.make_setup(config, flamingo_kind.model(config), mesh, data.weights)
  trainable, frozen = jax.jit(setup.init)(jax.random.PRNGKey(0))
  before = {p: np.asarray(x) for p, x in state_lib.flat(trainable).items()}
  # Placed as the update step returns it, so its second call reuses the first's compile (22 s).
  state = jax.device_put({"step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(0),
                          "params": trainable, "opt_state": setup.tx.init(trainable)},
                         setup.state_sh)
  for _ in range(2):  # The gates start at 0: the visual path gets gradients from step 2.
    state, _ = setup.update(state, frozen, next(data))
  after = state_lib.flat(state["params"])
  moved = {p for p, x in after.items() if not np.array_equal(np.asarray(x), before[p])}
  in_vision = lambda paths: {p for p in paths if p.startswith("vision/")}
  if unfreeze:
    assert in_vision(moved) and "vision/stem_conv1/kernel" in moved
  else:
    assert not in_vision(after) and in_vision(state_lib.flat(frozen))
  assert any(p.startswith("resampler/") for p in moved)
