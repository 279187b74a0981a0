"""Architecture configuration of the Consistency Decoder UNet, its latent space, and presets.

A `UNetConfig` describes any diffusers `UNet2DModel` of the Consistency Decoder family:
`ResnetDownsampleBlock2D` down blocks, a `UNetMidBlock2D` without attention,
`ResnetUpsampleBlock2D` up blocks, GroupNorm + SiLU, scale/shift time conditioning and a
learned time-embedding table. Widths, depth and group count are free; the block types are not.

It also holds the latent space the decoder was trained on (`latent_channels`, the VAE's
`scaling_factor` and `shift_factor`, and the per-channel statistics the sampler normalises
with), so a decoder for SDXL, SD3 or FLUX latents is the same code with other numbers, and
the UNet's `in_channels` follows: 3 (the noisy image) + `latent_channels`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import jax
import jax.numpy as jnp

# Dtypes are stored by name so that a config is hashable (it is a static argument of the
# jitted decoder) and serialises to JSON unchanged.
_DTYPES = ("float32", "bfloat16", "float16")
_PRECISIONS = ("default", "high", "highest")

# The SD 1.x/2.x latent space the released decoder was trained on (docs/model.md): the
# VAE's scaling factor, and the mean and std of scaled latents, per channel.
SD_SCALING_FACTOR = 0.18215
SD_LATENT_MEAN = (0.38862467, 0.02253063, 0.07381133, -0.0171294)
SD_LATENT_STD = (0.9654121, 1.0440036, 0.76147926, 0.77022034)


# Fields that say how a model runs, not what it computes when decoding: two configs that
# differ only in these are the same model (a checkpoint loads under either).
NON_ARCHITECTURE_FIELDS = ("dtype", "param_dtype", "precision", "dropout")


class _Config:
  """What UNetConfig and VAEConfig share: numerics and JSON. Subclasses are frozen
  dataclasses with `dtype`, `param_dtype` and `precision` fields."""

  def architecture_differences(self, other, ignore=()) -> list[tuple[str, Any, Any]]:
    """(field, this value, other's) for each field that makes the two configs different
    models (numerics aside, and any field named in `ignore`)."""
    skip = set(NON_ARCHITECTURE_FIELDS) | set(ignore)
    return [(f.name, getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if f.name not in skip and getattr(self, f.name) != getattr(other, f.name)]

  def _check_levels(self) -> None:
    """Widths stored as a tuple of ints; at least one level and layer; groups divide widths."""
    name = type(self).__name__
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    if not self.block_out_channels:
      raise ValueError(f"{name}.block_out_channels must name at least one level")
    if self.layers_per_block < 1:
      raise ValueError(f"{name}.layers_per_block must be >= 1, got {self.layers_per_block}")
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(
          f"{name}.norm_num_groups={self.norm_num_groups} does not divide the widths {bad}"
          f" of block_out_channels={self.block_out_channels}")

  def _check_numerics(self) -> None:
    object.__setattr__(self, "dtype", _dtype_name(self.dtype, "dtype"))
    object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype, "param_dtype"))
    if self.precision is not None and self.precision not in _PRECISIONS:
      raise ValueError(f"{type(self).__name__}.precision must be one of {_PRECISIONS} or None,"
                       f" got {self.precision!r}")

  @property
  def downsample_factor(self) -> int:
    """How much the network halves the resolution in total; images must divide by it."""
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def matmul_precision(self) -> jax.lax.Precision:
    """The precision every convolution and dense layer is computed at."""
    name = self.precision or ("highest" if self.dtype == "float32" else "default")
    return jax.lax.Precision[name.upper()]

  def replace(self, **changes: Any):
    return dataclasses.replace(self, **changes)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str):
    """Reads `to_json`'s output, and that of earlier versions (fields added since take their
    defaults: a UNetConfig without latent fields is SD 1.x's)."""
    fields = json.loads(text)
    if not isinstance(fields, dict):
      raise ValueError(f"{cls.__name__} JSON must be an object")
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"{cls.__name__} JSON has unknown fields {unknown}")
    return cls(**fields)


@dataclasses.dataclass(frozen=True)
class UNetConfig(_Config):
  """Shape, latent space and numerics of the decoder UNet.

  Attributes:
    block_out_channels: channel width of each resolution level, highest resolution first.
    layers_per_block: ResBlocks per down block (up blocks have one more).
    norm_num_groups: GroupNorm group count; must divide every width.
    norm_eps: GroupNorm epsilon (the released model uses 1e-5, not Flax's default 1e-6).
    out_channels: UNet output channels; only the first 3 are used by the sampler.
    num_train_timesteps: rows of the learned time-embedding table.
    latent_channels: channels of the latents decoded (4 for SD 1.x/2.x and SDXL, 16 for
      SD3 and FLUX).
    scaling_factor, shift_factor: the VAE's: pipeline latents are
      `(raw - shift_factor) * scaling_factor`; the decoder takes raw latents.
    latent_mean, latent_std: per-channel statistics of scaled raw latents; the sampler
      conditions on `((raw - shift_factor) * scaling_factor - mean) / std`.
    in_channels: the UNet's input channels, 3 + latent_channels (derived; a value given
      must agree).
    dropout: dropout rate inside every ResBlock, before its second convolution (diffusers'
      `UNet2DModel(dropout=...)`); used only in training, when a dropout rng is given. The
      released model has none.
    dtype: compute dtype of the convolutions ("float32", "bfloat16" or "float16"). What stays
      float32 regardless is decided in `jaxconsdec.precision`.
    param_dtype: dtype of freshly initialised parameters (loaded params keep their own).
    precision: matmul/convolution precision of every UNet layer: "default", "high" or
      "highest". None (the default) means "highest" for float32 compute, so an fp32 decode
      is fp32 on every platform (not a bf16 pass on TPU or TF32 on GPU), and "default" for
      bf16/fp16 compute, where the inputs are already rounded.
  """

  block_out_channels: tuple[int, ...] = (320, 640, 1024, 1024)
  layers_per_block: int = 3
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  out_channels: int = 6
  num_train_timesteps: int = 1024
  latent_channels: int = 4
  scaling_factor: float = SD_SCALING_FACTOR
  shift_factor: float = 0.0
  latent_mean: tuple[float, ...] = SD_LATENT_MEAN
  latent_std: tuple[float, ...] = SD_LATENT_STD
  in_channels: Optional[int] = None
  dropout: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  precision: Optional[str] = None

  def __post_init__(self):
    # Accept lists and jnp dtypes at construction, store hashable canonical values.
    fix = lambda name, value: object.__setattr__(self, name, value)
    fix("latent_mean", tuple(float(v) for v in self.latent_mean))
    fix("latent_std", tuple(float(v) for v in self.latent_std))
    fix("scaling_factor", float(self.scaling_factor))
    fix("shift_factor", float(self.shift_factor))
    fix("dropout", float(self.dropout))
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
    self._check_levels()
    self._check_numerics()
    if self.latent_channels < 1:
      raise ValueError(f"UNetConfig.latent_channels must be >= 1, got {self.latent_channels}")
    for name in ("latent_mean", "latent_std"):
      if len(getattr(self, name)) != self.latent_channels:
        raise ValueError(
            f"UNetConfig.{name} has {len(getattr(self, name))} values for"
            f" latent_channels={self.latent_channels}: a decoder for other latents needs their"
            " own per-channel statistics (measured over its training latents)")
    if min(self.latent_std) <= 0 or self.scaling_factor <= 0:
      raise ValueError("UNetConfig.latent_std and scaling_factor must be positive")
    if self.in_channels is None:
      fix("in_channels", 3 + self.latent_channels)
    elif self.in_channels != 3 + self.latent_channels:
      raise ValueError(
          f"UNetConfig.in_channels={self.in_channels} but latent_channels="
          f"{self.latent_channels}: the UNet takes the 3-channel image plus the latents, so"
          f" in_channels must be {3 + self.latent_channels} (set latent_channels instead)")

  @property
  def time_embed_dim(self) -> int:
    """Width of the time embedding MLP (diffusers: 4 x the first block width)."""
    return 4 * self.block_out_channels[0]

  def replace(self, **changes: Any) -> "UNetConfig":
    if "latent_channels" in changes and "in_channels" not in changes:
      changes["in_channels"] = None  # follows the new latent channel count
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class VAEConfig(_Config):
  """Shape, latent space and numerics of a Stable Diffusion VAE (diffusers `AutoencoderKL`).

  Attributes:
    block_out_channels: width of each level of the encoder (the decoder mirrors them).
    layers_per_block: ResNet blocks per encoder level (decoder levels have one more).
    norm_num_groups, norm_eps: GroupNorm's (eps 1e-6 throughout the VAE, 1e-5 in the UNet).
    in_channels, out_channels: image channels (3).
    latent_channels: 4 for SD 1.x/2.x and SDXL, 16 for SD3 and FLUX.
    scaling_factor, shift_factor: pipelines use `(raw - shift_factor) * scaling_factor`.
    use_quant_conv, use_post_quant_conv: the 1x1 convs around the latent (absent in
      SD3/FLUX).
    mid_block_add_attention: the mid block's single-head self-attention.
    dtype, param_dtype, precision: as in UNetConfig. The attention's softmax is float32.
  """

  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  scaling_factor: float = SD_SCALING_FACTOR
  shift_factor: float = 0.0
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  precision: Optional[str] = None

  def __post_init__(self):
    object.__setattr__(self, "scaling_factor", float(self.scaling_factor))
    object.__setattr__(self, "shift_factor", float(self.shift_factor))
    self._check_levels()
    self._check_numerics()
    if self.latent_channels < 1:
      raise ValueError(f"VAEConfig.latent_channels must be >= 1, got {self.latent_channels}")


def _dtype_name(value: Any, field: str) -> str:
  name = jnp.dtype(value).name
  if name not in _DTYPES:
    raise ValueError(f"config.{field} must be one of {_DTYPES}, got {name!r}")
  return name


# The released model: diffusers' ConsistencyDecoderVAE decoder_unet, 621,277,702 parameters.
CONSISTENCY_DECODER = UNetConfig()

# A narrow model of the same topology for tests: every code path, a fraction of the cost.
TINY = UNetConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=2, norm_num_groups=8)

# The Stable Diffusion VAEs (docs/roundtrip.md): one architecture, four latent spaces.
SD_VAE = VAEConfig()                                          # SD 1.x / 2.x
SDXL_VAE = VAEConfig(scaling_factor=0.13025)
SD3_VAE = VAEConfig(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                    use_quant_conv=False, use_post_quant_conv=False)
FLUX_VAE = VAEConfig(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                     use_quant_conv=False, use_post_quant_conv=False)
# A narrow VAE of the same topology for tests.
TINY_VAE = VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
