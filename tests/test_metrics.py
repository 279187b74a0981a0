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
