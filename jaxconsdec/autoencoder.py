"""The SD VAE's public functions: `encode` (images -> raw latents) and `vae_decode` (raw
latents -> images through the VAE's own GAN decoder).

Both are jit-compiled, run inside a caller's own `jax.jit`, and check their inputs before
any compute, as `decode` does. Keys follow `decode`'s rules: one key for the batch (example
i uses `fold_in(key, i)`, `example_keys`) or one key per example; example i's posterior
sample is `mean + std * normal(k_i)`, so it never depends on the rest of its batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxconsdec import layout as layouts
from jaxconsdec import xla_options
from jaxconsdec.config import SD_VAE, VAEConfig
from jaxconsdec.models.vae import HALVES, VAE, posterior
from jaxconsdec.keys import batch_keys
from jaxconsdec.weights import check_params, unwrap_variables


def encode(vae_params, images, key=None, *, config: VAEConfig = SD_VAE,
           layout: str = "NCHW") -> jax.Array:
  """Images -> raw latents (what the decoders take), the posterior's mean or a sample.

  Args:
    vae_params: the VAE's params: the encoder half (encoder, quant_conv) or the whole tree.
    images: (B, 3, H, W) for "NCHW" or (B, H, W, 3) for "NHWC"; floats in [-1, 1], or uint8
      pixels, converted as `x / 127.5 - 1` (0 -> -1, 255 -> 1). H and W must divide by the
      VAE's downsampling factor (8 for every SD VAE).
    key: None for the posterior mean (diffusers' `latent_dist.mean`); a key, int seed or
      batch of B keys for a sample.
    config: the VAE the params belong to.
    layout: of the images and of the returned latents.

  Returns:
    float32 raw latents, (B, C, H/8, W/8) for "NCHW" (pipelines use
    `(raw - shift_factor) * scaling_factor`).
  """
  b, _, _ = check_images(images, layout, config)
  params = encoder_half(vae_params, config)
  keys = None if key is None else batch_keys(key, b)
  program = xla_options.program_for(nested_encode, _top_level_encode, params, images, keys)
  return program(params, images, keys, config=config, layout=layout)


def vae_decode(vae_params, latents, *, config: VAEConfig = SD_VAE, layout: str = "NCHW",
               clamp: bool = True) -> jax.Array:
  """Raw latents -> images, through the VAE's own decoder (the SD pipeline's).

  Args:
    vae_params: the decoder half (post_quant_conv, decoder) or the whole tree.
    latents: (B, C, h, w) for "NCHW" or (B, h, w, C) for "NHWC", raw, any float dtype.
    clamp: clamp to [-1, 1], as pipelines do before turning images into pixels; False
      returns the decoder's output as it is (diffusers' `vae.decode(z).sample`).

  Returns:
    float32 images, (B, 3, 8h, 8w) for "NCHW".
  """
  layouts.check_layout(layout)
  _check_batch(latents, "latents", layout, config.latent_channels)
  params = _half(vae_params, config, "decoder")
  program = xla_options.program_for(_nested_vae_decode, _top_level_vae_decode, params, latents)
  return program(params, latents, config=config, layout=layout, clamp=bool(clamp))


def check_images(images, layout: str, config: VAEConfig) -> tuple[int, int, int]:
  """Validates images for `encode`; returns (batch, H, W). Concrete float images must lie in
  [-1, 1] (checked here; a traced array cannot be)."""
  layouts.check_layout(layout)
  b, h, w = _check_batch(images, "images", layout, config.in_channels)
  if images.dtype != jnp.uint8 and not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"images must be floats in [-1, 1] or uint8 pixels, got {images.dtype}")
  f = config.downsample_factor
  if h % f or w % f:
    raise ValueError(f"image size {h}x{w} does not divide by the VAE's downsampling factor"
                     f" {f}: crop or pad it to a multiple of {f}")
  if images.dtype != jnp.uint8 and not xla_options.is_traced(images):
    lo, hi = float(np.min(images)), float(np.max(images))
    if not (-1.0 <= lo and hi <= 1.0):  # also catches NaN
      raise ValueError(f"images hold values in [{lo}, {hi}]: floats must lie in [-1, 1]"
                       " (x / 127.5 - 1 from pixels), or pass uint8 pixels")
  return b, h, w


def _check_batch(x, what: str, layout: str, channels: int) -> tuple[int, int, int]:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{what} must be an array, got {type(x).__name__}")
  shape = tuple(x.shape)
  want = f"(B, {channels}, h, w)" if layout == "NCHW" else f"(B, h, w, {channels})"
  if len(shape) != 4:
    raise ValueError(f"{what} of shape {shape}: expected a batch {want} ({layout})")
  caxis = layouts.channel_axis(layout)
  if shape[caxis] != channels:
    raise ValueError(f"{what} of shape {shape} have {shape[caxis]} channels where {layout}"
                     f" puts them; this VAE takes {channels}: {want}")
  if what == "latents" and not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"latents must be floats, got {x.dtype}")
  b, h, w = (shape[0], *[d for i, d in enumerate(shape[1:], 1) if i != caxis])
  if 0 in (b, h, w):
    raise ValueError(f"{what} of shape {shape} are empty")
  return b, h, w


def encoder_half(vae_params, config: VAEConfig) -> dict:
  """The encoder's entries of VAE params (all of them, or the encoder half alone), checked."""
  return _half(vae_params, config, "encoder")


def _half(vae_params, config: VAEConfig, half: str) -> dict:
  """The entries of one half, checked against the config (the other half may be absent)."""
  params = unwrap_variables(vae_params)
  if half not in params:
    raise ValueError(f"the VAE params hold no {half}: they have only {sorted(params)} (a"
                     " ConsistencyDecoderVAE file, for one, holds only the encoder)")
  part = {n: params[n] for n in HALVES[half] if n in params}
  check_params(part, config, halves=(half,))
  return part


def _encode_impl(params, images, keys, *, config, layout):
  x = layouts.to_nhwc(images, layout)
  x = x.astype(jnp.float32) / 127.5 - 1.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  moments = VAE(config).apply({"params": params}, x, method=VAE.encode_moments)
  mean, std = posterior(moments, config.latent_channels)
  if keys is not None:
    eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(keys)
    mean = mean + std * eps
  return layouts.from_nhwc(mean, layout)


def _vae_decode_impl(params, latents, *, config, layout, clamp):
  z = layouts.to_nhwc(latents.astype(jnp.float32), layout)
  images = VAE(config).apply({"params": params}, z, method=VAE.decode)
  return layouts.from_nhwc(jnp.clip(images, -1.0, 1.0) if clamp else images, layout)


# The programs, for jaxconsdec's modules (the sharded encoder runs `nested_encode`).
nested_encode = jax.jit(_encode_impl, static_argnames=("config", "layout"))
_top_level_encode = xla_options.top_level_jit(_encode_impl, ("config", "layout"))
_nested_vae_decode = jax.jit(_vae_decode_impl, static_argnames=("config", "layout", "clamp"))
_top_level_vae_decode = xla_options.top_level_jit(_vae_decode_impl,
                                                  ("config", "layout", "clamp"))
