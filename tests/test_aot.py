"""AOT compilation of the real update step for a TPU topology (flamingo_jax/train/aot.py).

libtpu is in the test extra (jax[tpu]); without it these tests fail rather than skip.
"""
import jax
import pytest

from flamingo_jax.configs import tiny
from flamingo_jax.train import aot
from flamingo_jax.train import sharding as sharding_lib


@pytest.mark.parametrize("name, expected", [
    ("v4-8", "v4:2x2x1"), ("v4-128", "v4:4x4x4"), ("v4-3072", "v4:16x12x8"),
    ("v5p-1024", "v5p:8x8x8"), ("v5e-32", "v5e:8x4"), ("v4:8x16x12", "v4:8x16x12"),
])
def test_topology_name(name, expected):
  assert aot.topology_name(name) == expected


@pytest.mark.parametrize("name", ["v3-8", "v4", "v4-7", "v4-x"])
def test_bad_topology_name(name):
  with pytest.raises(ValueError, match="--topology"):
    aot.topology_name(name)


@pytest.fixture
def no_compilation_cache():
  """Without a TPU client, an executable for a TPU topology cannot be read back from the persistent
  compilation cache (tests/conftest.py): JAX warns, then compiles anyway."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  yield
  jax.config.update("jax_enable_compilation_cache", enabled)


def test_tiny_config_compiles_for_v4(no_compilation_cache):
  config = tiny.get_config()
  config.mesh = (2, 2, 1)
  (report,) = aot.compile_step(config, "v4:2x2x1")
  assert report.chips == 4 and report.mesh == {"data": 2, "fsdp": 2, "model": 1}
  assert report.datasets == ("interleaved", "pairs")
  for field in ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes"):
    assert 0 < getattr(report, field) < report.hbm_bytes, field
  assert report.hbm_bytes == 32 * aot.GiB
  assert report.flops > 0 and report.step_seconds(0.5) > 0
  assert "per chip: total" in report.format()


def test_batch_that_does_not_split_names_the_field_and_the_divisor():
  config = tiny.get_config()
  config.mesh = (1, -1, 1)
  config.input.datasets.pairs.batch_size = 6
  mesh = sharding_lib.make_mesh(config.mesh, aot.topology_devices("v4-8"))
  with pytest.raises(ValueError,
                     match=r"input\.datasets\.pairs\.batch_size=6 .*data-parallel size 4"):
    aot.abstract_batches(config, mesh)
