"""The consistency sampler and the public `decode`.

Algorithm (docs/model.md, the original OpenAI loop):

    z  = nearest_upsample_x8(((latents - shift) * scale - mean) / std)   # SD 1.x: shift 0,
                                                                        # scale 0.18215
    x  = 0
    for t in timesteps:
        x = sqrt_acp[t] * x + sqrt_1m_acp[t] * noise_t
        out = unet(concat([c_in[t] * x, z]), t)
        x = c_out[t] * out[..., :3] + c_skip[t] * x      # clamped to [-1, 1] if clamp
    return x

Noise: example i of a batch draws its step-s noise as
`jax.random.normal(jax.random.fold_in(k_i, s), (8h, 8w, 3))` in NHWC, where k_i is the
example's key. With one key `k` for the batch, `k_i = jax.random.fold_in(k, i)`
(`example_keys`). An example's noise thus depends only on its own key, never on the batch
it sits in: decoding `latents[i:i+1]` with `example_keys(k, B)[i:i+1]` reproduces example i.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxconsdec import layout as layouts
from jaxconsdec import xla_options
from jaxconsdec.config import CONSISTENCY_DECODER, UNetConfig
from jaxconsdec.schedule import NUM_TRAIN_TIMESTEPS, TABLES, timesteps_for
from jaxconsdec.models.unet import UNet
from jaxconsdec.keys import batch_keys
from jaxconsdec.weights import check_params, unwrap_variables

UPSAMPLE = 8  # latent pixel -> 8x8 image pixels


def check_latents(latents, layout: str, config: UNetConfig) -> tuple[int, int, int]:
  """Validates shape and dtype; returns (batch, h, w) of the latents."""
  if not hasattr(latents, "shape") or not hasattr(latents, "dtype"):
    raise TypeError(f"latents must be an array, got {type(latents).__name__}")
  shape = tuple(latents.shape)
  caxis = layouts.channel_axis(layout)
  if len(shape) == 3:
    c = config.latent_channels
    raise ValueError(f"latents of shape {shape} are unbatched: decode takes a batch"
                     f" ({f'B, {c}, h, w' if layout == 'NCHW' else f'B, h, w, {c}'}); add a"
                     " batch axis with latents[None]")
  if len(shape) != 4:
    raise ValueError(f"latents must have rank 4 ({layout}), got shape {shape}")
  channels = shape[caxis]
  if channels != config.latent_channels:
    raise ValueError(channels_message(channels, config, layout,
                                      shape[layouts.channel_axis(_other(layout))]))
  if not jnp.issubdtype(latents.dtype, jnp.floating):
    raise TypeError(f"latents must be a float array, got dtype {latents.dtype}")
  b, h, w = (shape[0], *[d for i, d in enumerate(shape[1:], 1) if i != caxis])
  if b == 0 or h == 0 or w == 0:
    raise ValueError(f"latents of shape {shape} are empty")
  if (UPSAMPLE * h) % config.downsample_factor or (UPSAMPLE * w) % config.downsample_factor:
    raise ValueError(f"image size {UPSAMPLE * h}x{UPSAMPLE * w} does not divide by the UNet's"
                     f" downsampling factor {config.downsample_factor}")
  return b, h, w


def _other(layout: str) -> str:
  return "NHWC" if layout == "NCHW" else "NCHW"


def channels_message(channels: int, config: UNetConfig, layout: str,
                     channels_if_other_layout: int) -> str:
  """Why latents with `channels` channels cannot be decoded by `config`, and what might fix
  it (the one wording for `decode` and the batch job's listing)."""
  msg = f"latents have {channels} channels where {layout} puts them; "
  if config.latent_channels == 4 and config.latent_mean == CONSISTENCY_DECODER.latent_mean:
    msg += "the Consistency Decoder decodes Stable Diffusion 1.x/2.x latents, which have 4."
    if channels == 16:
      msg += " 16 channels are SD3/FLUX latents, which this decoder cannot decode."
  else:
    msg += f"this decoder takes {config.latent_channels}."
  if channels_if_other_layout == config.latent_channels:
    msg += (f" The shape fits layout={_other(layout)!r} (--layout {_other(layout)}): pass that"
            " if it is your layout.")
  return msg


def _check_noise(noise, steps: int, out_shape: tuple[int, ...], layout: str) -> jax.Array:
  """One array per step, each shaped like the output -> (steps, B, H, W, 3) NHWC float32."""
  noise = list(noise)
  if len(noise) != steps:
    raise ValueError(f"noise must hold one array per schedule step: {steps} expected,"
                     f" {len(noise)} given")
  for i, n in enumerate(noise):
    if tuple(jnp.shape(n)) != out_shape:
      raise ValueError(f"noise[{i}] has shape {tuple(jnp.shape(n))}; each step's noise must be"
                       f" shaped like the output, {out_shape} ({layout})")
  return jnp.stack([layouts.to_nhwc(jnp.asarray(n, jnp.float32), layout) for n in noise])


def decode(params, latents, key, *, config: UNetConfig = CONSISTENCY_DECODER,
           schedule: Sequence[float] = (1.0, 0.5), clamp: bool = True,
           noise: Optional[Sequence[Any]] = None, layout: str = "NCHW") -> jax.Array:
  """Decodes raw latents (of the latent space `config` describes) into images in [-1, 1].

  Args:
    params: the UNet param tree (from `params_from_torch`, a checkpoint, or `UNet.init`).
    latents: *raw* latents, i.e. pipeline latents / scaling_factor + shift_factor (for SD
      1.x/2.x: / 0.18215), (B, C, h, w) for "NCHW" or (B, h, w, C) for "NHWC", C =
      `config.latent_channels`. Any float dtype.
    key: one key for the batch (`jax.random.key`, a legacy uint32 key, or an int seed), or a
      batch of B keys, one per example. See the module docstring for how noise is derived.
    config: the architecture the params belong to.
    schedule: fractions of the training schedule in [0, 1], one UNet call each; mapped to
      timesteps as the original does ((1.0, 0.5) -> t = 1008, 512; (1.0,) is one step).
    clamp: clamp the image to [-1, 1] after every step (original); False is diffusers'.
    noise: optional, one array per step shaped like the output, used instead of drawing.
    layout: "NCHW" or "NHWC", for both the latents and the returned images.

  Returns:
    float32 images, (B, 3, 8h, 8w) for "NCHW" or (B, 8h, 8w, 3) for "NHWC".

  Jit-compiled per (shapes, config, schedule, clamp, layout); can be called inside `jax.jit`.
  """
  layouts.check_layout(layout)
  if config.num_train_timesteps != NUM_TRAIN_TIMESTEPS:
    raise ValueError(f"the consistency sampler indexes a {NUM_TRAIN_TIMESTEPS}-step schedule;"
                     f" config.num_train_timesteps is {config.num_train_timesteps}")
    # (the UNet itself works with other table sizes; the sampler's timesteps do not)
  timesteps = timesteps_for(schedule)
  b, h, w = check_latents(latents, layout, config)
  params = unwrap_variables(params)
  check_params(params, config)
  out_shape = layouts.shape_in_layout(b, UPSAMPLE * h, UPSAMPLE * w, 3, layout)
  if noise is not None:
    noise = _check_noise(noise, len(timesteps), out_shape, layout)
  keys = batch_keys(key, b)  # computes (a small program): only once everything is checked
  program = xla_options.program_for(nested_program, top_level_program, params, latents, keys,
                                    noise)
  return program(params, latents, keys, noise, config=config, timesteps=timesteps,
                 clamp=bool(clamp), layout=layout)


def _step_coefficients(timesteps: tuple[int, ...]) -> np.ndarray:
  """(steps, 5) float32: sqrt_acp, sqrt_1m_acp, c_in, c_out, c_skip at each timestep."""
  t = np.asarray(timesteps)
  return np.stack([TABLES.sqrt_alphas_cumprod[t], TABLES.sqrt_one_minus_alphas_cumprod[t],
                   TABLES.c_in[t], TABLES.c_out[t], TABLES.c_skip[t]], axis=1)


def prepare_latents(latents: jax.Array, layout: str,
                    config: UNetConfig = CONSISTENCY_DECODER) -> jax.Array:
  """Raw latents -> the UNet's conditioning: normalised with the config's latent space,
  x8 nearest upsampled, NHWC float32."""
  z = layouts.to_nhwc(latents.astype(jnp.float32), layout)
  mean = jnp.asarray(config.latent_mean, jnp.float32)
  std = jnp.asarray(config.latent_std, jnp.float32)
  z = ((z - config.shift_factor) * config.scaling_factor - mean) / std
  b, h, w, c = z.shape
  z = jnp.broadcast_to(z[:, :, None, :, None, :], (b, h, UPSAMPLE, w, UPSAMPLE, c))
  return z.reshape(b, h * UPSAMPLE, w * UPSAMPLE, c)


_STATIC_ARGS = ("config", "timesteps", "clamp", "layout")


def _decode_impl(params, latents, keys, noise, *, config, timesteps, clamp, layout):
  z = prepare_latents(latents, layout, config)
  b, height, width, _ = z.shape
  unet = UNet(config)

  def draw(step):
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step),
                                                (height, width, 3), jnp.float32))(keys)

  def step(x, inputs):
    index, t, coef = inputs
    sqrt_acp, sqrt_1m_acp, c_in, c_out, c_skip = coef
    eps = draw(index) if noise is None else noise[index]
    x = sqrt_acp * x + sqrt_1m_acp * eps
    out = unet.apply({"params": params}, jnp.concatenate([c_in * x, z], axis=-1),
                     jnp.full((b,), t, jnp.int32))
    x = c_out * out[..., :3].astype(jnp.float32) + c_skip * x
    if clamp:
      x = jnp.clip(x, -1.0, 1.0)
    return x, None

  steps = len(timesteps)
  xs = (jnp.arange(steps), jnp.asarray(timesteps, jnp.int32),
        jnp.asarray(_step_coefficients(timesteps)))
  x, _ = jax.lax.scan(step, jnp.zeros((b, height, width, 3), jnp.float32), xs)
  return layouts.from_nhwc(x, layout)


# The decode program, for jaxconsdec's modules (the public entry point is `decode`). Inside a
# caller's jit (or any other transform) `decode` runs `nested_program`, which nests; at top
# level it runs `top_level_program`, a jit carrying the platform's compiler options
# (`xla_options`), which cannot nest. Both take (params, latents, keys, noise) and the static
# arguments config, timesteps, clamp and layout.
nested_program = jax.jit(_decode_impl, static_argnames=_STATIC_ARGS)
top_level_program = xla_options.top_level_jit(_decode_impl, _STATIC_ARGS)
