"""Layers the decoder UNet and the SD VAE share, in Flax Linen, NHWC.

Each helper takes a config for its numerics: `compute_dtype`, `param_dtype`,
`matmul_precision`, `norm_num_groups`, `norm_eps`. `UNetConfig` and `VAEConfig` both have
them, with their own values (GroupNorm eps is 1e-5 in the UNet and 1e-6 in the VAE).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxconsdec.models.conv import conv2d


def conv(features: int, kernel: int, name: Optional[str], cfg: Any, dtype=None, stride: int = 1,
         padding=None) -> nn.Conv:
  """A square convolution; padding kernel // 2 ("same" at stride 1) unless given."""
  return nn.Conv(
      features, (kernel, kernel), strides=stride,
      padding=kernel // 2 if padding is None else padding, name=name,
      dtype=dtype or cfg.compute_dtype, param_dtype=jnp.dtype(cfg.param_dtype),
      precision=cfg.matmul_precision, conv_general_dilated=conv2d)


def dense(features: int, name: str, cfg: Any, dtype=None) -> nn.Dense:
  return nn.Dense(features, name=name, dtype=dtype or cfg.compute_dtype,
                  param_dtype=jnp.dtype(cfg.param_dtype), precision=cfg.matmul_precision)


def group_norm(name: str, cfg: Any, dtype=None) -> nn.GroupNorm:
  # use_fast_variance=False: two-pass variance, as torch computes it. E[x^2] - E[x]^2 loses
  # digits on activations whose mean is large next to their spread.
  return nn.GroupNorm(
      num_groups=cfg.norm_num_groups, epsilon=cfg.norm_eps, use_fast_variance=False,
      name=name, dtype=dtype or cfg.compute_dtype, param_dtype=jnp.dtype(cfg.param_dtype))


def upsample_nearest(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 on (B, H, W, C): each pixel becomes a 2x2 block."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


# Nearest x2 upsampling followed by a 3x3 convolution (padding 1) reads, for the output rows
# of each parity, only two input rows: even rows 2i see input rows i-1 (tap 0) and i (taps 1
# and 2); odd rows 2i+1 see rows i (taps 0 and 1) and i+1 (tap 2). Columns alike. So each of
# the four output phases is a 2x2 convolution of the *low-resolution* input with summed taps:
# 16 multiplies per output pixel instead of 36, and no upsampled copy of the input.
_PHASE_TAPS = (((0,), (1, 2)),                     # even output rows/columns: taps summed
               ((0, 1), (2,)))                     # odd; (phase, new tap) -> original taps
_PHASE_PADDING = ((1, 0), (0, 1))                  # even: rows i-1, i; odd: rows i, i+1


def _phase_kernel(kernel: jax.Array, row_phase: int, col_phase: int) -> jax.Array:
  """The 2x2 kernel of one output phase: sums of the 3x3 kernel's taps, written as plain
  additions (exact in float32, and no matmul whose precision a platform could lower)."""
  return jnp.stack([jnp.stack([sum(kernel[y, x] for y in ys for x in xs)
                               for xs in _PHASE_TAPS[col_phase]])
                    for ys in _PHASE_TAPS[row_phase]])


class UpsampledConv(nn.Module):
  """`conv(upsample_nearest_x2(x))` for a 3x3, padding-1 conv, computed as four 2x2 phase
  convolutions at x's resolution (exactly the same sums, 4/9 of the multiplies).

  Holds the same `kernel` (3, 3, in, out) and `bias` as the `nn.Conv` it replaces, so the
  param tree and the weight mapping do not change. x: (B, H, W, in) -> (B, 2H, 2W, out).
  """
  features: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  precision: jax.lax.Precision

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    x = x.astype(self.dtype)
    wide = kernel.astype(jnp.float32)  # tap sums in float32, then one rounding to dtype
    rows = []
    for a in range(2):
      phases = []
      for b in range(2):
        k = _phase_kernel(wide, a, b)
        phases.append(conv2d(
            x, k.astype(self.dtype), (1, 1), (_PHASE_PADDING[a], _PHASE_PADDING[b]),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision))
      rows.append(jnp.stack(phases, axis=3))        # (B, H, W, 2: column phase, out)
    y = jnp.stack(rows, axis=2)                     # (B, H, 2: row phase, W, 2, out)
    bsz, h, _, w, _, c = y.shape
    return y.reshape(bsz, 2 * h, 2 * w, c) + bias.astype(self.dtype)


def downsample_avg(x: jax.Array) -> jax.Array:
  """2x2 average pool, stride 2 (diffusers `Downsample2D(use_conv=False)`)."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class ResnetBlock(nn.Module):
  """diffusers `ResnetBlock2D`: GroupNorm, SiLU, conv, GroupNorm, SiLU, conv, plus the input
  (through a 1x1 `conv_shortcut` when the width changes).

  With a time embedding (the UNet) the second norm is modulated as
  `time_embedding_norm="scale_shift"`; without one (`temb=None`, the VAE) it is plain.
  `resample` "down" or "up" puts a 2x average pool or nearest upsampling inside the block,
  as the UNet's `ResnetDownsampleBlock2D`/`ResnetUpsampleBlock2D` do.

  x: (B, H, W, C_in), temb: (B, time_embed_dim) or None -> (B, H', W', out_channels), where
  H' is H/2, H or 2H for resample "down", None or "up".
  """
  config: Any
  out_channels: int
  resample: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
    cfg = self.config
    h = nn.silu(group_norm("norm1", cfg)(x))
    if self.resample == "up":
      x = upsample_nearest(x)
      h = UpsampledConv(self.out_channels, cfg.compute_dtype, jnp.dtype(cfg.param_dtype),
                        cfg.matmul_precision, name="conv1")(h)
    else:
      if self.resample == "down":
        x, h = downsample_avg(x), downsample_avg(h)
      h = conv(self.out_channels, 3, "conv1", cfg)(h)

    h = group_norm("norm2", cfg)(h)
    if temb is not None:
      temb = dense(2 * self.out_channels, "time_emb_proj", cfg)(nn.silu(temb))
      scale, shift = jnp.split(temb[:, None, None, :], 2, axis=-1)  # scale first, as torch.chunk
      h = h * (1 + scale) + shift
    h = nn.silu(h)
    rate = getattr(cfg, "dropout", 0.0)  # the UNet's training dropout (diffusers' place)
    if rate:
      # Active only when the caller hands in a "dropout" rng (training); decoding never does.
      h = nn.Dropout(rate, deterministic=not self.has_rng("dropout"))(h)
    h = conv(self.out_channels, 3, "conv2", cfg)(h)

    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, "conv_shortcut", cfg)(x)
    return x + h
