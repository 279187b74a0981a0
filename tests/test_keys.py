"""Every public function that takes a key takes a typed key, a legacy PRNGKey array or an int
seed the same way, for one example and for several: the same seed gives the same losses and
decodes."""

import jax
import numpy as np
import pytest

import jaxconsdec as jcd
from small_models import SMALLEST

CONFIG = SMALLEST.replace(dropout=0.5)  # dropout makes the loss depend on the key
SEED = 1
KINDS = {"typed": lambda: jax.random.key(SEED), "legacy": lambda: jax.random.PRNGKey(SEED),
         "int": lambda: SEED}


@pytest.fixture(scope="module")
def params():
  return jcd.random_params(CONFIG, seed=0)


def _batch(b):
  rng = np.random.default_rng(b)
  images = rng.uniform(-1, 1, (b, 32, 32, 3)).astype(np.float32)
  latents = rng.normal(0, 5, (b, 4, 4, 4)).astype(np.float32)
  noise = rng.normal(size=images.shape).astype(np.float32)
  return images, latents, noise


@pytest.mark.parametrize("b", [1, 3])
def test_losses_are_the_same_for_each_kind_of_key(params, b):
  images, latents, noise = _batch(b)
  t_lo, t_hi = np.full(b, 100), np.full(b, 300)
  losses = {kind: np.asarray(jcd.consistency_loss(params, images, latents, t_lo, t_hi, noise,
                                                  config=CONFIG, dropout_key=make()))
            for kind, make in KINDS.items()}
  denoising = {kind: np.asarray(jcd.denoising_loss(params, images, latents, t_hi, noise,
                                                   config=CONFIG, dropout_key=make()))
               for kind, make in KINDS.items()}
  for got in (losses, denoising):
    assert got["legacy"].shape == (b,)
    np.testing.assert_array_equal(got["legacy"], got["typed"])
    np.testing.assert_array_equal(got["int"], got["typed"])
  # The key is used: another seed gives other dropout masks, so other losses.
  other = jcd.consistency_loss(params, images, latents, t_lo, t_hi, noise, config=CONFIG,
                               dropout_key=SEED + 1)
  assert not np.array_equal(np.asarray(other), losses["typed"])
  # A batch of keys, one per example, as the docs say: example i uses fold_in(key, i).
  keys = jcd.example_keys(jax.random.PRNGKey(SEED), b)
  np.testing.assert_array_equal(
      np.asarray(jcd.consistency_loss(params, images, latents, t_lo, t_hi, noise,
                                      config=CONFIG, dropout_key=keys)), losses["typed"])


@pytest.mark.parametrize("b", [1, 3])
def test_decodes_are_the_same_for_each_kind_of_key(params, b):
  _, latents, _ = _batch(b)
  nchw = latents.transpose(0, 3, 1, 2)
  out = {kind: np.asarray(jcd.decode(params, nchw, make(), config=CONFIG, schedule=(1.0,)))
         for kind, make in KINDS.items()}
  np.testing.assert_array_equal(out["legacy"], out["typed"])
  np.testing.assert_array_equal(out["int"], out["typed"])
