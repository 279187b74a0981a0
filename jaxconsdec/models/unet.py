"""The Consistency Decoder UNet in Flax Linen, NHWC.

Module and parameter names follow diffusers' `UNet2DModel` with `.` + index turned into
`_` + index (`down_blocks.0.resnets.1.conv1` -> `down_blocks_0/resnets_1/conv1`), so that the
param tree reads like the reference and the key mapping in `weights.py` is mechanical.

Each block output is `sow`n into the "intermediates" collection as "<block>_output":
`UNet(cfg).apply({"params": p}, x, t, mutable=["intermediates"])` hands them back, which
narrows a parity failure to one block.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxconsdec.config import UNetConfig
from jaxconsdec.models import sharded_blocks
from jaxconsdec.models.layers import ResnetBlock, conv, dense, group_norm
from jaxconsdec.precision import part_dtype


class TimestepEmbedding(nn.Module):
  """Linear -> SiLU -> Linear on the looked-up time vector (diffusers `TimestepEmbedding`)."""
  config: UNetConfig

  @nn.compact
  def __call__(self, t_emb: jax.Array) -> jax.Array:
    cfg = self.config
    layer = lambda name: dense(cfg.time_embed_dim, name, cfg, part_dtype(cfg, "time_embedding"))
    return layer("linear_2")(nn.silu(layer("linear_1")(t_emb)))


def resnet_block(remat: bool):
  """ResnetBlock, or with `remat` a ResnetBlock whose activations are recomputed in the
  backward pass instead of stored (training memory for ~1/3 more compute). The param tree is
  the same either way."""
  if not remat:
    return ResnetBlock

  def make(config, *args, **kwargs):
    if getattr(config, "dropout", 0.0):
      # The recomputation below has no dropout rng; jax.checkpoint's keeps the masks (and
      # lowers memory on a GPU or TPU, not on a CPU: see `recomputed`).
      return nn.remat(ResnetBlock)(config, *args, **kwargs)
    block = ResnetBlock(config, *args, **kwargs)
    return lambda h, temb: recomputed(block, h, temb)
  return make


def recomputed(block: ResnetBlock, x: jax.Array, temb: jax.Array) -> jax.Array:
  """block(x, temb), keeping only its inputs for the backward pass, which recomputes it.

  Not `jax.checkpoint`: JAX marks its recomputation with optimization barriers, which XLA:CPU
  removes before it schedules, and its scheduler then runs the recomputation in the forward
  pass, alongside the original: the activations live just as long, and compiled memory is
  unchanged (a 16-block chain: 2067 MiB without, 2096 MiB with jax.checkpoint;
  benchmarks/remat_memory.py). Here the
  recomputation's input depends on the output's cotangent (plus 0 times one of its values),
  which no compiler can move ahead of the block's gradient: 416 MiB. Costs one scalar add,
  fused into the first layer's read, on any platform.

  Inside `models.sharded_blocks.sharded_blocks` (the trainer's sharded state), the block runs
  on each device's examples, gathering its params itself: see that module.
  """
  spec = (block.config, block.out_channels, block.resample)
  layout = sharded_blocks.current_layout()

  def apply(params, x, temb):
    return ResnetBlock(*spec, parent=None).apply({"params": params}, x, temb)

  def forward(mdl, x, temb):
    params = mdl.variables["params"]
    out = (mdl(x, temb) if layout is None
           else sharded_blocks.forward(layout, apply, params, x, temb))
    return out, (params, x, temb)

  def backward(residuals, g):
    params, x, temb = residuals
    if layout is not None:
      d_params, dx, dtemb = sharded_blocks.backward(layout, apply, params, x, temb, g)
    else:
      # The params too: where the caller's jit shards them, each use gathers them whole, and
      # a recomputation that reads them as the forward pass did shares its gathered copy,
      # which then lives from the forward pass to the backward.
      params, x = sharded_blocks.after(g, (params, x))  # see the docstring
      d_params, dx, dtemb = jax.vjp(apply, params, x, temb)[1](g)
    return {"params": d_params}, dx, dtemb

  primal = lambda mdl, x, temb: forward(mdl, x, temb)[0]
  return nn.custom_vjp(primal, forward, backward)(block, x, temb)


class DownBlock(nn.Module):
  """diffusers `ResnetDownsampleBlock2D`: ResBlocks, then a downsampling ResBlock.

  Returns the output and every intermediate that the up path consumes as a skip.
  """
  config: UNetConfig
  out_channels: int
  add_downsample: bool
  remat: bool = False

  @nn.compact
  def __call__(self, h, temb):
    block = resnet_block(self.remat)
    skips = []
    for i in range(self.config.layers_per_block):
      h = block(self.config, self.out_channels, name=f"resnets_{i}")(h, temb)
      skips.append(h)
    if self.add_downsample:
      h = block(self.config, self.out_channels, "down", name="downsamplers_0")(h, temb)
      skips.append(h)
    return h, skips


class UpBlock(nn.Module):
  """diffusers `ResnetUpsampleBlock2D`: ResBlock i takes concat([h, skips[i]]) on channels.

  `skips` is in consumption order: the most recently pushed skip first.
  """
  config: UNetConfig
  out_channels: int
  add_upsample: bool
  remat: bool = False

  @nn.compact
  def __call__(self, h, skips, temb):
    block = resnet_block(self.remat)
    for i, skip in enumerate(skips):
      h = jnp.concatenate([h, skip], axis=-1)
      h = block(self.config, self.out_channels, name=f"resnets_{i}")(h, temb)
    if self.add_upsample:
      h = block(self.config, self.out_channels, "up", name="upsamplers_0")(h, temb)
    return h


class MidBlock(nn.Module):
  """diffusers `UNetMidBlock2D` with `add_attention=False`: two ResBlocks."""
  config: UNetConfig
  remat: bool = False

  @nn.compact
  def __call__(self, h, temb):
    width = self.config.block_out_channels[-1]
    for i in range(2):
      h = resnet_block(self.remat)(self.config, width, name=f"resnets_{i}")(h, temb)
    return h


class UNet(nn.Module):
  """The decoder UNet.

  __call__(x, t): x (B, H, W, in_channels) NHWC, t (B,) integer timesteps in
  [0, num_train_timesteps) -> (B, H, W, out_channels) float32. H and W must divide by
  `config.downsample_factor`.

  `remat=True` recomputes each ResBlock's activations in the backward pass (training).
  Dropout (`config.dropout`) applies only when a "dropout" rng is passed to `apply`.
  """
  config: UNetConfig
  remat: bool = False

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

    h = conv(widths[0], 3, "conv_in", cfg)(x)
    skips = [h]
    for i, width in enumerate(widths):
      h, block_skips = DownBlock(cfg, width, add_downsample=i < levels - 1, remat=self.remat,
                                 name=f"down_blocks_{i}")(h, temb)
      skips += block_skips
      self.sow("intermediates", f"down_blocks_{i}_output", h)

    h = MidBlock(cfg, self.remat, name="mid_block")(h, temb)
    self.sow("intermediates", "mid_block_output", h)

    per_up_block = cfg.layers_per_block + 1
    for i, width in enumerate(reversed(widths)):
      block_skips = tuple(reversed(skips[-per_up_block:]))
      del skips[-per_up_block:]
      h = UpBlock(cfg, width, add_upsample=i < levels - 1, remat=self.remat,
                  name=f"up_blocks_{i}")(h, block_skips, temb)
      self.sow("intermediates", f"up_blocks_{i}_output", h)

    h = nn.silu(group_norm("conv_norm_out", cfg, part_dtype(cfg, "conv_norm_out"))(h))
    return conv(cfg.out_channels, 3, "conv_out", cfg, part_dtype(cfg, "conv_out"))(h)
