"""Writes the sample latents shipped in samples/latents/ (run from the repository root).

They are synthetic: smooth random fields with the per-channel mean and spread of raw Stable
Diffusion latents (raw = pipeline latents / 0.18215), not encodings of real pictures. They
exist so the batch job has something to decode on a fresh machine. Three files show the
input kinds: one latent, a batch, and an .npz holding two sizes.
"""

import os

import numpy as np

from jaxconsdec.config import SD_LATENT_MEAN as LATENT_MEAN, SD_LATENT_STD as LATENT_STD
from jaxconsdec.config import SD_SCALING_FACTOR as LATENT_SCALE


def smooth_latents(rng, batch, h, w):
  """(batch, 4, h, w) float32: low-frequency noise scaled to raw-latent statistics."""
  coarse = rng.standard_normal((batch, 4, h // 4 + 1, w // 4 + 1))
  fine = np.kron(coarse, np.ones((1, 1, 4, 4)))[:, :, :h, :w]
  fine = 0.7 * fine + 0.3 * rng.standard_normal((batch, 4, h, w))
  mean = np.asarray(LATENT_MEAN)[None, :, None, None]
  std = np.asarray(LATENT_STD)[None, :, None, None]
  return ((fine * std + mean) / LATENT_SCALE).astype(np.float32)


def main():
  rng = np.random.default_rng(2026)
  out = os.path.join(os.path.dirname(__file__), "latents")
  os.makedirs(out, exist_ok=True)
  np.save(os.path.join(out, "portrait.npy"), smooth_latents(rng, 1, 16, 12)[0])
  np.save(os.path.join(out, "batch.npy"), smooth_latents(rng, 5, 16, 16))
  np.savez(os.path.join(out, "mixed.npz"), small=smooth_latents(rng, 2, 8, 8),
           wide=smooth_latents(rng, 1, 8, 16)[0])


if __name__ == "__main__":
  main()
