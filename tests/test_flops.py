"""Step FLOPs counted from the jaxpr: exact for matmuls and convs, scans counted per layer."""
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.train import flops


def test_matmul():
  a, b = jnp.zeros((3, 4)), jnp.zeros((4, 5))
  assert flops.step_flops(jnp.dot, a, b) == 2 * 3 * 4 * 5


def test_scan_body_counted_per_iteration():
  w = jnp.zeros((10, 8, 8))

  def f(x):
    return jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)[0]

  assert flops.step_flops(f, jnp.zeros((2, 8))) == 10 * 2 * 2 * 8 * 8


def test_grouped_conv():
  x = jnp.zeros((1, 6, 6, 4))
  k = jnp.zeros((3, 3, 2, 8))  # 2 groups of 2 input channels.
  conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)
  assert flops.step_flops(conv, x, k) == 2 * (6 * 6 * 8) * (3 * 3 * 2)


def test_backward_of_a_frozen_weight_costs_one_matmul_not_two():
  """grad w.r.t. x only: forward + dx, no dW."""
  w, x = jnp.zeros((4, 4)), jnp.zeros((2, 4))
  loss_x = jax.grad(lambda x: jnp.sum(x @ w))
  loss_both = jax.grad(lambda x, w: jnp.sum(x @ w), argnums=(0, 1))
  assert flops.step_flops(loss_x, x) == 2 * (2 * 2 * 4 * 4)
  assert flops.step_flops(loss_both, x, w) == 3 * (2 * 2 * 4 * 4)
  assert np.isclose(flops.step_flops(jax.jit(loss_x), x), 2 * (2 * 2 * 4 * 4))
