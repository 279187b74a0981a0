"""The Consistency Decoder UNet in Flax Linen, NHWC.

Module and parameter names follow diffusers' `UNet2DModel` with `.` + index turned into
`_` + index (`down_blocks.0.resnets.1.conv1` -> `down_blocks_0/resnets_1/conv1`), so that the
param tree reads like the reference and the key mapping in `weights.py` is mechanical.

Each block output is `sow`n into the "intermediates" collection as "<block>_output":
`UNet(cfg).apply({"params": p}, x, t, mutable=["intermediates"])` hands them back, which
narrows a parity failure to one block.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxconsdec.config import UNetConfig
from jaxconsdec.precision import part_dtype


def _conv(features: int, kernel: int, name: str, cfg: UNetConfig, dtype=None) -> nn.Conv:
  return nn.Conv(
      features, (kernel, kernel), padding=kernel // 2, name=name,
      dtype=dtype or cfg.compute_dtype, param_dtype=jnp.dtype(cfg.param_dtype),
      precision=cfg.matmul_precision)


def _dense(features: int, name: str, cfg: UNetConfig, dtype=None) -> nn.Dense:
  return nn.Dense(features, name=name, dtype=dtype or cfg.compute_dtype,
                  param_dtype=jnp.dtype(cfg.param_dtype), precision=cfg.matmul_precision)


def _group_norm(name: str, cfg: UNetConfig, dtype=None) -> nn.GroupNorm:
  # use_fast_variance=False: two-pass variance, as torch computes it. E[x^2] - E[x]^2 loses
  # digits on activations whose mean is large next to their spread.
  return nn.GroupNorm(
      num_groups=cfg.norm_num_groups, epsilon=cfg.norm_eps, use_fast_variance=False,
      name=name, dtype=dtype or cfg.compute_dtype, param_dtype=jnp.dtype(cfg.param_dtype))


def _upsample_nearest(x: jax.Array) -> jax.Array:
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
        phases.append(jax.lax.conv_general_dilated(
            x, k.astype(self.dtype), (1, 1), (_PHASE_PADDING[a], _PHASE_PADDING[b]),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision))
      rows.append(jnp.stack(phases, axis=3))        # (B, H, W, 2: column phase, out)
    y = jnp.stack(rows, axis=2)                     # (B, H, 2: row phase, W, 2, out)
    bsz, h, _, w, _, c = y.shape
    return y.reshape(bsz, 2 * h, 2 * w, c) + bias.astype(self.dtype)


def _downsample_avg(x: jax.Array) -> jax.Array:
  """2x2 average pool, stride 2 (diffusers `Downsample2D(use_conv=False)`)."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class ResnetBlock(nn.Module):
  """diffusers `ResnetBlock2D` with `time_embedding_norm="scale_shift"`.

  x: (B, H, W, C_in), temb: (B, time_embed_dim) -> (B, H', W', out_channels), where
  H' is H/2, H or 2H for resample "down", None or "up".
  """
  config: UNetConfig
  out_channels: int
  resample: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    cfg = self.config
    h = nn.silu(_group_norm("norm1", cfg)(x))
    if self.resample == "up":
      x = _upsample_nearest(x)
      h = UpsampledConv(self.out_channels, cfg.compute_dtype, jnp.dtype(cfg.param_dtype),
                        cfg.matmul_precision, name="conv1")(h)
    else:
      if self.resample == "down":
        x, h = _downsample_avg(x), _downsample_avg(h)
      h = _conv(self.out_channels, 3, "conv1", cfg)(h)

    temb = _dense(2 * self.out_channels, "time_emb_proj", cfg)(nn.silu(temb))
    scale, shift = jnp.split(temb[:, None, None, :], 2, axis=-1)  # scale first, as torch.chunk
    h = _group_norm("norm2", cfg)(h) * (1 + scale) + shift
    h = _conv(self.out_channels, 3, "conv2", cfg)(nn.silu(h))

    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut", cfg)(x)
    return x + h


class TimestepEmbedding(nn.Module):
  """Linear -> SiLU -> Linear on the looked-up time vector (diffusers `TimestepEmbedding`)."""
  config: UNetConfig

  @nn.compact
  def __call__(self, t_emb: jax.Array) -> jax.Array:
    cfg = self.config
    dense = lambda name: _dense(cfg.time_embed_dim, name, cfg, part_dtype(cfg, "time_embedding"))
    return dense("linear_2")(nn.silu(dense("linear_1")(t_emb)))


class DownBlock(nn.Module):
  """diffusers `ResnetDownsampleBlock2D`: ResBlocks, then a downsampling ResBlock.

  Returns the output and every intermediate that the up path consumes as a skip.
  """
  config: UNetConfig
  out_channels: int
  add_downsample: bool

  @nn.compact
  def __call__(self, h, temb):
    skips = []
    for i in range(self.config.layers_per_block):
      h = ResnetBlock(self.config, self.out_channels, name=f"resnets_{i}")(h, temb)
      skips.append(h)
    if self.add_downsample:
      h = ResnetBlock(self.config, self.out_channels, "down", name="downsamplers_0")(h, temb)
      skips.append(h)
    return h, skips


class UpBlock(nn.Module):
  """diffusers `ResnetUpsampleBlock2D`: ResBlock i takes concat([h, skips[i]]) on channels.

  `skips` is in consumption order: the most recently pushed skip first.
  """
  config: UNetConfig
  out_channels: int
  add_upsample: bool

  @nn.compact
  def __call__(self, h, skips, temb):
    for i, skip in enumerate(skips):
      h = jnp.concatenate([h, skip], axis=-1)
      h = ResnetBlock(self.config, self.out_channels, name=f"resnets_{i}")(h, temb)
    if self.add_upsample:
      h = ResnetBlock(self.config, self.out_channels, "up", name="upsamplers_0")(h, temb)
    return h


class MidBlock(nn.Module):
  """diffusers `UNetMidBlock2D` with `add_attention=False`: two ResBlocks."""
  config: UNetConfig

  @nn.compact
  def __call__(self, h, temb):
    width = self.config.block_out_channels[-1]
    for i in range(2):
      h = ResnetBlock(self.config, width, name=f"resnets_{i}")(h, temb)
    return h


class UNet(nn.Module):
  """The decoder UNet.

  __call__(x, t): x (B, H, W, in_channels) NHWC, t (B,) integer timesteps in
  [0, num_train_timesteps) -> (B, H, W, out_channels) float32. H and W must divide by
  `config.downsample_factor`.
  """
  config: UNetConfig

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
    cfg = self.config
    widths = cfg.block_out_channels
    levels = len(widths)

    t_emb = nn.Embed(cfg.num_train_timesteps, widths[0], name="time_proj",
                     dtype=part_dtype(cfg, "time_embedding"),
                     param_dtype=jnp.dtype(cfg.param_dtype))(t)
    temb = TimestepEmbedding(cfg, name="time_embedding")(t_emb)
    self.sow("intermediates", "time_embedding_output", temb)

    h = _conv(widths[0], 3, "conv_in", cfg)(x)
    skips = [h]
    for i, width in enumerate(widths):
      h, block_skips = DownBlock(cfg, width, add_downsample=i < levels - 1,
                                 name=f"down_blocks_{i}")(h, temb)
      skips += block_skips
      self.sow("intermediates", f"down_blocks_{i}_output", h)

    h = MidBlock(cfg, name="mid_block")(h, temb)
    self.sow("intermediates", "mid_block_output", h)

    per_up_block = cfg.layers_per_block + 1
    for i, width in enumerate(reversed(widths)):
      block_skips = tuple(reversed(skips[-per_up_block:]))
      del skips[-per_up_block:]
      h = UpBlock(cfg, width, add_upsample=i < levels - 1,
                  name=f"up_blocks_{i}")(h, block_skips, temb)
      self.sow("intermediates", f"up_blocks_{i}_output", h)

    h = nn.silu(_group_norm("conv_norm_out", cfg, part_dtype(cfg, "conv_norm_out"))(h))
    return _conv(cfg.out_channels, 3, "conv_out", cfg, part_dtype(cfg, "conv_out"))(h)
