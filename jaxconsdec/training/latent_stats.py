"""Per-channel mean and std of a training set's scaled latents (Welford), on every process.

A decoder for a new latent space conditions on `((raw - shift) * scale - mean) / std`; the
statistics are measured over the training images (each one's centered crop), each process
over its share, and merged with Chan et al.'s parallel formula so the result does not
depend on how the images were split.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from jaxconsdec import multihost


class Welford:
  """Running count, mean and sum of squared deviations per channel, float64."""

  def __init__(self, channels: int):
    self.n = 0
    self.mean = np.zeros(channels)
    self.m2 = np.zeros(channels)

  def add(self, values: np.ndarray) -> None:
    """values (..., channels): every position is one observation of each channel."""
    x = np.asarray(values, np.float64).reshape(-1, self.mean.shape[0])
    self.merge(len(x), x.mean(axis=0), ((x - x.mean(axis=0)) ** 2).sum(axis=0))

  def merge(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
    if n == 0:
      return
    total = self.n + n
    delta = np.asarray(mean) - self.mean
    self.mean = self.mean + delta * n / total
    self.m2 = self.m2 + np.asarray(m2) + delta ** 2 * self.n * n / total
    self.n = total

  @property
  def std(self) -> np.ndarray:
    return np.sqrt(self.m2 / max(self.n - 1, 1))


def measure(count: int, latents_of: Callable[[Sequence[int]], np.ndarray], channels: int,
            scale: float, shift: float, batch: int = 8) -> tuple[tuple[float, ...],
                                                                 tuple[float, ...]]:
  """Mean and std of `(raw - shift) * scale` over images 0..count-1: this process encodes
  images p, p + P, ... (`latents_of(indices)` -> raw latents NHWC), then all merge."""
  local = Welford(channels)
  mine = list(range(jax.process_index(), count, jax.process_count()))
  for start in range(0, len(mine), batch):
    raw = latents_of(mine[start:start + batch])
    local.add((np.asarray(raw, np.float64) - shift) * scale)
  total = Welford(channels)
  for n, mean, m2 in multihost.gather_json([local.n, local.mean.tolist(), local.m2.tolist()]):
    total.merge(n, np.asarray(mean), np.asarray(m2))
  if total.n < 2:
    raise ValueError("too few latent pixels to measure their statistics")
  return tuple(float(v) for v in total.mean), tuple(float(v) for v in total.std)
