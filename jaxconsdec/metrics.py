"""Reconstruction metrics: PSNR and SSIM in JAX, as scikit-image computes them; colour
fidelity, detail ratio and the blur baseline on the latent grid (below).

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
import numpy as np
from PIL import Image

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


# Metrics that tell a decoder that keeps colour and draws detail from one that blurs (PSNR
# alone rewards blur). Host-side numpy on (H, W, C) pixels; BLOCK is the latent grid: one
# latent pixel per 8x8 block of the image. Only the whole blocks of an image count.
BLOCK = 8


def block_means(image: np.ndarray, block: int = BLOCK) -> np.ndarray:
  """The mean of each whole block x block square, float64 (H // block, W // block, C)."""
  x = np.asarray(image, np.float64)
  h, w = x.shape[0] // block * block, x.shape[1] // block * block
  if not h or not w:
    raise ValueError(f"an image of {x.shape[:2]} holds no whole {block}x{block} block")
  return x[:h, :w].reshape(h // block, block, w // block, block, -1).mean(axis=(1, 3))


def _detail(image: np.ndarray, block: int) -> np.ndarray:
  """The image (its whole blocks) less each block's mean."""
  means = block_means(image, block)
  h, w = means.shape[0] * block, means.shape[1] * block
  return (np.asarray(image, np.float64)[:h, :w]
          - np.repeat(np.repeat(means, block, axis=0), block, axis=1))


def colour_psnr(reference: np.ndarray, image: np.ndarray, block: int = BLOCK,
                data_range: float = 255.0) -> float:
  """Colour fidelity: the PSNR (dB) of the block means, what survives at the latent grid's
  resolution (colour and brightness, not detail)."""
  mse = np.mean(np.square(block_means(reference, block) - block_means(image, block)))
  return float(10.0 * np.log10(data_range ** 2 / mse)) if mse else float("inf")


def detail_ratio(reference: np.ndarray, image: np.ndarray, block: int = BLOCK) -> float:
  """The energy of the image less its block means, over the reference's: below 1 the
  decoder smears detail, above 1 it adds grain or invents texture (1 for a flat
  reference: there is no detail to compare)."""
  want = np.sum(np.square(_detail(reference, block)))
  got = np.sum(np.square(_detail(image, block)))
  return float(got / want) if want else 1.0


# What a decode is scored on against its original (all of them take uint8 pixels (H, W, C)).
SCORES = {"psnr": psnr, "ssim": ssim, "colour_psnr": colour_psnr,
          "detail_ratio": detail_ratio}


def blur_baseline(pixels: np.ndarray, block: int = BLOCK) -> np.ndarray:
  """The honest baseline a decoder must beat: the picture average-pooled onto the latent
  grid (its whole blocks) and upsampled bicubically back to its size, uint8 (H, W, C)."""
  means = np.clip(np.rint(block_means(pixels, block)), 0, 255).astype(np.uint8)
  h, w = pixels.shape[:2]
  return np.asarray(Image.fromarray(means).resize((w, h), Image.Resampling.BICUBIC))
