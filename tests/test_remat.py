"""`remat=True`: the same loss and gradients, computed from less stored memory.

The recomputation is tied to each block's output gradient (`models.unet.recomputed`),
because XLA:CPU runs `jax.checkpoint`'s recomputation in the forward pass and saves nothing.
"""

import jax
import jax.numpy as jnp
import numpy as np

import jaxconsdec as jcd
from jaxconsdec.training.loss import consistency_loss


def _loss(cfg, size, batch, remat):
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.uniform(-1, 1, (batch, size, size, 3)), jnp.float32)
  lat = jnp.asarray(rng.standard_normal((batch, size // 8, size // 8, 4)), jnp.float32)
  eps = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
  t = jnp.asarray(rng.integers(16, 1008, batch))
  return lambda p: jnp.mean(consistency_loss(p, x0, lat, t - 16, t, eps, config=cfg,
                                             remat=remat))


def test_remat_gives_the_same_loss_and_gradients():
  from small_models import SMALLEST as cfg  # every kind of block, one of each
  params = jcd.random_params(cfg, seed=0)
  out = {r: jax.jit(jax.value_and_grad(_loss(cfg, 32, 2, r)))(params) for r in (False, True)}
  (loss, grads), (loss_r, grads_r) = out[False], out[True]
  assert jax.tree.structure(grads_r) == jax.tree.structure(grads)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  flat = lambda g: np.concatenate([np.ravel(v) for v in jax.tree.leaves(g)])
  assert np.linalg.norm(flat(grads_r) - flat(grads)) <= 1e-5 * np.linalg.norm(flat(grads))
  # Every block's params get their gradient through the recomputation (none is left zero).
  for path, g in jax.tree_util.tree_flatten_with_path(grads_r)[0]:
    if "resnets" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path):
      assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)


def test_remat_lowers_the_compiled_memory_of_the_gradient():
  """A compiled property, not a timing: the temporaries XLA allocates for the gradient."""
  from small_models import SMALLEST as cfg  # every kind of block once
  params = jcd.abstract_params(cfg)
  temp = {}
  for remat in (False, True):
    compiled = jax.jit(jax.grad(_loss(cfg, 128, 2, remat))).lower(params).compile()
    temp[remat] = compiled.memory_analysis().temp_size_in_bytes
  print("temporaries without / with remat, MiB:", temp[False] / 2 ** 20, temp[True] / 2 ** 20)
  assert temp[True] < 0.6 * temp[False]
