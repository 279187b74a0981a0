"""Builds weight files in each published layout (SPEC section 4) with torch, for the tests.

The raw TorchScript names are produced here by their own small function, written from the
SPEC independently of the converter's table, so a wrong table cannot test itself green.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import save_file

from jaxconsdec.config import UNetConfig
from reference import diffusers_unet, diffusers_vae

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
