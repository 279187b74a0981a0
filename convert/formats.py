"""Which published layout a file is (from its content), and its tensors under diffusers names.

Layouts (docs/weights.md):
  torchscript  OpenAI's `decoder.pt`: raw names (`blocks.down_0_conv_0.f_1.w`, ...)
  diffusers    `ConsistencyDecoderVAE` safetensors: `decoder_unet.` + UNet2DModel names, with
               the SD VAE `encoder.*` and `quant_conv.*` beside them
  unet2d       `UNet2DModel` safetensors, names without prefix
  raw          safetensors with the raw TorchScript names, no time-embedding table
  embedding    safetensors holding only `weight` [num_train_timesteps, C0], the table `raw`
               files lack
Tensors are read lazily, one at a time, so a conversion never holds the file twice.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from jaxconsdec.config import CONSISTENCY_DECODER, SD_VAE, UNetConfig, VAEConfig
from jaxconsdec.convert.errors import WeightFileError
from jaxconsdec.convert import diffusers_config, safetensors_file, vae_layouts
from jaxconsdec.convert.torchscript import TorchScriptArchive
from jaxconsdec.files import open_regular

DIFFUSERS_PREFIX = "decoder_unet."
EXTRA_PREFIXES = ("encoder.", "quant_conv.")

# Raw TorchScript module letters -> diffusers module / parameter names (docs/model.md).
_RAW_MODULES = {"gn_1": "norm1", "gn_2": "norm2", "f_1": "conv1", "f_2": "conv2",
                "f_t": "time_emb_proj", "f_s": "conv_shortcut"}
_RAW_LEAVES = {"w": "weight", "b": "bias", "g": "weight"}
_RAW_FIXED = {"embed_image.f": "conv_in", "embed_time.f_1": "time_embedding.linear_1",
              "embed_time.f_2": "time_embedding.linear_2", "output.gn": "conv_norm_out",
              "output.f": "conv_out"}
_RAW_BLOCK = re.compile(r"^blocks\.(?:(down|up)_(\d+)_(?:conv_(\d+)|(downsamp|upsamp))|mid_(\d+))"
                        r"\.(\w+)\.(\w)$")
RAW_MARKER = "embed_image.f.w"


def raw_to_diffusers(name: str, levels: int) -> Optional[str]:
  """Raw TorchScript name -> diffusers UNet2DModel name, or None if it is not one.

  Up blocks are numbered in reverse: raw `up_{i}` is diffusers `up_blocks.{levels-1-i}`.
  """
  module, _, leaf = name.rpartition(".")
  if module in _RAW_FIXED and leaf in _RAW_LEAVES:
    return f"{_RAW_FIXED[module]}.{_RAW_LEAVES[leaf]}"
  m = _RAW_BLOCK.match(name)
  if not m or m.group(6) not in _RAW_MODULES or m.group(7) not in _RAW_LEAVES:
    return None
  direction, level, conv, resample, mid, mod, leaf = m.groups()
  tail = f"{_RAW_MODULES[mod]}.{_RAW_LEAVES[leaf]}"
  if mid is not None:
    return f"mid_block.resnets.{mid}.{tail}"
  level = int(level) if direction == "down" else levels - 1 - int(level)
  block = f"{direction}_blocks.{level}"
  inner = f"resnets.{conv}" if conv is not None else f"{direction}samplers.0"
  return f"{block}.{inner}.{tail}"


@dataclasses.dataclass
class SourceInfo:
  """Provenance of one input file."""
  path: str
  size: int
  sha256: str
  format: str
  tensor_count: int
  dtypes: list[str]

  def to_json(self) -> dict:
    return dict(file=os.path.basename(self.path), size=self.size, sha256=self.sha256,
                format=self.format, tensor_count=self.tensor_count, dtypes=self.dtypes)


class LazyTensors(Mapping):
  """name -> numpy array, each read from disk only when asked for.

  `specs[name]` is the (shape, dtype) the file *declares* for it, known without reading, so a
  caller can check every tensor against the model before reading any (weights.py does).
  """

  def __init__(self, readers: dict[str, Callable[[], np.ndarray]],
               specs: dict[str, tuple[tuple[int, ...], np.dtype]]):
    self._readers, self.specs = readers, specs

  def __getitem__(self, key):
    return self._readers[key]()

  def __contains__(self, key):  # Mapping's default would read the tensor to find out
    return key in self._readers

  def __iter__(self):
    return iter(self._readers)

  def __len__(self):
    return len(self._readers)

  def update(self, other: "LazyTensors") -> None:
    self._readers.update(other._readers)
    self.specs.update(other.specs)

  def subset(self, rename: dict[str, str],
             reshape: Optional[dict[str, tuple[int, ...]]] = None) -> "LazyTensors":
    """The tensors named by `rename`'s keys, under its values; those named in `reshape` (by
    their new name) are read as that shape (same element count)."""
    reshape = reshape or {}
    readers, specs = {}, {}
    for old, new in rename.items():
      read, (shape, dtype) = self._readers[old], self.specs[old]
      if new in reshape:
        read = (lambda r=read, s=reshape[new]: r().reshape(s))
        shape = reshape[new]
      readers[new], specs[new] = read, (shape, dtype)
    return LazyTensors(readers, specs)


@dataclasses.dataclass
class Weights:
  unet: LazyTensors          # diffusers UNet2DModel names (no prefix)
  extras: LazyTensors        # e.g. the SD VAE encoder of a ConsistencyDecoderVAE file
  sources: list[SourceInfo]
  config: UNetConfig         # the architecture: given, or from the config.json beside a file


def sha256_of(path: str) -> str:
  """SHA-256 of a file's content, hex. Remembered per (file, size, mtime), so a process that
  both converts a file and names it in a job manifest reads it once."""
  info = os.stat(path)
  return _sha256(os.path.realpath(path), info.st_dev, info.st_ino, info.st_size,
                 info.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, *stat_key) -> str:
  h = hashlib.sha256()
  with open_regular(path) as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _sniff(path: str) -> str:
  try:
    with open_regular(path) as f:
      head = f.read(16)
  except OSError as e:
    raise WeightFileError(f"{path}: cannot read ({e.strerror})")
  if head.startswith(b"PK\x03\x04"):
    return "zip"
  if len(head) >= 9 and head[8:9] == b"{":
    return "safetensors"
  kind = "empty" if not head else f"starts with bytes {head[:8]!r}"
  raise WeightFileError(f"{path}: neither a TorchScript archive (ZIP) nor a safetensors file"
                        f" ({kind}). Expected decoder.pt or a *.safetensors weight file.")


def _safetensors_tensors(path: str):
  """-> ({name: reader}, {name: (shape, dtype)}) of a safetensors file, reading no data yet.

  The header is checked against the file's real size first (safetensors_file.read_header);
  the data is then read with plain reads into fresh arrays rather than through a memory
  map, whose touched pages would count as a second copy of the file.
  """
  try:
    with open_regular(path) as f:
      entries = safetensors_file.read_header(f)
  except OSError as e:
    raise WeightFileError(f"{path}: cannot read ({e.strerror})")
  except ValueError as e:
    raise WeightFileError(f"{path}: not a valid safetensors file ({e}). Is it truncated? Compare"
                          " its size and SHA-256 with the published file.")
  unknown = sorted({e.dtype_name for e in entries.values() if e.dtype is None})
  if unknown:
    raise WeightFileError(f"{path}: tensors of dtype {', '.join(unknown)}, which no published"
                          " Consistency Decoder file has")

  def reader(key):
    def read():
      try:
        with open_regular(path) as f:
          return safetensors_file.read_tensor(f, entries[key])
      except OSError as e:
        raise WeightFileError(f"{path}: cannot read tensor {key} ({e.strerror})")
      except ValueError as e:
        raise WeightFileError(f"{path}: tensor {key}: {e}")
    return read
  return {k: reader(k) for k in entries}, {k: (e.shape, e.dtype) for k, e in entries.items()}


def _classify_safetensors(path: str, specs: dict) -> str:
  keys = set(specs)
  prefixed = {k for k in keys if k.startswith(DIFFUSERS_PREFIX)}
  extras = {k for k in keys if k.startswith(EXTRA_PREFIXES)}
  raw = {k for k in keys if k.startswith(("blocks.", "embed_image.", "embed_time.", "output."))}
  plain = {k for k in keys if k.split(".")[0] in (
      "conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block", "up_blocks",
      "conv_norm_out", "conv_out")}
  kinds = [name for name, found in (("diffusers", prefixed), ("raw", raw), ("unet2d", plain))
           if found]
  if len(kinds) > 1:
    raise WeightFileError(f"{path}: mixes layouts ({' and '.join(kinds)} names in one file);"
                          " each published file has one. Was it assembled by hand?")
  if kinds == ["diffusers"]:
    return "diffusers"
  if kinds and extras:
    raise WeightFileError(f"{path}: {kinds[0]} names next to SD VAE encoder tensors without the"
                          " decoder_unet. prefix: not a published layout")
  if kinds:
    return kinds[0]
  if keys == {"weight"} and len(specs["weight"][0]) == 2:
    return "embedding"
  if vae_layouts.is_ldm(keys):
    return "ldm-vae"
  if vae_layouts.is_autoencoder(keys):
    return "autoencoder"
  sample = ", ".join(sorted(keys)[:5])
  raise WeightFileError(f"{path}: a safetensors file with {len(keys)} tensors ({sample}...)"
                        " but none of the Consistency Decoder or SD VAE layouts")


# What each layout holds: the decoder UNet, the SD VAE (or a half of it), or a time table.
PARTS = {"torchscript": ("decoder",), "diffusers": ("decoder", "vae"), "unet2d": ("decoder",),
         "raw": ("decoder",), "embedding": (), "autoencoder": ("vae",), "ldm-vae": ("vae",)}


def layout_of(path: str) -> str:
  """The layout of a weight file, from its content (a key of PARTS)."""
  if _sniff(path) == "zip":
    return "torchscript"
  _, specs = _safetensors_tensors(path)
  return _classify_safetensors(path, specs)


def _source(path, fmt, count, dtypes) -> SourceInfo:
  return SourceInfo(path, os.path.getsize(path), sha256_of(path), fmt, count, list(dtypes))


def _read_one(path: str, config: UNetConfig):
  """-> (format, tensors under diffusers names or raw names, extras, SourceInfo)."""
  levels = len(config.block_out_channels)
  empty = LazyTensors({}, {})
  if _sniff(path) == "zip":
    return _read_torchscript(path, config)
  tensors = LazyTensors(*_safetensors_tensors(path))
  fmt = _classify_safetensors(path, tensors.specs)
  info = _source(path, fmt, len(tensors), sorted({str(d) for _, d in tensors.specs.values()}))
  if fmt == "embedding":
    return fmt, tensors.subset({"weight": "time_proj.weight"}), empty, info
  if fmt == "diffusers":
    unet = tensors.subset({k: k[len(DIFFUSERS_PREFIX):] for k in tensors
                           if k.startswith(DIFFUSERS_PREFIX)})
    extras = tensors.subset({k: k for k in tensors if not k.startswith(DIFFUSERS_PREFIX)})
    return fmt, unet, extras, info
  if fmt == "raw":
    # Unknown names are kept as they are, so strict loading reports them as unexpected.
    return fmt, tensors.subset({k: raw_to_diffusers(k, levels) or k for k in tensors}), empty, info
  return fmt, tensors, empty, info


def _read_torchscript(path: str, config: UNetConfig):
  from jaxconsdec.weights import param_count  # the model's size caps what the file may declare
  levels = len(config.block_out_channels)
  archive = TorchScriptArchive(path, max_elements=param_count(config))
  base = next((k[:-len(RAW_MARKER)] for k in archive.tensors if k.endswith(RAW_MARKER)), None)
  if base is None:
    raise WeightFileError(f"{path}: a TorchScript archive, but without the decoder's"
                          f" `{RAW_MARKER}` tensor: not OpenAI's decoder.pt")
  readers, specs, unmapped = {}, {}, {}
  for name, ref in archive.tensors.items():
    mapped = raw_to_diffusers(name[len(base):], levels) if name.startswith(base) else None
    if mapped is None:
      unmapped[name] = ref
      continue
    readers[mapped] = (lambda r=ref: archive.read(r))
    specs[mapped] = (ref.shape, ref.storage.dtype)
  # The time-embedding table has no raw name (docs/model.md): the one tensor of its shape,
  # among the unnamed parameters or the code's constants.
  want = (config.num_train_timesteps, config.block_out_channels[0])
  candidates = [(n, r) for n, r in unmapped.items() if r.shape == want]
  candidates += [(None, r) for r in archive.constants if r.shape == want]
  if len(candidates) == 1:
    name, ref = candidates[0]
    unmapped.pop(name, None)
    readers["time_proj.weight"] = lambda r=ref: archive.read(r)
    specs["time_proj.weight"] = (want, ref.storage.dtype)
  elif len(candidates) > 1:
    raise WeightFileError(f"{path}: {len(candidates)} tensors of shape {want} could be the"
                          " time-embedding table; pass the right one with --embedding FILE")
  for name, ref in unmapped.items():  # kept under their raw names: strict loading lists them
    readers[name] = lambda r=ref: archive.read(r)
    specs[name] = (ref.shape, ref.storage.dtype)
  dtypes = sorted({str(r.storage.dtype) for r in archive.tensors.values()})
  info = _source(path, "torchscript", len(archive.tensors) + len(archive.constants), dtypes)
  return "torchscript", LazyTensors(readers, specs), LazyTensors({}, {}), info


def read_weights(paths: Sequence[str], config: Optional[UNetConfig] = None,
                 embedding: Optional[str] = None) -> Weights:
  """Reads one weight file, or a raw file plus its embedding file, as diffusers names.

  config: the architecture. A diffusers-layout safetensors file with a config.json beside it
  describes itself, and a `config` given too must agree with it; other files are the
  released decoder unless `config` says otherwise. `Weights.config` is the one used.
  """
  paths = list(paths) + ([embedding] if embedding else [])
  if not paths:
    raise WeightFileError("no weight file given")
  config = _config_for(paths[0], config)
  unet, extras = LazyTensors({}, {}), LazyTensors({}, {})
  sources, formats = [], []
  for path in paths:
    if PARTS[layout_of(path)] == ("vae",):
      raise WeightFileError(f"{path} holds an SD VAE ({layout_of(path)} layout), not a"
                            " Consistency Decoder: give it as the VAE (--vae), or convert it"
                            " on its own")
    fmt, tensors, more, info = _read_one(path, config)
    formats.append(fmt)
    sources.append(info)
    # An explicit --embedding file replaces a table the weight file already has; an embedding
    # file given as a second SRC must not contradict one.
    replaceable = {"time_proj.weight"} if path == embedding else set()
    overlap = (set(tensors) & set(unet)) - replaceable
    if overlap == {"time_proj.weight"}:
      raise WeightFileError(f"{path}: a second time-embedding table; give only one")
    if overlap:
      raise WeightFileError(f"{path}: repeats {len(overlap)} tensors of another input"
                            f" (e.g. {sorted(overlap)[0]}); give one weight file (plus an"
                            " embedding file for the raw layout)")
    unet.update(tensors)
    extras.update(more)
  main = [f for f in formats if f != "embedding"]
  if len(main) != 1:
    raise WeightFileError(f"expected one weight file (plus an optional embedding file), got"
                          f" formats {formats} for {paths}")
  if "time_proj.weight" not in unet:
    raise WeightFileError(
        f"{paths[0]}: no time-embedding table [{config.num_train_timesteps},"
        f" {config.block_out_channels[0]}] in this {main[0]} file (not as a parameter, not as a"
        " constant). Supply it with --embedding FILE: a safetensors file with one tensor"
        " `weight` (the community's embedding.safetensors).")
  return Weights(unet, extras, sources, config)


def _config_for(path: str, explicit: Optional[UNetConfig]) -> UNetConfig:
  """diffusers-layout safetensors files describe themselves (diffusers_config.resolve)."""
  if _sniff(path) == "safetensors":
    _, specs = _safetensors_tensors(path)  # the header only
    if _classify_safetensors(path, specs) in ("diffusers", "unet2d"):
      return diffusers_config.resolve(path, explicit)
  return explicit or CONSISTENCY_DECODER


@dataclasses.dataclass
class VAEWeights:
  tensors: LazyTensors       # diffusers AutoencoderKL names
  halves: tuple[str, ...]    # "encoder", "decoder": which the file holds
  source: SourceInfo
  config: VAEConfig          # given, or from the config.json beside a diffusers file


def read_vae_weights(path: str, config: Optional[VAEConfig] = None) -> VAEWeights:
  """Reads the SD VAE (or the half of it) a weight file holds, as AutoencoderKL names.

  config: the architecture. A diffusers file with a config.json beside it (an AutoencoderKL,
  or a ConsistencyDecoderVAE for its encoder) describes itself and a config given too must
  agree; a latent-diffusion file is the SD VAE unless `config` says otherwise.
  """
  layout = layout_of(path)
  if "vae" not in PARTS[layout]:
    raise WeightFileError(f"{path}: a {layout} file, which holds no SD VAE")
  tensors = LazyTensors(*_safetensors_tensors(path))
  info = _source(path, layout, len(tensors), sorted({str(d) for _, d in tensors.specs.values()}))
  if layout == "ldm-vae":
    config = config or SD_VAE
    names = [k for k in tensors if k.startswith(vae_layouts.LDM_PREFIX)] or list(tensors)
    rename, reshape = {}, {}
    for name in names:
      short = name[len(vae_layouts.LDM_PREFIX):] if name.startswith(vae_layouts.LDM_PREFIX) else name
      new = vae_layouts.ldm_to_diffusers(short, len(config.block_out_channels)) or name
      shape = tensors.specs[name][0]
      if vae_layouts.is_ldm_attention_projection(new) and len(shape) == 4 and shape[2:] == (1, 1):
        reshape[new] = shape[:2]
      rename[name] = new
    vae = tensors.subset(rename, reshape)
  else:
    config = diffusers_config.resolve_vae(path, config)
    names = [k for k in tensors if not k.startswith(DIFFUSERS_PREFIX)]  # the VAE's part
    vae = tensors.subset({k: vae_layouts.legacy_to_diffusers(k) for k in names})
  halves = vae_layouts.halves_of(list(vae))
  if not halves:
    raise WeightFileError(f"{path}: no SD VAE tensors in this {layout} file")
  return VAEWeights(vae, halves, info, config)
