"""Builds weight files in each published layout (SPEC section 4) with torch, for the tests.

The raw TorchScript names are produced here by their own small function, written from the
SPEC independently of the converter's table, so a wrong table cannot test itself green.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import torch
from safetensors.torch import save_file

from jaxconsdec.config import UNetConfig
from reference import diffusers_unet, diffusers_vae

NO_TORCH = ("import sys; sys.modules['torch'] = None\n"
            "try:\n  import torch\n  raise SystemExit('torch importable')\n"
            "except ImportError: pass\n"
            "from jaxconsdec.cli import main; sys.exit(main(sys.argv[1:]))\n")


def convert_without_torch(*args):
  """Runs `jaxconsdec convert ARGS` in a subprocess where `import torch` fails."""
  return subprocess.run([sys.executable, "-c", NO_TORCH, "convert", *args],
                        capture_output=True, text=True, timeout=600)


_MOD = {"norm1": "gn_1", "norm2": "gn_2", "conv1": "f_1", "conv2": "f_2",
        "time_emb_proj": "f_t", "conv_shortcut": "f_s"}


def raw_name(key: str, levels: int) -> str | None:
  """diffusers UNet2DModel name -> raw TorchScript name; None for the time table."""
  module, leaf = key.rsplit(".", 1)
  norm = "norm" in module.split(".")[-1]
  letter = {"weight": "g" if norm else "w", "bias": "b"}[leaf]
  fixed = {"conv_in": "embed_image.f", "time_embedding.linear_1": "embed_time.f_1",
           "time_embedding.linear_2": "embed_time.f_2", "conv_norm_out": "output.gn",
           "conv_out": "output.f"}
  if module == "time_proj":
    return None
  if module in fixed:
    return f"{fixed[module]}.{letter}"
  parts = module.split(".")
  inner = _MOD[parts[-1]]
  if parts[0] == "mid_block":
    return f"blocks.mid_{parts[2]}.{inner}.{letter}"
  direction = "down" if parts[0] == "down_blocks" else "up"
  level = int(parts[1]) if direction == "down" else levels - 1 - int(parts[1])
  if parts[2] == "resnets":
    return f"blocks.{direction}_{level}_conv_{parts[3]}.{inner}.{letter}"
  return f"blocks.{direction}_{level}_{direction}samp.{inner}.{letter}"


class _Leaf(torch.nn.Module):
  def __init__(self, tensors):
    super().__init__()
    for name, t in tensors.items():
      setattr(self, name, torch.nn.Parameter(t.clone(), requires_grad=False))


class _Node(torch.nn.Module):
  pass


class ConvUNetVAE(torch.nn.Module):
  """A module tree whose TorchScript attribute paths are the raw names."""

  def __init__(self, raw: dict, table: torch.Tensor, table_as: str):
    super().__init__()
    groups: dict[str, dict] = {}
    for name, t in raw.items():
      module, leaf = name.rsplit(".", 1)
      groups.setdefault(module, {})[leaf] = t
    for module, tensors in groups.items():
      parent, child = self, module.split(".")
      for part in child[:-1]:
        if not hasattr(parent, part):
          setattr(parent, part, _Node())
        parent = getattr(parent, part)
      setattr(parent, child[-1], _Leaf(tensors))
    if table_as == "parameter":
      self.embed_time.table = torch.nn.Parameter(table.clone(), requires_grad=False)
      self._const = None
    else:
      self._const = table.clone()  # plain tensor: tracing bakes it into constants.pkl

  def forward(self, x):
    if self._const is not None:
      return x + self._const.sum() * 0
    return x * 1


def write_torchscript(path: str, unet, cfg: UNetConfig, table_as: str, extra=None) -> None:
  """extra: more {raw name: tensor} to put in the module tree (a file with unknown tensors)."""
  sd = unet.state_dict()
  raw = {raw_name(k, len(cfg.block_out_channels)): v for k, v in sd.items()
         if raw_name(k, len(cfg.block_out_channels))}
  raw.update(extra or {})
  module = ConvUNetVAE(raw, sd["time_proj.weight"], table_as).eval()
  traced = torch.jit.trace(module, torch.zeros(1), check_trace=False)
  traced.save(path)


def write_raw(path: str, embedding_path: str, unet, cfg: UNetConfig) -> None:
  sd = unet.state_dict()
  levels = len(cfg.block_out_channels)
  save_file({raw_name(k, levels): v.contiguous() for k, v in sd.items() if raw_name(k, levels)},
            path)
  save_file({"weight": sd["time_proj.weight"].contiguous()}, embedding_path)


def write_unet2d(path: str, unet) -> None:
  save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, path)


def write_diffusers(folder: str, vae, dtype: torch.dtype) -> str:
  vae.to(dtype).save_pretrained(folder, safe_serialization=True)
  vae.to(torch.float32)
  return os.path.join(folder, "diffusion_pytorch_model.safetensors")


def ldm_vae_name(key: str, levels: int) -> str:
  """diffusers AutoencoderKL name -> the original latent-diffusion name (TRAINING.md 3),
  written from the published pattern, independently of the converter's table."""
  parts = key.split(".")
  half = parts[0]
  if half in ("quant_conv", "post_quant_conv"):
    return key
  rest = parts[1:]
  simple = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
  if rest[0] in simple:
    return ".".join([half, simple[rest[0]]] + rest[1:])
  if rest[0] == "mid_block":
    if rest[1] == "attentions":
      module = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
      tail = rest[3:] if rest[3] != "to_out" else ["to_out"] + rest[5:]
      return ".".join([half, "mid", "attn_1", module[tail[0]]] + tail[1:])
    block = {"0": "block_1", "1": "block_2"}[rest[2]]
    inner = [{"conv_shortcut": "nin_shortcut"}.get(rest[3], rest[3])] + rest[4:]
    return ".".join([half, "mid", block] + inner)
  direction = "down" if rest[0] == "down_blocks" else "up"
  level = int(rest[1]) if direction == "down" else levels - 1 - int(rest[1])
  if rest[2] == "resnets":
    inner = [{"conv_shortcut": "nin_shortcut"}.get(rest[4], rest[4])] + rest[5:]
    return ".".join([half, direction, str(level), "block", rest[3]] + inner)
  return ".".join([half, direction, str(level), f"{direction}sample"] + rest[4:])


def write_ldm_vae(path: str, vae, levels: int, prefix: str = "", extra=None) -> None:
  """The latent-diffusion layout: attention q/k/v/proj_out as 1x1 convolutions."""
  out = {}
  for key, value in vae.state_dict().items():
    name = ldm_vae_name(key, levels)
    if ".attn_1." in name and name.endswith(".weight") and ".norm." not in name:
      value = value[:, :, None, None]
    out[prefix + name] = value.contiguous()
  out.update(extra or {})
  save_file(out, path)


def write_legacy_autoencoder(path: str, vae) -> None:
  """An AutoencoderKL file of older diffusers, whose attention is query/key/value/proj_attn."""
  names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  out = {}
  for key, value in vae.state_dict().items():
    for new, old in names.items():
      key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
    out[key] = value.contiguous()
  save_file(out, path)
