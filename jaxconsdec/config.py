"""Architecture configuration of the Consistency Decoder UNet, and its presets.

A `UNetConfig` describes any diffusers `UNet2DModel` of the Consistency Decoder family:
`ResnetDownsampleBlock2D` down blocks, a `UNetMidBlock2D` without attention,
`ResnetUpsampleBlock2D` up blocks, GroupNorm + SiLU, scale/shift time conditioning and a
learned time-embedding table. Widths, depth and group count are free; the block types are not.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

# Dtypes are stored by name so that a config is hashable (it is a static argument of the
# jitted decoder) and serialises to JSON unchanged.
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Shape and numerics of the decoder UNet.

  Attributes:
    block_out_channels: channel width of each resolution level, highest resolution first.
    layers_per_block: ResBlocks per down block (up blocks have one more).
    norm_num_groups: GroupNorm group count; must divide every width.
    norm_eps: GroupNorm epsilon (the released model uses 1e-5, not Flax's default 1e-6).
    in_channels: UNet input channels: 3 (noisy image) + 4 (upsampled latent).
    out_channels: UNet output channels; only the first 3 are used by the sampler.
    num_train_timesteps: rows of the learned time-embedding table.
    dtype: compute dtype of the convolutions ("float32", "bfloat16" or "float16"). What stays
      float32 regardless is decided in `jaxconsdec.precision`.
    param_dtype: dtype of freshly initialised parameters (loaded params keep their own).
  """

  block_out_channels: tuple[int, ...] = (320, 640, 1024, 1024)
  layers_per_block: int = 3
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  in_channels: int = 7
  out_channels: int = 6
  num_train_timesteps: int = 1024
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    # Accept lists and jnp dtypes at construction, store hashable canonical values.
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    object.__setattr__(self, "dtype", _dtype_name(self.dtype, "dtype"))
    object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype, "param_dtype"))
    if not self.block_out_channels:
      raise ValueError("UNetConfig.block_out_channels must name at least one level")
    if self.layers_per_block < 1:
      raise ValueError(f"UNetConfig.layers_per_block must be >= 1, got {self.layers_per_block}")
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(
          f"UNetConfig.norm_num_groups={self.norm_num_groups} does not divide the widths {bad}"
          f" of block_out_channels={self.block_out_channels}")

  @property
  def time_embed_dim(self) -> int:
    """Width of the time embedding MLP (diffusers: 4 x the first block width)."""
    return 4 * self.block_out_channels[0]

  @property
  def downsample_factor(self) -> int:
    """How much the UNet halves the resolution in total; images must divide by it."""
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  def replace(self, **changes: Any) -> "UNetConfig":
    return dataclasses.replace(self, **changes)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "UNetConfig":
    fields = json.loads(text)
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"UNetConfig JSON has unknown fields {unknown}")
    return cls(**fields)


def _dtype_name(value: Any, field: str) -> str:
  name = jnp.dtype(value).name
  if name not in _DTYPES:
    raise ValueError(f"UNetConfig.{field} must be one of {_DTYPES}, got {name!r}")
  return name


# The released model: diffusers' ConsistencyDecoderVAE decoder_unet, 621,277,702 parameters.
CONSISTENCY_DECODER = UNetConfig()

# A narrow model of the same topology for tests: every code path, a fraction of the cost.
TINY = UNetConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=2, norm_num_groups=8)
