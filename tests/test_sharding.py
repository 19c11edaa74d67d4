"""Mesh construction and logical-axis rules (flamingo_jax/train/sharding.py)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import pytest

from flamingo_jax.configs import common
from flamingo_jax.configs import tiny
from flamingo_jax.models import flamingo
from flamingo_jax.train import sharding


def test_mesh_shape_fills_and_checks():
  assert sharding.mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert sharding.mesh_shape((2, -1, 2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match=r"config.mesh=\(2, 2, 1\) has 4 devices; there are 8"):
    sharding.mesh_shape((2, 2, 1), 8)
  with pytest.raises(ValueError, match="3 does not divide the 8 devices"):
    sharding.mesh_shape((3, -1, 1), 8)
  with pytest.raises(ValueError, match="expected 3 sizes"):
    sharding.mesh_shape((8, 1), 8)


def test_conflicting_rules_are_errors():
  with pytest.raises(ValueError, match="maps logical axis 'embed' twice"):
    sharding.check_rules([("embed", "fsdp"), ("embed", "model")])
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.check_rules([("embed", "tensor")])
  mesh = sharding.make_mesh((2, 2, 2))
  rules = sharding.check_rules([("embed", "model"), ("mlp", "model")])
  with pytest.raises(ValueError, match=r"lm/wi.*mesh axes \['model'\] are used by two"):
    sharding.logical_to_spec(("embed", "mlp"), (8, 8), rules, mesh, "lm/wi")


def test_unknown_and_indivisible_dims_are_replicated():
  mesh = sharding.make_mesh((1, 4, 2))
  rules = sharding.check_rules([("embed", "fsdp"), ("mlp", "model")])
  assert sharding.logical_to_spec(("embed", "mlp"), (8, 4), rules, mesh) == P("fsdp", "model")
  assert sharding.logical_to_spec(("embed", "nope"), (6, 4), rules, mesh) == P(None, None)


def test_tiny_flamingo_shardings():
  config = tiny.get_config()
  model = flamingo.from_config(config.model)
  boxed = jax.eval_shape(lambda r: model.init(
      r, jnp.zeros((1, 1, 1, 32, 32, 3)), jnp.zeros((1, 8), jnp.int32),
      jnp.ones((1, 8), jnp.int32))["params"], jax.random.PRNGKey(0))
  mesh = sharding.make_mesh((2, 2, 2))
  shardings = sharding.param_shardings(boxed, mesh, common.SHARDING_RULES)
  query = shardings["lm"]["groups"]["xattn"]["attn"]["query"]["kernel"]
  assert query.spec == P(None, "fsdp", "model", None)  # ('groups', 'embed', 'heads', 'kv')
  assert shardings["lm"]["token_embed"].spec == P("model", "fsdp")
  assert jax.tree.structure(shardings) == jax.tree.structure(nn.unbox(boxed))
