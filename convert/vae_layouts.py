"""The SD VAE's published layouts under diffusers `AutoencoderKL` names (docs/weights.md).

  autoencoder  diffusers AutoencoderKL safetensors (`vae/diffusion_pytorch_model.safetensors`,
               its config.json beside it): encoder.*, decoder.*, quant_conv.*,
               post_quant_conv.*; older files name the attention query/key/value/proj_attn
  diffusers    a ConsistencyDecoderVAE file: its encoder.* and quant_conv.* (the SD 1.5
               encoder, copied verbatim; that file has no GAN decoder)
  ldm          the original latent-diffusion names (`encoder.down.0.block.0.conv1`,
               `mid.attn_1.q` as 1x1 convolutions), alone or under `first_stage_model.` in a
               full SD checkpoint (whose other parts are not the VAE and are left alone)
"""

from __future__ import annotations

import re
from typing import Optional

LDM_PREFIX = "first_stage_model."
_HALF_PREFIXES = {"encoder": ("encoder.", "quant_conv."),
                  "decoder": ("decoder.", "post_quant_conv.")}
# Older diffusers attention names -> today's.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LDM_MODULES = {"nin_shortcut": "conv_shortcut", "norm_out": "conv_norm_out"}
_LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                  "proj_out": "to_out.0"}
_LDM_BLOCK = re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)"
                        r"\.(.+)$")
_LDM_MID = re.compile(r"^(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)$")


def halves_of(names) -> tuple[str, ...]:
  """Which halves of the VAE (encoder, decoder) a set of AutoencoderKL names holds."""
  return tuple(h for h, prefixes in _HALF_PREFIXES.items()
               if any(n.startswith(prefixes) for n in names))


def is_ldm(names) -> bool:
  return any(n.startswith(LDM_PREFIX) or _LDM_BLOCK.match(n) or _LDM_MID.match(n)
             for n in names)


def is_autoencoder(names) -> bool:
  return bool(names) and all(n.startswith(("encoder.", "decoder.", "quant_conv.",
                                           "post_quant_conv.")) for n in names)


def legacy_to_diffusers(name: str) -> str:
  """An older diffusers attention name -> today's; any other name unchanged."""
  module, _, leaf = name.rpartition(".")
  head, _, last = module.rpartition(".")
  if "attentions." in name and last in _LEGACY_ATTENTION:
    return f"{head}.{_LEGACY_ATTENTION[last]}.{leaf}"
  return name


def ldm_to_diffusers(name: str, levels: int) -> Optional[str]:
  """A latent-diffusion VAE name (prefix stripped) -> AutoencoderKL's, or None.

  The decoder's `up` list runs the other way: `decoder.up.{i}` is `decoder.up_blocks.{n-1-i}`.
  """
  if name.startswith(("quant_conv.", "post_quant_conv.")):
    return name
  for ldm, ours in (("conv_in", "conv_in"), ("conv_out", "conv_out"),
                    ("norm_out", "conv_norm_out")):
    for half in ("encoder", "decoder"):
      if name.startswith(f"{half}.{ldm}."):
        return f"{half}.{ours}." + name[len(f"{half}.{ldm}."):]
  m = _LDM_MID.match(name)
  if m:
    half, part, rest = m.groups()
    if part == "attn_1":
      module, _, leaf = rest.partition(".")
      if module not in _LDM_ATTENTION:
        return None
      return f"{half}.mid_block.attentions.0.{_LDM_ATTENTION[module]}.{leaf}"
    index = {"block_1": 0, "block_2": 1}[part]
    return f"{half}.mid_block.resnets.{index}.{_resnet_rest(rest)}"
  m = _LDM_BLOCK.match(name)
  if m:
    half, direction, level, inner, block, rest = m.groups()
    level = int(level) if direction == "down" else levels - 1 - int(level)
    target = f"{half}.{direction}_blocks.{level}"
    if block is not None:
      return f"{target}.resnets.{block}.{_resnet_rest(rest)}"
    return f"{target}.{direction}samplers.0.{rest}"  # downsample.conv / upsample.conv
  return None


def _resnet_rest(rest: str) -> str:
  module, _, leaf = rest.partition(".")
  return f"{_LDM_MODULES.get(module, module)}.{leaf}"


def is_ldm_attention_projection(diffusers_name: str) -> bool:
  """q, k, v and proj_out are 1x1 convolutions in the latent-diffusion layout, Linear in
  AutoencoderKL: their (C, C, 1, 1) weights are reshaped to (C, C)."""
  return ".attentions.0.to_" in diffusers_name and diffusers_name.endswith(".weight")
