"""Contrastive pretraining (App. B.1.3): shapes, loss vs numpy, padding, recall, memorisation."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from flamingo_jax.configs import tiny
from flamingo_jax.models import contrastive
from flamingo_jax.models import text_encoder
from tests import model_utils

PAD = 0
TEXT = dict(vocab_size=32, dim=32, num_layers=2, num_heads=2, mlp_dim=64, max_len=16, pad_id=PAD)


def _config(**overrides):
  cfg = dict(vision=dict(tiny.get_model_config().vision), text=TEXT, embed_dim=16)
  return ml_collections.ConfigDict({**cfg, **overrides})


def _batch(seed=0, batch=8, size=32, length=10):
  """Random images and distinct token sequences, row i padded after 3 + i % 5 tokens."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  tokens = rng.integers(1, TEXT["vocab_size"], size=(batch, length)).astype(np.int32)
  for i in range(batch):
    tokens[i, 3 + i % 5:] = PAD
  return jnp.asarray(images), jnp.asarray(tokens)


@pytest.fixture(scope="module")
def tiny_model():
  """The file's one init (with an 'rbg' key: compiles ~2x faster than threefry's on CPU)."""
  model = contrastive.from_config(_config())
  images, tokens = _batch()
  params = jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), images, tokens)["params"]
  return model, params, images, tokens, jax.jit(model.apply, static_argnames="train")


def _numpy_loss(img, txt, temperature, smoothing):
  """The two-term softmax cross-entropy with label smoothing, written out."""
  logits = temperature * img @ txt.T
  b = logits.shape[0]
  labels = (1 - smoothing) * np.eye(b) + smoothing / b
  def xent(z):  # rows of z against rows of labels
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -(labels * log_p).sum(axis=1).mean()
  return xent(logits) + xent(logits.T)


def _unit(rng, shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_shapes_norms_and_temperature(tiny_model):
  _, params, images, tokens, apply = tiny_model
  img, txt, temperature = apply({"params": nn.unbox(params)}, images, tokens)
  assert img.shape == txt.shape == (8, 16)
  np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(txt, axis=-1), 1, rtol=1e-5)
  np.testing.assert_allclose(temperature, 1 / 0.07, rtol=1e-5)
  assert set(params) == {"vision", "text", "img_proj", "txt_proj", "log_temperature"}


def test_temperature_is_clipped(tiny_model):
  _, params, images, tokens, apply = tiny_model
  params = dict(nn.unbox(params), log_temperature=jnp.asarray(np.log(500.0), jnp.float32))
  assert float(apply({"params": params}, images, tokens)[2]) == 100.0  # max_temperature


def test_every_param_has_logical_axes(tiny_model):
  params = tiny_model[1]
  leaves = jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for path, box in leaves:
    assert isinstance(box, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
    assert len(box.names) == box.value.ndim, jax.tree_util.keystr(path)


def test_vision_tree_matches_flamingo():
  """Stage 3 loads the contrastive `vision` subtree as Flamingo's frozen encoder, unchanged."""
  flamingo, _ = model_utils.tiny_model()
  images, tokens, media_idx = model_utils.random_inputs(0)
  want = jax.eval_shape(flamingo.init, jax.random.key(0), images, tokens, media_idx)
  model = contrastive.from_config(_config())
  got = jax.eval_shape(model.init, jax.random.key(0), *_batch(batch=2))
  assert jax.tree.structure(got["params"]["vision"]) == jax.tree.structure(want["params"]["vision"])
  shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(t))
  assert shapes(got["params"]["vision"]) == shapes(want["params"]["vision"])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_matches_numpy(smoothing):
  rng = np.random.default_rng(0)
  img, txt = _unit(rng, (6, 8)), _unit(rng, (6, 8))
  loss, metrics = contrastive.contrastive_loss(img, txt, 10.0, label_smoothing=smoothing)
  np.testing.assert_allclose(loss, _numpy_loss(img, txt, 10.0, smoothing), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_i2t"] + metrics["loss_t2i"], loss, rtol=1e-6)


def test_loss_is_symmetric():
  """Swapping the towers transposes the similarity matrix: same loss, the two terms swap."""
  rng = np.random.default_rng(1)
  img, txt = _unit(rng, (5, 8)), _unit(rng, (5, 8))
  loss, m = contrastive.contrastive_loss(img, txt, 7.0)
  loss_t, m_t = contrastive.contrastive_loss(txt, img, 7.0)
  np.testing.assert_allclose(loss, loss_t, rtol=1e-6)
  np.testing.assert_allclose(m["loss_i2t"], m_t["loss_t2i"], rtol=1e-6)


def test_loss_rejects_mismatched_embeddings():
  with pytest.raises(ValueError, match="expected both"):
    contrastive.contrastive_loss(jnp.ones((4, 8)), jnp.ones((3, 8)), 1.0)


def test_padding_does_not_change_text_embedding(tiny_model):
  """Masked attention and masked mean pooling: trailing pads (any number) leave the output as is."""
  encoder = text_encoder.TextEncoder(**TEXT)
  _, tokens = _batch(batch=4, length=8)
  params = {"params": nn.unbox(tiny_model[1]["text"])}
  longer = jnp.pad(tokens, ((0, 0), (0, 6)), constant_values=PAD)
  apply = jax.jit(encoder.apply)
  out, out_longer = apply(params, tokens), apply(params, longer)
  assert out.shape == (4, 32)
  np.testing.assert_allclose(out, out_longer, atol=1e-5)
  # A non-pad token at a padded position does change it (the mask is what makes the difference).
  assert not np.allclose(apply(params, longer.at[:, -1].set(5)), out, atol=1e-3)


def test_masked_mean():
  x = jnp.arange(12.0).reshape(1, 4, 3)
  mask = jnp.array([[True, False, True, False]])
  np.testing.assert_allclose(text_encoder.masked_mean(x, mask), [[3.0, 4.0, 5.0]])
  np.testing.assert_allclose(text_encoder.masked_mean(x, ~jnp.ones_like(mask)), [[0, 0, 0]])


def test_recall():
  rng = np.random.default_rng(2)
  emb = _unit(rng, (10, 8))
  recall = contrastive.retrieval_recall(emb, emb, ks=(1, 5))
  assert {k: float(v) for k, v in recall.items()} == {
      "i2t_recall@1": 1.0, "i2t_recall@5": 1.0, "t2i_recall@1": 1.0, "t2i_recall@5": 1.0}
  collapsed = np.ones((10, 8), np.float32) / np.sqrt(8)  # Ties count against the true pair.
  assert float(contrastive.retrieval_recall(collapsed, collapsed)["i2t_recall@1"]) == 0.0
  reversed_ = contrastive.retrieval_recall(emb, emb[::-1], ks=(1, 10))  # Every pair mismatched.
  assert float(reversed_["i2t_recall@1"]) == float(reversed_["t2i_recall@1"]) == 0.0
  assert float(reversed_["t2i_recall@10"]) == 1.0


def test_config_errors():
  with pytest.raises(ValueError, match="unknown TextEncoder fields"):
    contrastive.from_config(_config(text=dict(TEXT, hidden=4)))
  with pytest.raises(ValueError, match="num_classes"):
    contrastive.from_config(_config(vision=dict(tiny.get_model_config().vision, num_classes=10)))
  encoder = text_encoder.TextEncoder(**TEXT)
  with pytest.raises(ValueError, match="max_len"):
    jax.eval_shape(encoder.init, jax.random.key(0), jnp.ones((1, 17), jnp.int32))


@pytest.mark.slow  # ~25 s: compiling the gradient through the NFNet.
def test_memorises_a_tiny_batch(tiny_model):
  """Adam on 8 pairs drives the loss from above chance (2·log 8) to near its optimum (0.93)."""
  model, params, images, tokens, _ = tiny_model
  params = nn.unbox(params)
  tx = optax.adam(3e-3)

  def loss_fn(p):
    return contrastive.contrastive_loss(*model.apply({"params": p}, images, tokens, train=True))

  @jax.jit
  def steps(p, opt_state):
    def step(carry, _):
      p, opt_state = carry
      (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
      updates, opt_state = tx.update(grads, opt_state, p)
      return (optax.apply_updates(p, updates), opt_state), loss
    return jax.lax.scan(step, (p, opt_state), length=150)

  (params, _), losses = steps(params, tx.init(params))
  final, metrics = jax.jit(loss_fn)(params)
  chance = 2 * np.log(8)
  assert losses[0] > chance and final < 0.4 * chance, (losses[0], final)
  assert metrics["accuracy_i2t"] == 1.0 and metrics["accuracy_t2i"] == 1.0
