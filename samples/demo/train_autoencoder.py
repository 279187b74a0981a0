"""Trains the demo's small frozen encoder: the SD VAE architecture at tiny widths
(`jaxconsdec.TINY_VAE`, 4-channel latents at 1/8 resolution), as a plain autoencoder.

Why: a randomly initialised encoder of this architecture ends in GroupNorm, which removes
each image's overall colour and brightness; no decoder can recover them (a linear decoder on
its latents reaches 11-16 dB). So the demo first fits the tiny VAE's encoder and decoder to
reconstruct 64x64 crops of the training photos (mean squared error on the posterior mean; no
KL term, GAN or perceptual loss: this is not how SD's VAE was trained, and not a VAE
trainer). The encoder is then frozen for `jaxconsdec train`; the VAE's own decoder becomes
the "SD decoder" column of the comparisons.

    python samples/demo/train_autoencoder.py PHOTOS_DIR OUT_CKPT [STEPS]
"""

import glob
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

import jaxconsdec as jcd
from jaxconsdec import checkpoint
from jaxconsdec.models.vae import VAE, posterior

CROP, BATCH, SEED = 64, 16, 0


def main(photos: str, out: str, steps: int = 2000) -> None:
  images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(glob.glob(
      os.path.join(photos, "*.png")))]
  cfg = jcd.TINY_VAE
  params = jcd.random_params(cfg, SEED)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, 100, steps, 1e-5)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  opt_state = tx.init(params)
  vae = VAE(cfg)

  def loss_fn(p, x):
    moments = vae.apply({"params": p}, x, method=VAE.encode_moments)
    mean, _ = posterior(moments, cfg.latent_channels)
    return jnp.mean(jnp.square(vae.apply({"params": p}, mean, method=VAE.decode) - x))

  @jax.jit
  def step(p, s, x):
    loss, grads = jax.value_and_grad(loss_fn)(p, x)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  rng = np.random.default_rng(SEED)
  start = time.perf_counter()
  for n in range(steps):
    batch = []
    for _ in range(BATCH):
      im = images[rng.integers(len(images))]
      t, l = rng.integers(0, im.shape[0] - CROP + 1), rng.integers(0, im.shape[1] - CROP + 1)
      crop = im[t:t + CROP, l:l + CROP]
      batch.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    params, opt_state, loss = step(params, opt_state,
                                   np.stack(batch).astype(np.float32) / 127.5 - 1.0)
    if n % 200 == 0 or n == steps - 1:
      print(f"step {n}: mse {float(loss):.5f} ({time.perf_counter() - start:.0f} s)", flush=True)
  checkpoint.save(out, vae_params=jax.device_get(params), vae_config=cfg,
                  provenance={"trained_by": "samples/demo/train_autoencoder.py",
                              "steps": steps, "crop": CROP, "batch": BATCH,
                              "loss": "mse of the posterior mean's reconstruction",
                              "photos": sorted(os.listdir(photos))},
                  force=os.path.exists(out))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
