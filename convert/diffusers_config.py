"""The architecture a diffusers `config.json` describes, as `UNetConfig` fields.

A diffusers folder describes itself: the `config.json` beside
`diffusion_pytorch_model.safetensors` is either a `ConsistencyDecoderVAE` config (`decoder_*`
fields, `latent_channels`, `scaling_factor`) or a `UNet2DModel` one (the williamberman
layout's `unet/config.json`). Both map onto `UNetConfig`; a config whose blocks are not the
Consistency Decoder's (other block types, attention, a positional time embedding, ...) is
refused, naming each field.

A config.json cannot say how the decoder normalises its latents: diffusers keeps the SD 1.x
statistics as non-persistent buffers. They are the defaults for 4 channels; for any other
count they must come from `--config` (a jaxconsdec JSON with `latent_mean` and `latent_std`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from jaxconsdec.config import (CONSISTENCY_DECODER, NON_ARCHITECTURE_FIELDS, SD_VAE, UNetConfig,
                               VAEConfig)
from jaxconsdec.convert.errors import WeightFileError
from jaxconsdec.files import read_json_object

# Fields that fix the block types: (key, the value this family needs, diffusers' default
# when the key is absent). A UNet2DModel's defaults are another architecture, so its keys
# must say so; a ConsistencyDecoderVAE's defaults are this family.
_UNET2D_FAMILY = (
    ("time_embedding_type", "learned", "positional"),
    ("time_embedding_dim", None, None),
    ("mid_block_type", "UNetMidBlock2D", "UNetMidBlock2D"),
    ("add_attention", False, True),
    ("resnet_time_scale_shift", "scale_shift", "default"),
    ("act_fn", "silu", "silu"),
    ("center_input_sample", False, False),
    ("mid_block_scale_factor", 1, 1),
    ("class_embed_type", None, None),
)
_VAE_FAMILY = (
    ("decoder_time_embedding_type", "learned", "learned"),
    ("decoder_add_attention", False, False),
    ("decoder_resnet_time_scale_shift", "scale_shift", "scale_shift"),
)
_BLOCK_TYPES = (("down_block_types", "ResnetDownsampleBlock2D"),
                ("up_block_types", "ResnetUpsampleBlock2D"))
# UNetConfig field <- its key in a UNet2DModel config (a ConsistencyDecoderVAE prefixes
# `decoder_`).
_FIELDS = ("block_out_channels", "layers_per_block", "norm_num_groups", "norm_eps",
           "in_channels", "out_channels", "num_train_timesteps")
# What makes two configs the same model: everything but the numerics of running it.
ARCHITECTURE = tuple(f.name for f in dataclasses.fields(UNetConfig)
                     if f.name not in NON_ARCHITECTURE_FIELDS)


def is_diffusers_config(value: dict) -> bool:
  return "_class_name" in value or "decoder_block_out_channels" in value or (
      "down_block_types" in value)


def diffusers_fields(value: dict, where: str) -> dict[str, Any]:
  """The UNetConfig fields a diffusers config.json states. Raises WeightFileError for a
  class other than ConsistencyDecoderVAE / UNet2DModel or a UNet outside the family."""
  cls = value.get("_class_name")
  vae = cls == "ConsistencyDecoderVAE" or (cls is None and "decoder_block_out_channels" in value)
  if not vae and cls not in ("UNet2DModel", None):
    raise WeightFileError(f"{where}: a config.json of {cls}, neither a ConsistencyDecoderVAE"
                          " nor a UNet2DModel")
  prefix = "decoder_" if vae else ""
  get = lambda key, default: value.get(key, default)
  wrong = [f"{key}={get(key, default)!r} (needs {want!r})"
           for key, want, default in (_VAE_FAMILY if vae else _UNET2D_FAMILY)
           if get(key, default) != want]
  levels = len(get(prefix + "block_out_channels", CONSISTENCY_DECODER.block_out_channels))
  for key, block in _BLOCK_TYPES:
    got = get(prefix + key, [block] * levels if vae else None)
    if list(got or ()) != [block] * levels:
      wrong.append(f"{prefix}{key}={got!r} (needs {levels} x {block!r})")
  if wrong:
    raise WeightFileError(f"{where} describes a UNet outside the Consistency Decoder family: "
                          + "; ".join(wrong))
  fields = {}
  for field in _FIELDS:
    if prefix + field in value:
      v = value[prefix + field]
      fields[field] = tuple(v) if isinstance(v, list) else v
    elif vae:  # absent from a ConsistencyDecoderVAE config: its default, the released one
      fields[field] = getattr(CONSISTENCY_DECODER, field)
  if vae:  # the VAE states its latent space; a bare UNet2DModel only its input width
    fields["latent_channels"] = value.get("latent_channels", CONSISTENCY_DECODER.latent_channels)
    fields["scaling_factor"] = value.get("scaling_factor", CONSISTENCY_DECODER.scaling_factor)
    if fields["in_channels"] != 3 + fields["latent_channels"]:
      raise WeightFileError(f"{where}: decoder_in_channels={fields['in_channels']} does not fit"
                            f" latent_channels={fields['latent_channels']} (needs"
                            f" {3 + fields['latent_channels']})")
  if "in_channels" in fields:
    fields["latent_channels"] = fields.pop("in_channels") - 3
  return fields


def config_from_fields(fields: dict[str, Any], where: str) -> UNetConfig:
  try:
    return UNetConfig(**fields)
  except (TypeError, ValueError) as e:
    raise WeightFileError(f"{where}: {e}. A config.json cannot hold a decoder's latent"
                          " statistics: pass --config with a jaxconsdec JSON that has"
                          " latent_mean and latent_std")


def read_config(path: str) -> UNetConfig:
  """A config file: jaxconsdec's own JSON (`UNetConfig.to_json`) or a diffusers config.json
  of a ConsistencyDecoderVAE or a UNet2DModel."""
  try:
    value = read_json_object(path, 1 << 20)
  except (OSError, ValueError) as e:
    raise WeightFileError(f"{path}: not a readable JSON config ({e})")
  if is_diffusers_config(value):
    return config_from_fields(diffusers_fields(value, path), path)
  try:
    return UNetConfig.from_json(json.dumps(value))
  except (TypeError, ValueError) as e:
    raise WeightFileError(f"{path}: neither a jaxconsdec UNetConfig JSON nor a diffusers"
                          f" config.json ({e})")


def beside(weight_path: str) -> Optional[str]:
  """The config.json in a weight file's folder, if there is one."""
  path = os.path.join(os.path.dirname(os.path.abspath(weight_path)), "config.json")
  return path if os.path.lexists(path) else None


def resolve(weight_path: str, explicit: Optional[UNetConfig]) -> UNetConfig:
  """The config of a diffusers weight file: the config.json beside it, if any, is the
  architecture; an explicit config must agree with it on every field it states (the error
  names each one). Without either, the released decoder."""
  return _resolve(weight_path, explicit, diffusers_fields, config_from_fields, "--config",
                  CONSISTENCY_DECODER)


def _resolve(weight_path, explicit, fields_of, build, flag, default):
  found = beside(weight_path)
  if found is None:
    return explicit or default
  try:
    value = read_json_object(found, 1 << 20)
  except (OSError, ValueError) as e:
    raise WeightFileError(f"{found}: unreadable config.json next to {weight_path} ({e})")
  where = f"{found} (beside {os.path.basename(weight_path)})"
  fields = fields_of(value, where)
  if explicit is None:
    return build(fields, where)
  diffs = [f"{name}: {v!r} in config.json, {getattr(explicit, name)!r} in {flag}"
           for name, v in sorted(fields.items()) if getattr(explicit, name) != v]
  if diffs:
    raise WeightFileError(f"{flag} disagrees with {where}: " + "; ".join(diffs)
                          + f". Drop {flag} (the folder describes itself) or fix it.")
  return explicit


# VAEConfig field <- its key in an AutoencoderKL config (a ConsistencyDecoderVAE's encoder
# prefixes `encoder_`, and has no decoder).
_VAE_FIELDS = ("block_out_channels", "layers_per_block", "norm_num_groups", "in_channels")
_VAE_SHARED = ("latent_channels", "scaling_factor", "shift_factor", "use_quant_conv",
               "use_post_quant_conv", "mid_block_add_attention", "out_channels")


def vae_fields(value: dict, where: str) -> dict[str, Any]:
  """The VAEConfig fields a diffusers config.json states: an AutoencoderKL's, or the encoder
  of a ConsistencyDecoderVAE. Refuses another architecture, naming each field."""
  cls = value.get("_class_name")
  cdvae = cls == "ConsistencyDecoderVAE" or (cls is None and "encoder_block_out_channels" in value)
  if not cdvae and cls not in ("AutoencoderKL", None):
    raise WeightFileError(f"{where}: a config.json of {cls}, not an AutoencoderKL")
  prefix = "encoder_" if cdvae else ""
  levels = len(value.get(prefix + "block_out_channels", SD_VAE.block_out_channels))
  wrong = []
  blocks = [("down_block_types", "DownEncoderBlock2D")]
  if not cdvae:
    blocks.append(("up_block_types", "UpDecoderBlock2D"))
  for key, block in blocks:
    got = value.get(prefix + key)
    if got is not None and list(got) != [block] * levels:
      wrong.append(f"{prefix}{key}={got!r} (needs {levels} x {block!r})")
  if value.get(prefix + "act_fn", "silu") != "silu":
    wrong.append(f"{prefix}act_fn={value[prefix + 'act_fn']!r} (needs 'silu')")
  if cdvae and value.get("encoder_double_z", True) is not True:
    wrong.append("encoder_double_z=False (needs True: the encoder gives mean and logvar)")
  if wrong:
    raise WeightFileError(f"{where} describes another VAE than the SD one: " + "; ".join(wrong))
  fields = {f: tuple(value[prefix + f]) if isinstance(value[prefix + f], list) else
            value[prefix + f] for f in _VAE_FIELDS if prefix + f in value}
  for f in _VAE_SHARED:
    if value.get(f) is not None:
      fields[f] = value[f]
  return fields


def resolve_vae(weight_path: str, explicit: Optional[VAEConfig]) -> VAEConfig:
  """The VAEConfig of a diffusers file, as `resolve` does for the decoder: the config.json
  beside it, if any, checked against an explicit config; else the explicit one or SD's."""
  return _resolve(weight_path, explicit, vae_fields, _vae_from_fields, "--vae-config", SD_VAE)


def _vae_from_fields(fields: dict[str, Any], where: str) -> VAEConfig:
  try:
    return VAEConfig(**fields)
  except (TypeError, ValueError) as e:
    raise WeightFileError(f"{where}: {e}")


def read_vae_config(path: str) -> VAEConfig:
  """A VAE config file: jaxconsdec's own JSON (`VAEConfig.to_json`) or a diffusers
  AutoencoderKL config.json."""
  try:
    value = read_json_object(path, 1 << 20)
  except (OSError, ValueError) as e:
    raise WeightFileError(f"{path}: not a readable JSON config ({e})")
  try:
    if "_class_name" in value or "down_block_types" in value:
      return _vae_from_fields(vae_fields(value, path), path)
    return VAEConfig.from_json(json.dumps(value))
  except (TypeError, ValueError) as e:
    raise WeightFileError(f"{path}: neither a jaxconsdec VAEConfig JSON nor an AutoencoderKL"
                          f" config.json ({e})")
