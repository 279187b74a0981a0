"""The trainer's optimiser: gradients clipped to a global norm as optax clips them, then Adam."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxconsdec.training.step import Optimization, clip_by_global_norm


@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.05, 0.7, 1e4])  # norms 0 .. 1e5
def test_clipping_equals_optax(scale):
  rng = np.random.default_rng(int(scale * 10))
  grads = {"conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 4, 5)) * scale,
                                          jnp.float32)},
           "bias": jnp.asarray(rng.standard_normal(5) * scale, jnp.float32)}
  got, _ = clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  want, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=0)
  if optax.tree.norm(grads) <= 1.0:  # under the norm: they pass unchanged, to the bit
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(grads)):
      np.testing.assert_array_equal(g, w)


def test_one_update_equals_optax_clip_then_adam():
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.standard_normal((6, 7)), jnp.float32)}
  grads = {"w": jnp.asarray(rng.standard_normal((6, 7)) * 3, jnp.float32)}
  opt = Optimization(lr=1e-3, warmup_steps=1)
  reference = optax.chain(optax.clip_by_global_norm(opt.clip_norm),
                          optax.adam(opt.lr, b1=opt.b1, b2=opt.b2, eps=opt.eps))
  got, _ = opt.optimizer().update(grads, opt.optimizer().init(params), params)
  want, _ = reference.update(grads, reference.init(params), params)
  np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)
