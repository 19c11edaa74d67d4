"""The update step and the training loop (flamingo_jax/train/trainer.py)."""
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flamingo_jax.configs import demo
from flamingo_jax.configs import flamingo_3b
from flamingo_jax.configs import tiny
from flamingo_jax.models import losses
from flamingo_jax.train import trainer
from flamingo_jax.train.kinds import flamingo as flamingo_kind
from tests import model_utils
import train_helpers as helpers


VOCAB = 11


def _fake_model():
  """A 2-matrix 'model': frozen embedding table, trainable output head. (apply_fn, optimizer,
  train state, frozen params)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  frozen = {"embed": jax.random.normal(k1, (VOCAB, 4))}
  params = {"head": jax.random.normal(k2, (4, VOCAB))}
  apply_fn = lambda p, b: jnp.take(p["embed"], b["tokens"], axis=0) @ p["head"]
  tx = optax.adam(0.1)
  state = {"step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(1), "params": params,
           "opt_state": tx.init(params)}
  return apply_fn, tx, state, frozen


def _fake_setup(microbatches=1, weights=None):
  apply_fn, tx, state, frozen = _fake_model()
  weights = weights or {"a": 1.0, "b": 0.2}
  step = trainer.make_update_step(apply_fn, tx, weights, microbatches)
  return step, state, frozen


def _batches(seed=0):
  rng = np.random.default_rng(seed)
  make = lambda b, l: {"tokens": rng.integers(0, 11, (b, l)).astype(np.int32),
                       "loss_mask": (rng.random((b, l)) > 0.3).astype(np.float32)}
  return {"a": make(4, 6), "b": make(4, 3)}


def test_next_token_nll_uses_shifted_targets_and_mask():
  logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))  # [1, 3, 2]
  tokens = jnp.array([[0, 1, 1]])
  loss = losses.next_token_nll(logits, tokens, jnp.array([[1.0, 1.0, 0.0]]))
  np.testing.assert_allclose(loss, -np.log(0.5), rtol=1e-6)  # Only logits[0] -> tokens[1].


@pytest.mark.parametrize("shape", [(2, 7, 11), (3, 40, 514), (2, 16, 4099)])
def test_next_token_logprobs_are_log_softmax_at_the_targets_with_its_gradient(shape):
  """The select-and-sum form gives what log_softmax + take_along_axis gave, gradient included
  (flamingo_jax/models/losses.py), on logits wide enough that the max shift matters."""
  b, l, v = shape
  rng = np.random.default_rng(v)
  logits = jnp.asarray(rng.normal(size=shape) * 8.0, jnp.float32)
  tokens = jnp.asarray(rng.integers(0, v, (b, l)), jnp.int32)
  mask = jnp.asarray(rng.random((b, l)) > 0.3, jnp.float32)

  def reference(x):
    logp = jax.nn.log_softmax(x[:, :-1])
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]

  np.testing.assert_allclose(losses.next_token_logprobs(logits, tokens), reference(logits),
                             rtol=1e-6, atol=1e-6)
  grad = jax.grad(lambda x: losses.next_token_nll(x, tokens, mask))(logits)
  expected = jax.grad(lambda x: -jnp.sum(reference(x) * mask[:, 1:]))(logits)
  np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-7)
  assert not np.any(grad[:, -1])  # The last position predicts nothing.


def test_frozen_params_bit_identical_and_trainable_change():
  step, state, frozen = _fake_setup()
  before = jax.tree.map(np.array, frozen)
  head = np.array(state["params"]["head"])
  for i in range(3):
    state, measured = jax.jit(step)(state, frozen, _batches(i))
  assert jax.tree.all(jax.tree.map(np.array_equal, before, jax.tree.map(np.array, frozen)))
  assert not np.array_equal(head, state["params"]["head"])
  assert int(state["step"]) == 3 and set(state) == {"step", "rng", "params", "opt_state"}


def test_loss_is_weighted_sum_and_microbatches_match():
  step1, state1, frozen = _fake_setup(microbatches=1)
  step2, state2, _ = _fake_setup(microbatches=2)
  new1, m1 = step1(state1, frozen, _batches())
  new2, m2 = step2(state2, frozen, _batches())
  np.testing.assert_allclose(m1["loss"], m1["loss/a"] + 0.2 * m1["loss/b"], rtol=1e-6)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
  np.testing.assert_allclose(new1["params"]["head"], new2["params"]["head"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("mesh", (2, 2, 1), r"config.mesh=\(2, 2, 1\) has 4 devices; there are 8"),
    ("input.datasets.pairs.batch_size", 12, r"pairs.batch_size=12 .* data-parallel size 8"),
    ("model.lm.num_heads", 5, "lm.num_heads=5 does not divide lm.dim=32"),
    ("lm_init", "/nonexistent/lm", r"config.lm_init='/nonexistent/lm': no checkpoint there"),
    ("mixture_mode", "sometimes", "config.mixture_mode='sometimes'"),
])
def test_bad_config_fails_at_startup(tmp_path, field, value, message):
  config = tiny.get_config()
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    trainer.train(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_input_is_closed_when_setup_fails_after_it_is_made(tmp_path, monkeypatch):
  """An error between making the input and the loop (here in make_setup) still closes the input
  (its worker processes), as the loop's end does."""
  closed = []
  make_input = trainer.input_lib.make_input

  def recording_make_input(config, mesh):
    data = make_input(config, mesh)
    close = data.close
    data.close = lambda: closed.append(True) or close()
    return data

  def failing_setup(*args):
    raise RuntimeError("setup failed")

  monkeypatch.setattr(trainer.input_lib, "make_input", recording_make_input)
  monkeypatch.setattr(trainer, "make_setup", failing_setup)
  with pytest.raises(RuntimeError, match="setup failed"):
    trainer.train(tiny.get_config(), str(tmp_path))
  assert closed == [True]


def test_paper_config_names_its_required_fields(tmp_path):
  """The 3B config trains on nothing it was not told: datasets and tokenizer are required."""
  config = flamingo_3b.get_config()
  config.model = tiny.get_model_config()
  config.mesh = (-1, 1, 1)
  with pytest.raises(ValueError) as error:
    trainer.train(config, str(tmp_path))
  for field in ("config.input.tokenizer", "config.input.datasets.m3w.tfds_name",
                "config.input.datasets.vtp.tfds_name"):
    assert field in str(error.value)
  assert re.search(r"--config\.input\.datasets\.\w+\.tfds_name=", str(error.value))  # To copy.
  assert not (tmp_path / "checkpoints").exists()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of the tiny config on mesh (8, 1, 1)."""
  cache = helpers.compilation_cache(tmp_path_factory)
  workdir = tmp_path_factory.mktemp("reference")
  helpers.run(workdir, cache_dir=cache)
  return workdir, cache


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["2,4,1", "2,2,2"])
def test_same_loss_on_every_mesh(reference, tmp_path, mesh):
  ref_dir, cache = reference
  helpers.run(tmp_path, f"--config.mesh=({mesh})", cache_dir=cache)
  ref, got = helpers.metrics(ref_dir), helpers.metrics(tmp_path)
  assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]
  for key in ("loss", "loss/interleaved", "loss/pairs", "grad_norm"):
    np.testing.assert_allclose([m[key] for m in got], [m[key] for m in ref], rtol=2e-5, err_msg=key)
  expected = {"gates/attn/layer_000", "gates/ffw/layer_002", "tokens_per_s", "mfu", "lr"}
  assert expected <= set(got[-1])


@pytest.mark.slow
def test_round_robin_updates_with_one_dataset_per_step_in_turn(tmp_path, tmp_path_factory):
  """mixture_mode='round_robin' (paper Table 3's ablation): each step one dataset, cycling."""
  cache = helpers.compilation_cache(tmp_path_factory)
  helpers.run(tmp_path, "--config.mixture_mode=round_robin", "--config.total_steps=4",
              cache_dir=cache)
  rows = helpers.metrics(tmp_path)
  assert [m["step"] for m in rows] == [1, 2, 3, 4]
  used = [[k.split("/")[1] for k in m if k.startswith("loss/")] for m in rows]
  assert all(len(u) == 1 for u in used), used
  used = [u[0] for u in used]
  assert used[0] != used[1] and used[:2] == used[2:] and set(used) == {"interleaved", "pairs"}
  weights = tiny.get_config().input.datasets
  for m, name in zip(rows, used):  # The step's loss (and gradient) is that dataset's alone.
    np.testing.assert_allclose(m["loss"], weights[name].weight * m[f"loss/{name}"], rtol=1e-6)


def test_sequence_loss_is_eq2_differs_from_the_token_mean_and_microbatches_match():
  """Eq. (2): per dataset, the batch mean of each sequence's summed NLL. Between long documents
  and short captions it shifts the mixture towards the documents (by their ratio of target
  tokens) where the token mean does not; microbatching is exact for both."""
  apply_fn, tx, state, frozen = _fake_model()
  params, vocab = state["params"], VOCAB
  rng = np.random.default_rng(0)

  def make(length, targets):  # 4 sequences of `targets` targets each; the last has none.
    mask = np.zeros((4, length), np.float32)
    mask[:3, 1:1 + targets] = 1
    return {"tokens": rng.integers(0, vocab, (4, length)).astype(np.int32), "loss_mask": mask}
  batches = {"docs": make(32, 30), "captions": make(6, 4)}

  measured = {}
  for normalization in ("token", "sequence"):
    loss_fn = functools.partial(flamingo_kind.loss, normalization=normalization)
    for k in (1, 2):
      step = trainer.make_update_step(apply_fn, tx, {"docs": 1.0, "captions": 0.2}, k, loss_fn)
      measured[normalization, k] = step(state, frozen, batches)
  for name, batch in batches.items():
    nll = -losses.next_token_logprobs(apply_fn({**params, **frozen}, batch), batch["tokens"])
    sums = np.sum(nll * batch["loss_mask"][:, 1:], axis=1)
    np.testing.assert_allclose(measured["sequence", 1][1][f"loss/{name}"], sums[:3].mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(measured["token", 1][1][f"loss/{name}"],
                               sums.sum() / batch["loss_mask"].sum(), rtol=1e-5)
  ratio = lambda m: m["loss/docs"] / m["loss/captions"]
  np.testing.assert_allclose(ratio(measured["sequence", 1][1]),
                             30 / 4 * ratio(measured["token", 1][1]), rtol=1e-5)
  assert not np.allclose(measured["sequence", 1][0]["params"]["head"],
                         measured["token", 1][0]["params"]["head"], rtol=1e-3)
  for normalization in ("token", "sequence"):
    (new1, m1), (new2, m2) = measured[normalization, 1], measured[normalization, 2]
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(new1["params"]["head"], new2["params"]["head"], rtol=1e-5,
                               atol=1e-6)
  with pytest.raises(ValueError, match=r"loss_normalization='mean'; expected one of"):
    flamingo_kind.loss(jnp.zeros((1, 3, vocab)), batches["captions"], normalization="mean")


def test_paper_configs_default_to_eq2_and_the_others_to_the_token_mean():
  assert flamingo_3b.get_config().input.loss_normalization == "sequence"
  for config in (tiny.get_config(), demo.get_config()):  # Their results stay as they were.
    assert "loss_normalization" not in config.input


def test_loss_normalization_reaches_the_update_step(tmp_path):
  config = tiny.get_config()
  config.input.loss_normalization = "mean"
  with pytest.raises(ValueError, match=r"config.input.loss_normalization='mean'; expected one of"):
    trainer.train(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()  # Named before anything is initialised.


def _centred_tiny():
  """The tiny config with model.resampler.center_features, its model and (trainable, frozen)."""
  config = tiny.get_config()
  config.model.resampler.center_features = True
  model = flamingo_kind.model(config)
  params = model_utils.init(model, *flamingo_kind.init_inputs(config))
  trainable = {"resampler": params["resampler"]}
  frozen = {k: v for k, v in params.items() if k != "resampler"}
  return config, model, trainable, frozen


def test_feature_mean_is_the_mean_over_the_real_media_of_the_first_batches():
  """init_from_data: every real image or frame of every dataset counts once, padded media not
  at all; batches of cached 'features' count as the encoder's features of their images."""
  config, model, trainable, frozen = _centred_tiny()
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 2, 1, 32, 32, 3)).astype(np.float32)
  images[0, 1] = 50.0  # Padding (media_mask False): must not count.
  # Jitted: eager flax dispatch of the model takes a minute on two cores; the maths is the same.
  feats = np.asarray(jax.jit(functools.partial(model.apply, method=model.vision_features))(
      {"params": {**trainable, **frozen}}, images))  # [2, 2, 1, S, C]
  cached = rng.normal(size=(3, 1, 2, *feats.shape[-2:])).astype(np.float32)  # Video: 2 frames.
  batches = {"a": {"images": images, "media_mask": np.array([[True, False], [True, True]])},
             "b": {"features": cached, "media_mask": np.ones((3, 1), bool)}}
  out = flamingo_kind.init_from_data(config, model, trainable, frozen, batches)
  real = np.concatenate([feats[0, 0], feats[1, 0], feats[1, 1],
                         cached.reshape(-1, *feats.shape[-2:])])  # 3 images, 6 frames.
  np.testing.assert_allclose(out["resampler"]["feature_mean"], real.mean(axis=0), rtol=1e-5,
                             atol=1e-6)
  rest = lambda t: {k: v for k, v in t["resampler"].items() if k != "feature_mean"}
  assert jax.tree.all(jax.tree.map(np.array_equal, rest(out), rest(trainable)))
  none = {"a": {**batches["a"], "media_mask": np.zeros((2, 2), bool)}}
  with pytest.raises(ValueError, match="center_features.*no real image"):
    flamingo_kind.init_from_data(config, model, trainable, frozen, none)
  plain_config = tiny.get_config()
  assert "feature_mean" not in jax.eval_shape(
      flamingo_kind.model(plain_config).init, jax.random.PRNGKey(0),
      *flamingo_kind.init_inputs(plain_config))["params"]["resampler"]


@pytest.mark.slow
def test_feature_mean_is_set_from_step_1s_batches_checkpointed_and_never_trained(tmp_path):
  """A fresh run sets it from the batches of step 1 and trains on those same batches (the input
  state at step 2's checkpoint is 2 batches); it stays bit-identical while the rest trains, and a
  resumed run keeps the checkpoint's."""
  config, *_ = _centred_tiny()
  config.total_steps, config.ckpt_every, config.log_every = 2, 1, 1
  first, _, _ = trainer.train(config, str(tmp_path))
  config.total_steps = 4
  last, _, _ = trainer.train(config, str(tmp_path))
  mean = np.asarray(first["params"]["resampler"]["feature_mean"])
  assert np.abs(mean).max() > 0
  np.testing.assert_array_equal(last["params"]["resampler"]["feature_mean"], mean)
  assert not np.array_equal(last["params"]["resampler"]["latents"],
                            first["params"]["resampler"]["latents"])
  data = [json.loads(f.read_text()) for f in (tmp_path / "checkpoints" / "2" / "data").iterdir()
          if f.is_file() and f.read_text().lstrip().startswith("{")]
  assert data and all(d.get("step") == 2 for d in data), data
