"""PSNR and SSIM against scikit-image's, on its own photos and on noise."""

import numpy as np
import pytest
import skimage.data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from jaxconsdec.metrics import psnr, ssim


def _pairs():
  rng = np.random.default_rng(0)
  for photo in (skimage.data.astronaut(), skimage.data.coffee()[:200, :300]):
    noisy = np.clip(photo + rng.normal(0, 12, photo.shape), 0, 255).astype(np.uint8)
    blurred = ((photo[:-1, :-1].astype(int) + photo[1:, 1:]) // 2).astype(np.uint8)
    yield photo, noisy
    yield photo[:-1, :-1], blurred
  yield (rng.integers(0, 256, (40, 56, 3), np.uint8),) * 2  # identical: ssim 1


@pytest.mark.parametrize("pair", list(range(5)))
def test_metrics_equal_scikit_image(pair):
  a, b = list(_pairs())[pair]
  want_ssim = structural_similarity(a, b, channel_axis=-1, data_range=255)
  assert abs(float(ssim(a, b)) - want_ssim) <= 1e-4, (float(ssim(a, b)), want_ssim)
  if not np.array_equal(a, b):
    want_psnr = peak_signal_noise_ratio(a, b, data_range=255)
    assert abs(float(psnr(a, b)) - want_psnr) <= 1e-4 * want_psnr


def _direct_block_means(x, b=8):
  """Each whole b x b block's mean, by loops."""
  h, w = x.shape[0] // b, x.shape[1] // b
  return np.array([[x[i * b:(i + 1) * b, j * b:(j + 1) * b].reshape(-1, x.shape[2]).mean(0)
                    for j in range(w)] for i in range(h)], np.float64)


def _direct_detail_energy(x, b=8):
  total = 0.0
  for i in range(x.shape[0] // b):
    for j in range(x.shape[1] // b):
      block = x[i * b:(i + 1) * b, j * b:(j + 1) * b].astype(np.float64)
      total += np.sum((block - block.reshape(-1, x.shape[2]).mean(0)) ** 2)
  return total


@pytest.mark.parametrize("pair", list(range(4)))
def test_colour_fidelity_and_detail_ratio_equal_direct_formulas(pair):
  from jaxconsdec.metrics import colour_psnr, detail_ratio
  a, b = list(_pairs())[pair]
  a, b = a[:45, :61], b[:45, :61]  # sides that are not multiples of 8: whole blocks count
  mse = np.mean((_direct_block_means(a) - _direct_block_means(b)) ** 2)
  assert colour_psnr(a, b) == pytest.approx(10 * np.log10(255 ** 2 / mse), rel=1e-9)
  want = _direct_detail_energy(b) / _direct_detail_energy(a)
  assert detail_ratio(a, b) == pytest.approx(want, rel=1e-9)


def test_blur_baseline_smears_detail_and_keeps_colour():
  from jaxconsdec.metrics import blur_baseline, colour_psnr, detail_ratio
  photo = skimage.data.astronaut()
  blur = blur_baseline(photo)
  assert blur.shape == photo.shape and blur.dtype == np.uint8
  flat = np.full((24, 40, 3), (200, 30, 90), np.uint8)
  np.testing.assert_array_equal(blur_baseline(flat), flat)  # nothing to lose
  # Pooling onto the grid keeps colour and removes detail; upsampling puts back none.
  assert colour_psnr(photo, blur) > 30 and detail_ratio(photo, blur) < 0.5
  assert 20 < float(psnr(photo, blur)) < 30
