"""Perceiver Resampler: shapes, time embeddings, no spatial position encoding."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import perceiver

B, N, T, S, C = 2, 3, 4, 5, 12


@pytest.fixture(scope="module")
def model_and_params():
  model = perceiver.PerceiverResampler(dim=16, num_layers=2, num_heads=2, head_dim=8,
                                       num_latents=6, max_frames=T, ffw_mult=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (B, N, T, S, C))
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), x))
  return model, params, x


def test_shapes(model_and_params):
  model, params, x = model_and_params
  assert model.apply(params, x).shape == (B, N, 6, 16)
  assert model.apply(params, x[:, :, :1]).shape == (B, N, 6, 16)  # Still images: T = 1.


def test_frame_order_matters(model_and_params):
  """With learned time embeddings, shuffled frames give different visual tokens."""
  model, params, x = model_and_params
  time_embed = jax.random.normal(jax.random.PRNGKey(2), params["params"]["time_embed"].shape)
  params = {"params": {**params["params"], "time_embed": time_embed}}  # As after training.
  shuffled = x[:, :, jnp.array([2, 0, 3, 1])]
  diff = np.abs(np.asarray(model.apply(params, shuffled) - model.apply(params, x))).max()
  assert diff > 1e-3


def test_no_spatial_position_encoding(model_and_params):
  """Permuting spatial positions within every frame leaves the output unchanged."""
  model, params, x = model_and_params
  permuted = x[:, :, :, jnp.array([4, 2, 0, 1, 3])]
  np.testing.assert_allclose(model.apply(params, permuted), model.apply(params, x), rtol=1e-5,
                             atol=1e-5)


def test_images_are_resampled_independently(model_and_params):
  model, params, x = model_and_params
  out = model.apply(params, x)
  changed = model.apply(params, x.at[:, 1].multiply(-1.0))
  np.testing.assert_allclose(changed[:, 0], out[:, 0], rtol=1e-6)
  np.testing.assert_allclose(changed[:, 2], out[:, 2], rtol=1e-6)
  assert np.abs(np.asarray(changed[:, 1] - out[:, 1])).max() > 1e-3


def test_time_embedding_interpolates_to_more_frames(model_and_params):
  model, params, x = model_and_params
  table = params["params"]["time_embed"]
  longer = perceiver.time_embedding(table, 2 * T - 1)
  assert longer.shape == (2 * T - 1, C)
  np.testing.assert_allclose(longer[0], table[0], rtol=1e-5)
  np.testing.assert_allclose(longer[-1], table[-1], rtol=1e-5)
  assert model.apply(params, jnp.concatenate([x, x[:, :, :3]], 2)).shape == (B, N, 6, 16)


def test_bad_rank_is_an_error(model_and_params):
  model, params, x = model_and_params
  with pytest.raises(ValueError, match=r"\[B, N, T, S, C\]"):
    model.apply(params, x[:, 0])


def test_mlp_connector_gives_one_token_per_spatial_feature():
  model = perceiver.connector(perceiver.connector_config(
      dict(kind="mlp", dim=16, num_latents=S, ffw_mult=2, num_layers=6)))
  x = jax.random.normal(jax.random.PRNGKey(0), (B, N, T, S, C))
  params = nn.unbox(model.init(jax.random.PRNGKey(1), x))
  assert isinstance(model, perceiver.MlpConnector) and "latents" not in params["params"]
  out = model.apply(params, x)
  assert out.shape == (B, N, S, 16)
  # Frames are averaged; each spatial feature maps on its own (a changed feature moves one token).
  np.testing.assert_allclose(model.apply(params, x[:, :, ::-1]), out, rtol=1e-5, atol=1e-6)
  moved = model.apply(params, x.at[:, :, :, 2].multiply(-1.0)) - out
  np.testing.assert_array_equal(np.abs(np.asarray(moved)).max(axis=(0, 1, 3)) > 1e-4,
                                np.arange(S) == 2)


def test_mlp_connector_needs_num_latents_equal_to_spatial_features():
  model = perceiver.connector(perceiver.ConnectorConfig(kind="mlp", dim=16, num_latents=6))
  with pytest.raises(ValueError, match=r"set model.resampler.num_latents=5 \(S\), not 6"):
    model.init(jax.random.PRNGKey(1), jnp.zeros((B, N, T, S, C)))


def test_unknown_connector_kind_is_an_error():
  with pytest.raises(ValueError, match=r"resampler.kind='linear'; expected one of \('perceiver'"):
    perceiver.connector_config(dict(kind="linear", dim=16))
  with pytest.raises(ValueError, match=r"Unknown model.resampler keys \['latents'\]"):
    perceiver.connector_config(dict(latents=16))
  default = perceiver.connector(perceiver.connector_config(dict(dim=16)))
  assert isinstance(default, perceiver.PerceiverResampler)


def test_transformer_connector_attends_across_features_with_no_latents():
  """Table 3's "Resampler: Transformer": a token per spatial feature, each seeing all of them."""
  model = perceiver.connector(perceiver.connector_config(
      dict(kind="transformer", dim=16, num_latents=S, num_layers=2, num_heads=2, head_dim=8,
           ffw_mult=2)))
  x = jax.random.normal(jax.random.PRNGKey(0), (B, N, T, S, C))
  params = nn.unbox(model.init(jax.random.PRNGKey(1), x))
  assert isinstance(model, perceiver.TransformerConnector) and "latents" not in params["params"]
  out = model.apply(params, x)
  assert out.shape == (B, N, S, 16)
  moved = model.apply(params, x.at[:, :, :, 2].multiply(-1.0)) - out
  assert (np.abs(np.asarray(moved)).max(axis=(0, 1, 3)) > 1e-4).all()  # Unlike the MLP's.
  with pytest.raises(ValueError, match=r"kind='transformer'.*num_latents=5 \(S\), not 6"):
    perceiver.connector(perceiver.ConnectorConfig(kind="transformer", dim=16, num_latents=6,
                                                  num_layers=1)).init(jax.random.PRNGKey(1), x)


def test_demo_init_starts_with_image_dependent_and_distinct_visual_tokens():
  """configs/demo.py's Perceiver init. With N(0, 1) latents the visual tokens at initialisation
  are nearly the same for every image (the latents dominate the output and half of the keys).
  Latents near zero vanish, but with 0.02 projections attention is uniform and every latent gives
  the same pooled token. Small latents with 1/sqrt(dim) projections give both."""
  features = jax.random.normal(jax.random.PRNGKey(0), (64, 1, 1, 16, 32))

  def shares(latent_std, kernel_std):  # Variance across images, across latents / energy.
    model = perceiver.PerceiverResampler(dim=32, num_layers=2, num_heads=2, head_dim=16,
                                         num_latents=8, ffw_mult=2, latent_std=latent_std,
                                         kernel_std=kernel_std)
    tokens = model.apply(model.init(jax.random.PRNGKey(1), features), features)
    energy = (tokens ** 2).mean()
    return float(tokens.var(axis=0).mean() / energy), float(tokens.var(axis=2).mean() / energy)

  assert shares(1.0, 0.02)[0] < 0.05  # Image-independent.
  assert shares(1e-4, 0.02)[1] < 0.01  # All latents alike.
  images, latents = shares(1e-2, 32 ** -0.5)
  assert images > 0.5 and latents > 0.2


def test_centred_features_subtract_a_fixed_per_position_mean():
  """center_features: the resampler sees features - feature_mean [S, C] (no gradient reaches the
  mean, which is set from data, not trained), and only the Perceiver takes it."""
  kw = dict(dim=16, num_layers=2, num_heads=2, head_dim=8, num_latents=6, max_frames=T,
            ffw_mult=2)
  centred = perceiver.PerceiverResampler(**kw, center_features=True)
  plain = perceiver.PerceiverResampler(**kw)
  x = jax.random.normal(jax.random.PRNGKey(0), (B, N, T, S, C))
  params = nn.unbox(centred.init(jax.random.PRNGKey(1), x))["params"]
  assert not np.asarray(params["feature_mean"]).any() and params["feature_mean"].shape == (S, C)
  mean = jax.random.normal(jax.random.PRNGKey(2), (S, C))
  params = {**params, "feature_mean": mean}
  rest = {k: v for k, v in params.items() if k != "feature_mean"}
  np.testing.assert_allclose(centred.apply({"params": params}, x),
                             plain.apply({"params": rest}, x - mean), atol=1e-6)
  grads = jax.grad(lambda p: centred.apply({"params": p}, x).sum())(params)
  assert not np.asarray(grads["feature_mean"]).any()
  assert np.abs(np.asarray(grads["latents"])).max() > 0
  with pytest.raises(ValueError, match="center_features=True is for kind='perceiver', not 'mlp'"):
    perceiver.connector_config(dict(kind="mlp", num_latents=S, center_features=True))


def test_centring_makes_visual_tokens_image_dependent_on_a_shared_background():
  """Why configs/demo.py centres: where every image's features are a shared per-position
  background plus a smaller image-specific part (the demo's 4x4 grid of mostly background), the
  initial tokens barely depend on the image; with the per-position mean subtracted they do."""
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  background = 3.0 * jax.random.normal(keys[0], (16, 32))
  features = background + 0.3 * jax.random.normal(keys[1], (64, 1, 1, 16, 32))
  kw = dict(dim=32, num_layers=2, num_heads=2, head_dim=16, num_latents=8, ffw_mult=2,
            latent_std=1e-2, kernel_std=32 ** -0.5, center_features=True)
  model = perceiver.PerceiverResampler(**kw)
  params = nn.unbox(model.init(jax.random.PRNGKey(1), features))["params"]

  def image_share(mean):
    tokens = model.apply({"params": {**params, "feature_mean": mean}}, features)
    return float(tokens.var(axis=0).mean() / (tokens ** 2).mean())

  uncentred = image_share(jnp.zeros((16, 32)))
  centred = image_share(features.mean(axis=(0, 1, 2)))
  assert uncentred < 0.05 and centred > 0.3, (uncentred, centred)
