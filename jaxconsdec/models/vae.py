"""The Stable Diffusion VAE (diffusers `AutoencoderKL`) in Flax Linen, NHWC.

Parameter names follow diffusers with `.` + index turned into `_` + index, as the UNet's do:
`encoder/down_blocks_0/resnets_1/conv1`, `encoder/mid_block/attentions_0/to_q`, `quant_conv`,
`post_quant_conv`, `decoder/up_blocks_2/upsamplers_0/conv` (docs/roundtrip.md).

    encode_moments(x):  conv_in -> down blocks (ResNets, then a pad-right-bottom stride-2
                        conv) -> mid (ResNet, attention, ResNet) -> GN, SiLU, conv_out ->
                        quant_conv: (B, H/f, W/f, 2 C) mean and logvar, f = 2^(levels-1)
    decode(z):          post_quant_conv -> conv_in -> mid -> up blocks (ResNets, then a
                        nearest x2 + conv upsampler) -> GN, SiLU, conv_out: (B, H, W, 3)

The two halves are separate methods, so a file holding only the encoder (a
`ConsistencyDecoderVAE`'s) encodes without a decoder's params, and the reverse.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxconsdec.config import VAEConfig
from jaxconsdec.models.layers import ResnetBlock, UpsampledConv, conv, dense, group_norm

# Attention over more positions than this is computed in chunks of queries, so its
# (queries x keys) score matrix never exceeds CHUNK x positions: at 2048^2 (65,536 positions)
# the whole matrix would be 16 GiB in float32, a chunk of 4,096 queries is 1 GiB.
ATTENTION_CHUNK = 4096


class Attention(nn.Module):
  """The mid block's attention: GroupNorm, one head over all H x W positions, residual.

  diffusers `Attention(heads=1, dim_head=C, residual_connection=True)`: q, k, v and out are
  Linear layers with bias; the softmax of q k^T / sqrt(C) is taken in float32.
  """
  config: VAEConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    b, h, w, c = x.shape
    y = group_norm("group_norm", cfg)(x).reshape(b, h * w, c)
    q, k, v = (dense(c, name, cfg)(y) for name in ("to_q", "to_k", "to_v"))
    out = _attention(q, k, v, cfg.matmul_precision)
    out = dense(c, "to_out_0", cfg)(out.astype(y.dtype))
    return x + out.reshape(b, h, w, c).astype(x.dtype)


def _attention(q, k, v, precision) -> jax.Array:
  """softmax(q k^T / sqrt(C)) v with float32 scores, in query chunks when there are many."""
  scale = 1.0 / math.sqrt(q.shape[-1])

  def rows(q_chunk):
    scores = jnp.einsum("bqc,bkc->bqk", q_chunk, k, precision=precision,
                        preferred_element_type=jnp.float32) * scale
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bqk,bkc->bqc", weights.astype(v.dtype), v, precision=precision,
                      preferred_element_type=jnp.float32)

  b, n, c = q.shape
  if n <= ATTENTION_CHUNK:
    return rows(q)
  count = -(-n // ATTENTION_CHUNK)
  padded = jnp.pad(q, ((0, 0), (0, count * ATTENTION_CHUNK - n), (0, 0)))  # extra rows: dropped
  chunks = jnp.moveaxis(padded.reshape(b, count, ATTENTION_CHUNK, c), 1, 0)
  out = jax.lax.map(rows, chunks)                        # one chunk of queries at a time
  return jnp.moveaxis(out, 0, 1).reshape(b, count * ATTENTION_CHUNK, v.shape[-1])[:, :n]


class Downsample(nn.Module):
  """diffusers `Downsample2D(use_conv=True, padding=0)`: pad one row and one column at the
  bottom and right (not symmetric), then a 3x3 convolution of stride 2."""
  config: VAEConfig
  channels: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(self.channels, 3, "conv", self.config, stride=2, padding="VALID")(x)


class Upsample(nn.Module):
  """diffusers `Upsample2D(use_conv=True)`: nearest x2, then a 3x3 convolution, computed at
  the low resolution (`UpsampledConv`, the same sums)."""
  config: VAEConfig
  channels: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    return UpsampledConv(self.channels, cfg.compute_dtype, jnp.dtype(cfg.param_dtype),
                         cfg.matmul_precision, name="conv")(x)


class MidBlock(nn.Module):
  """diffusers `UNetMidBlock2D` without a time embedding: ResNet, attention, ResNet."""
  config: VAEConfig

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    width = self.config.block_out_channels[-1]
    h = ResnetBlock(self.config, width, name="resnets_0")(h)
    if self.config.mid_block_add_attention:
      h = Attention(self.config, name="attentions_0")(h)
    return ResnetBlock(self.config, width, name="resnets_1")(h)


class DownBlock(nn.Module):
  """diffusers `DownEncoderBlock2D`."""
  config: VAEConfig
  channels: int
  add_downsample: bool

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    for i in range(self.config.layers_per_block):
      h = ResnetBlock(self.config, self.channels, name=f"resnets_{i}")(h)
    if self.add_downsample:
      h = Downsample(self.config, self.channels, name="downsamplers_0")(h)
    return h


class UpBlock(nn.Module):
  """diffusers `UpDecoderBlock2D`: one ResNet more than an encoder level."""
  config: VAEConfig
  channels: int
  add_upsample: bool

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    for i in range(self.config.layers_per_block + 1):
      h = ResnetBlock(self.config, self.channels, name=f"resnets_{i}")(h)
    if self.add_upsample:
      h = Upsample(self.config, self.channels, name="upsamplers_0")(h)
    return h


class Encoder(nn.Module):
  config: VAEConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    widths = cfg.block_out_channels
    h = conv(widths[0], 3, "conv_in", cfg)(x)
    for i, width in enumerate(widths):
      h = DownBlock(cfg, width, i < len(widths) - 1, name=f"down_blocks_{i}")(h)
    h = MidBlock(cfg, name="mid_block")(h)
    h = nn.silu(group_norm("conv_norm_out", cfg)(h))
    return conv(2 * cfg.latent_channels, 3, "conv_out", cfg)(h)


class Decoder(nn.Module):
  config: VAEConfig

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg = self.config
    widths = tuple(reversed(cfg.block_out_channels))
    h = conv(widths[0], 3, "conv_in", cfg)(z)
    h = MidBlock(cfg, name="mid_block")(h)
    for i, width in enumerate(widths):
      h = UpBlock(cfg, width, i < len(widths) - 1, name=f"up_blocks_{i}")(h)
    h = nn.silu(group_norm("conv_norm_out", cfg)(h))
    return conv(cfg.out_channels, 3, "conv_out", cfg)(h)


class VAE(nn.Module):
  """The SD VAE: `encode_moments` and `decode` use disjoint halves of the param tree."""
  config: VAEConfig

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    moments = 2 * cfg.latent_channels
    # In setup a submodule is named by its attribute (name=None here).
    if cfg.use_quant_conv:
      self.quant_conv = conv(moments, 1, None, cfg)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = conv(cfg.latent_channels, 1, None, cfg)

  def encode_moments(self, x: jax.Array) -> jax.Array:
    """(B, H, W, 3) images -> (B, H/f, W/f, 2 C): the posterior's mean, then its logvar."""
    moments = self.encoder(x)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    return moments.astype(jnp.float32)

  def decode(self, z: jax.Array) -> jax.Array:
    """(B, h, w, C) raw latents -> (B, f h, f w, 3) images (not clamped)."""
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z.astype(self.config.compute_dtype))
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: jax.Array) -> jax.Array:  # both halves, for init
    mean = self.encode_moments(x)[..., :self.config.latent_channels]
    return self.decode(mean)


# Which top-level entries of the param tree each half uses.
HALVES = {"encoder": ("encoder", "quant_conv"), "decoder": ("decoder", "post_quant_conv")}


def posterior(moments: jax.Array, latent_channels: int) -> tuple[jax.Array, jax.Array]:
  """diffusers `DiagonalGaussianDistribution`: (mean, std). Only logvar is clamped, to
  [-30, 20]; the mean is not."""
  mean, logvar = moments[..., :latent_channels], moments[..., latent_channels:]
  return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
