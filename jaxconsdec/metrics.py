"""Reconstruction metrics in JAX: PSNR and SSIM, as scikit-image computes them.

Both take two images of the same shape (H, W, C), on the same scale (`data_range`: 255 for
pixels), and are jit-able. They are written here rather than taken from a JAX image library
to match scikit-image's definitions exactly, which tests/test_metrics.py checks:

- `psnr` is `peak_signal_noise_ratio`: 10 log10(R^2 / MSE), the MSE over every pixel and
  channel.
- `ssim` is `structural_similarity` with its defaults: a 7x7 uniform window, K1 = 0.01,
  K2 = 0.03, sample covariances (49/48), the mean of the SSIM map over the pixels whose
  window lies inside the image, then the mean over channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

WINDOW = 7
K1, K2 = 0.01, 0.03


def psnr(reference: jax.Array, image: jax.Array, data_range: float = 255.0) -> jax.Array:
  """Peak signal-to-noise ratio in dB (inf for identical images)."""
  a, b = jnp.asarray(reference, jnp.float32), jnp.asarray(image, jnp.float32)
  mse = jnp.mean(jnp.square(a - b))
  return 10.0 * jnp.log10(data_range ** 2 / mse)


def ssim(reference: jax.Array, image: jax.Array, data_range: float = 255.0) -> jax.Array:
  """Mean structural similarity over the image and its channels, in [-1, 1]."""
  a = jnp.moveaxis(jnp.asarray(reference, jnp.float32), -1, 0)[..., None]  # (C, H, W, 1)
  b = jnp.moveaxis(jnp.asarray(image, jnp.float32), -1, 0)[..., None]
  box = jnp.full((WINDOW, WINDOW, 1, 1), 1.0 / WINDOW ** 2, jnp.float32)

  def mean(x):  # the window's mean at every position whose window is inside the image
    return jax.lax.conv_general_dilated(x, box, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)

  n = WINDOW ** 2
  cov = n / (n - 1)
  ua, ub = mean(a), mean(b)
  va = cov * (mean(a * a) - ua * ua)
  vb = cov * (mean(b * b) - ub * ub)
  vab = cov * (mean(a * b) - ua * ub)
  c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
  s = ((2 * ua * ub + c1) * (2 * vab + c2)) / ((ua * ua + ub * ub + c1) * (va + vb + c2))
  return jnp.mean(jnp.mean(s, axis=(1, 2, 3)))
