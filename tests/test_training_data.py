"""The trainer's image cache is bounded in bytes: many large images never pile up in host
memory, and crops stay the same whether their image was cached or read again. The prefetcher
makes a step's rows on a thread, ahead of time, and gives back exactly what was asked."""

import threading

import numpy as np
import pytest
from PIL import Image

from jaxconsdec.training import data

SIDE = 64
IMAGE_BYTES = SIDE * SIDE * 3


def _crops(tmp_path, cache_bytes, count=5):
  rng = np.random.default_rng(0)
  for i in range(count):
    pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / f"{i}.png")
  items = data.list_training_images([str(tmp_path)], 16, 1 << 30).items
  return data.TrainingCrops(items, 16, seed=0, cache_bytes=cache_bytes)


def test_the_image_cache_stays_within_its_bytes_and_rereads_what_it_dropped(tmp_path,
                                                                             monkeypatch):
  reads = []
  real = data.read_pixels
  monkeypatch.setattr(data, "read_pixels", lambda item: reads.append(item.path) or real(item))
  crops = _crops(tmp_path, cache_bytes=2 * IMAGE_BYTES)
  first = crops.rows(0, 20)
  assert crops.cached_bytes <= 2 * IMAGE_BYTES
  assert len(reads) > 5  # dropped images were read again
  # The same examples again are the same crops, cached or not.
  np.testing.assert_array_equal(crops.rows(0, 20), first)
  unbounded = _crops(tmp_path, cache_bytes=1 << 30)
  np.testing.assert_array_equal(unbounded.rows(0, 20), first)
  assert unbounded.cached_bytes == 5 * IMAGE_BYTES


def test_an_image_larger_than_the_cache_is_still_read(tmp_path):
  crops = _crops(tmp_path, cache_bytes=1, count=2)
  assert crops.rows(0, 4).shape == (4, 16, 16, 3)
  assert crops.cached_bytes == IMAGE_BYTES  # only the newest is kept


def test_the_prefetcher_gives_each_step_its_rows_made_on_its_thread(tmp_path, monkeypatch):
  crops = _crops(tmp_path, cache_bytes=1 << 30)
  want = {step: crops.rows(3 * step + 1, 3) for step in range(2, 9)}
  threads = set()
  real = crops.rows
  monkeypatch.setattr(crops, "rows", lambda first, count: threads.add(
      threading.current_thread().name) or real(first, count))
  prefetch = data.Prefetcher(crops, lambda step: 3 * step + 1, 3, start=2, end=9, depth=2)
  try:
    for step in range(2, 9):
      np.testing.assert_array_equal(prefetch.rows(step), want[step])
    with pytest.raises(ValueError, match="step 9"):  # past the end: nothing was made
      prefetch.rows(9)
  finally:
    prefetch.close()
  assert threads and all(name.startswith("jaxconsdec-crops") for name in threads)


def test_the_prefetcher_raises_what_making_a_step_raised_at_that_step(tmp_path, monkeypatch):
  crops = _crops(tmp_path, cache_bytes=1 << 30)
  real = crops.rows
  def rows(first, count):
    if first == 2:
      raise OSError(28, "No space left on device")
    return real(first, count)
  monkeypatch.setattr(crops, "rows", rows)
  prefetch = data.Prefetcher(crops, lambda step: step, 1, start=0, end=5)
  try:
    prefetch.rows(0), prefetch.rows(1)  # made after step 2 failed: unaffected
    with pytest.raises(OSError, match="No space"):
      prefetch.rows(2)
    assert prefetch.rows(3).shape == (1, 16, 16, 3)
  finally:
    prefetch.close()
