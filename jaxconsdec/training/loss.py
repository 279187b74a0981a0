"""The consistency training loss (docs/training.md, section 2), a public pure function.

For each example: x_hi = sqrt(acp[t_hi]) x0 + sqrt(1 - acp[t_hi]) eps; the student
S = D(x_hi, t_hi; z); the teacher T = x0 where t_lo is the virtual level (-1), else
stop_gradient(D(x_lo, t_lo; z)) with the same eps, the same params and the same dropout
key; loss = (sqrt(|S - T|^2 + c^2) - c) / (sigma(t_hi) - sigma(t_lo)), the pseudo-Huber of
the whole image's error norm (not per element), c = 0.00054 sqrt(3 H W).

D is the sampler's denoiser, `c_skip x + c_out F(concat(c_in x, z), t)[..., :3]`, unclamped.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxconsdec.config import UNetConfig
from jaxconsdec.models.unet import UNet
from jaxconsdec.keys import batch_keys
from jaxconsdec.sampler import prepare_latents
from jaxconsdec.weights import unwrap_variables
from jaxconsdec.schedule import SIGMA_DATA, TABLES
from jaxconsdec.training.pairs import SIGMAS, VIRTUAL_LEVEL

HUBER_C_PER_SQRT_DIM = 0.00054  # iCT: c = 0.00054 sqrt(d), d = 3 H W


def huber_c(height: int, width: int) -> float:
  return HUBER_C_PER_SQRT_DIM * float(np.sqrt(3 * height * width))


def denoise(params, x: jax.Array, t: jax.Array, z: jax.Array, *, config: UNetConfig,
            dropout_keys: Optional[jax.Array] = None, remat: bool = False) -> jax.Array:
  """D(x_t, t; z): the decoder's estimate of the clean image, float32 (B, H, W, 3), no clamp.

  x (B, H, W, 3) float32, t (B,) int in [0, 1024), z the prepared conditioning. With
  `dropout_keys` (B,), example i's dropout mask comes from key i alone.
  """
  t = t.astype(jnp.int32)
  coef = lambda table: jnp.asarray(table)[t][:, None, None, None]
  net_in = jnp.concatenate([coef(TABLES.c_in) * x, z], axis=-1)
  unet = UNet(config, remat=remat)
  if dropout_keys is None:
    out = unet.apply({"params": params}, net_in, t)
  else:  # one example at a time, so that a mask never depends on the batch around it
    one = lambda xi, ti, k: unet.apply({"params": params}, xi[None], ti[None],
                                       rngs={"dropout": k})[0]
    out = jax.vmap(one)(net_in, t, dropout_keys)
  return coef(TABLES.c_out) * out[..., :3].astype(jnp.float32) + coef(TABLES.c_skip) * x


# How a pair's distance is weighted: "ict", 1 / (sigma_hi - sigma_lo) (iCT); "uniform", 1
# (CM's lambda = 1), which gives the pairs at the top of the table, where a decoder samples,
# more of the gradient (docs/training.md, the demo's ablations).
PAIR_WEIGHTINGS = ("ict", "uniform")


def consistency_loss(params, images, latents, t_lo, t_hi, noise, *, config: UNetConfig,
                     dropout_key=None, remat: bool = False,
                     weighting: str = "ict") -> jax.Array:
  """Per-example consistency-training losses, float32 (B,).

  Args:
    params: the decoder UNet's params (student and teacher alike; no EMA teacher).
    images: clean images x0, (B, H, W, 3) NHWC, floats in [-1, 1].
    latents: their raw latents (B, H/8, W/8, C_lat) NHWC (what `encode` returns, NHWC).
    t_lo, t_hi: integer timesteps (B,), t_lo < t_hi; t_lo = -1 is the virtual sigma = 0
      level, where the teacher is the clean image. (t_lo = t_hi is weighted 1.)
    noise: eps shaped like `images`, shared by the two points of a pair.
    config: the decoder's config (its latent space normalises the latents).
    dropout_key: None (no dropout), one key (typed, a legacy PRNGKey or an int seed; example
      i then uses fold_in(key, i), as `decode` does), or one key per example (B,); the
      student and the teacher use the same masks, so t_lo = t_hi gives exactly zero.
    remat: recompute ResBlock activations in the backward pass (memory for compute).
    weighting: "ict" (1 / (sigma_hi - sigma_lo)) or "uniform" (1), see PAIR_WEIGHTINGS.

  The mean over examples is the batch loss. Whatever `config.dtype`, the images, the
  denoiser's output and the loss are float32.
  """
  if weighting not in PAIR_WEIGHTINGS:
    raise ValueError(f"weighting must be one of {PAIR_WEIGHTINGS}, got {weighting!r}")
  params, x0, eps, z, keys = _checked(params, images, latents, noise, config, dropout_key)
  b, height, width, _ = x0.shape
  t_lo, t_hi = jnp.asarray(t_lo, jnp.int32), jnp.asarray(t_hi, jnp.int32)
  if t_lo.shape != (b,) or t_hi.shape != (b,):
    raise ValueError(f"t_lo and t_hi must have shape ({b},), got {t_lo.shape}, {t_hi.shape}")
  run = lambda p, t: denoise(p, _noisy(x0, eps, t), t, z, config=config, dropout_keys=keys,
                             remat=remat)
  student = run(params, t_hi)
  boundary = t_lo == VIRTUAL_LEVEL
  # The teacher runs at t_lo (a clipped stand-in on boundary pairs, whose result is unused).
  teacher = jax.lax.stop_gradient(run(params, jnp.where(boundary, 0, t_lo)))
  teacher = jnp.where(boundary[:, None, None, None], x0, teacher)

  sigmas = jnp.asarray(SIGMAS, jnp.float32)
  gap = sigmas[t_hi] - jnp.where(boundary, 0.0, sigmas[jnp.maximum(t_lo, 0)])
  # A pair of equal levels (never drawn) is weighted 1: its loss is then the plain distance,
  # exactly 0 when student and teacher agree, instead of 0/0.
  if weighting == "uniform":
    weight = jnp.ones_like(gap)
  else:
    weight = jnp.where(t_lo == t_hi, 1.0, 1.0 / jnp.where(t_lo == t_hi, 1.0, gap))
  c = huber_c(height, width)
  norm2 = jnp.sum(jnp.square(student - teacher), axis=(1, 2, 3))
  # sqrt(n + c^2) - c, written as n / (sqrt(n + c^2) + c): the same value without float32
  # cancellation when the error norm is far below c.
  return weight * norm2 / (jnp.sqrt(norm2 + c * c) + c)


def denoising_loss(params, images, latents, t, noise, *, config: UNetConfig, dropout_key=None,
                   remat: bool = False) -> jax.Array:
  """Per-example denoising losses, float32 (B,): stage 1 of a new decoder (docs/training.md,
  section 3), `lambda(sigma_t) mean((D(x_t, t; z) - x0)^2)` with EDM's weight
  lambda = (sigma^2 + sd^2) / (sigma sd)^2, sd = 0.5: the target is the clean image.
  Arguments as `consistency_loss`, with one timestep `t` (B,) per example."""
  params, x0, eps, z, keys = _checked(params, images, latents, noise, config, dropout_key)
  t = jnp.asarray(t, jnp.int32)
  if t.shape != (x0.shape[0],):
    raise ValueError(f"t must have shape ({x0.shape[0]},), got {t.shape}")
  out = denoise(params, _noisy(x0, eps, t), t, z, config=config, dropout_keys=keys, remat=remat)
  sigma = jnp.asarray(SIGMAS, jnp.float32)[t]
  weight = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
  return weight * jnp.mean(jnp.square(out - x0), axis=(1, 2, 3))


def _checked(params, images, latents, noise, config, dropout_key):
  """The arguments both losses share, checked: (params, x0, eps, z, per-example dropout
  keys or None)."""
  params = unwrap_variables(params)
  x0 = jnp.asarray(images, jnp.float32)
  eps = jnp.asarray(noise, jnp.float32)
  if x0.ndim != 4 or x0.shape[-1] != 3 or eps.shape != x0.shape:
    raise ValueError(f"images must be (B, H, W, 3) NHWC and noise shaped like them; got"
                     f" {x0.shape} and {eps.shape}")
  z = prepare_latents(latents, "NHWC", config)
  if z.shape[1:3] != x0.shape[1:3]:
    raise ValueError(f"latents {tuple(latents.shape)} are not 1/8 of images {x0.shape}")
  keys = None
  if dropout_key is not None:
    keys = batch_keys(dropout_key, x0.shape[0])
  return params, x0, eps, z, keys


def _noisy(x0, eps, t):
  """x_t = sqrt(acp[t]) x0 + sqrt(1 - acp[t]) eps, per example."""
  coef = lambda table: jnp.asarray(table)[t][:, None, None, None]
  return coef(TABLES.sqrt_alphas_cumprod) * x0 + coef(TABLES.sqrt_one_minus_alphas_cumprod) * eps
