"""Latents on disk: which files a job reads, the latents they hold, and their output names.

Inputs are `.npy`, `.npz` and `.safetensors` files, or directories of them (walked in sorted
order). A file holds one latent (rank 3, e.g. (4, h, w) in NCHW) or a batch (rank 4); an
`.npz` or `.safetensors` file holds one or more such arrays under names.

Output names are derived from input names, so they are stable from run to run:
    x.npy           one latent        -> x
    x.npy           a batch of 12     -> x-00 ... x-11
    x.npz / x.safetensors, array "a"  -> x-a, or x-a-00 ... for a batch
    DIR/sub/x.npy                     -> sub/x   (a directory's tree is mirrored)

Listing reads headers only; `LatentReader` reads one latent at a time, when it is decoded.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Optional, Sequence

import numpy as np

from jaxconsdec import layout as layouts
from jaxconsdec.convert.formats import SAFETENSORS_DTYPES

EXTENSIONS = (".npy", ".npz", ".safetensors")


@dataclasses.dataclass(frozen=True)
class LatentItem:
  """One latent of a job."""
  path: str                  # the file holding it
  array: Optional[str]       # name inside an .npz/.safetensors file; None for .npy
  row: Optional[int]         # index in a batch array; None for a single latent
  name: str                  # output name without extension, relative to OUT_DIR
  hw: tuple[int, int]        # latent height and width

  @property
  def where(self) -> str:
    """A human-readable location: file, array name and row."""
    out = self.path + (f"[{self.array!r}]" if self.array is not None else "")
    return out + (f"[{self.row}]" if self.row is not None else "")


@dataclasses.dataclass(frozen=True)
class Failure:
  input: str
  reason: str

  def to_json(self) -> dict:
    return {"input": self.input, "reason": self.reason}


def list_latents(inputs: Sequence[str], *, layout: str, channels: int = 4,
                 size_multiple: int = 1) -> tuple[list[LatentItem], list[Failure]]:
  """Every latent the inputs hold, in a stable order, and every input that holds none.

  size_multiple: 8*h and 8*w must divide by it (the UNet's downsampling factor).
  """
  layouts.check_layout(layout)
  items, failures = [], []
  for path, name in _files(inputs, failures):
    try:
      arrays = _array_headers(path)
    except Exception as e:  # any parse error of a user's file is that file's failure
      failures.append(Failure(path, _unreadable(path, e)))
      continue
    if not arrays:
      failures.append(Failure(path, "holds no arrays"))
    single_array = path.endswith(".npy")
    for array, shape, dtype in arrays:
      where = path + ("" if single_array else f"[{array!r}]")
      problem = _check_shape(shape, dtype, layout, channels, size_multiple)
      if problem:
        failures.append(Failure(where, problem))
        continue
      stem = name if single_array else f"{name}-{array}"
      hw = _hw(shape[-3:], layout)
      if len(shape) == 3:
        items.append(LatentItem(path, None if single_array else array, None, stem, hw))
      else:
        width = len(str(shape[0] - 1))
        items += [LatentItem(path, None if single_array else array, i, f"{stem}-{i:0{width}d}", hw)
                  for i in range(shape[0])]
  return _drop_name_clashes(items, failures), failures


def _files(inputs: Sequence[str], failures: list[Failure]):
  """(path, output stem) of every latent file, directories walked in sorted order."""
  for given in inputs:
    if os.path.isdir(given):
      found = 0
      for root, dirs, files in os.walk(given):
        dirs.sort()
        for f in sorted(files):
          if f.endswith(EXTENSIONS) and not f.startswith("."):
            path = os.path.join(root, f)
            found += 1
            yield path, os.path.splitext(os.path.relpath(path, given))[0]
      if not found:
        failures.append(Failure(given, f"directory holds no {', '.join(EXTENSIONS)} files"))
    elif not os.path.exists(given):
      failures.append(Failure(given, "no such file or directory"))
    elif not given.endswith(EXTENSIONS):
      failures.append(Failure(given, f"not a latent file: expected {', '.join(EXTENSIONS)}"))
    else:
      yield given, os.path.splitext(os.path.basename(given))[0]


def _unreadable(path: str, error: Exception) -> str:
  if os.path.isfile(path) and os.path.getsize(path) == 0:
    return "empty file"
  return f"unreadable ({type(error).__name__}: {str(error)[:200]})"


def _array_headers(path: str) -> list[tuple[str, tuple[int, ...], np.dtype]]:
  """[(name, shape, dtype)] of the arrays in a file, from headers only."""
  if path.endswith(".npy"):
    with open(path, "rb") as f:
      shape, dtype = _npy_header(f)
    return [("", shape, dtype)]
  if path.endswith(".npz"):
    out = []
    with zipfile.ZipFile(path) as z:
      for member in z.namelist():
        if member.endswith(".npy"):
          with z.open(member) as f:
            shape, dtype = _npy_header(f)
          out.append((member[:-len(".npy")], shape, dtype))
    return out
  from safetensors import safe_open
  with safe_open(path, framework="numpy") as handle:
    return [(k, tuple(handle.get_slice(k).get_shape()),
             SAFETENSORS_DTYPES.get(handle.get_slice(k).get_dtype(), np.dtype("O")))
            for k in handle.keys()]


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
  version = np.lib.format.read_magic(f)
  read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                 else np.lib.format.read_array_header_2_0)
  shape, _, dtype = read_header(f)
  return tuple(shape), np.dtype(dtype)


def _check_shape(shape, dtype, layout, channels, size_multiple) -> Optional[str]:
  want = "(4, h, w) or (B, 4, h, w)" if layout == "NCHW" else "(h, w, 4) or (B, h, w, 4)"
  if len(shape) not in (3, 4):
    return f"shape {shape} has rank {len(shape)}; a latent file holds {want} ({layout})"
  if dtype.kind != "f":
    return f"dtype {dtype}; latents must be floats"
  caxis = layouts.channel_axis(layout) - 1
  if shape[-3:][caxis] != channels:
    msg = (f"shape {shape}: {shape[-3:][caxis]} channels where {layout} puts them, expected"
           f" {channels} (Stable Diffusion 1.x/2.x latents)")
    other = "NHWC" if layout == "NCHW" else "NCHW"
    if shape[-3:][layouts.channel_axis(other) - 1] == channels:
      msg += f"; the shape fits --layout {other}"
    return msg
  if 0 in shape:
    return f"shape {shape} is empty"
  h, w = _hw(shape[-3:], layout)
  if (8 * h) % size_multiple or (8 * w) % size_multiple:
    return (f"latent size {h}x{w} gives a {8 * h}x{8 * w} image, which does not divide by the"
            f" UNet's downsampling factor {size_multiple}")
  return None


def _hw(shape3, layout) -> tuple[int, int]:
  return (shape3[1], shape3[2]) if layout == "NCHW" else (shape3[0], shape3[1])


def _drop_name_clashes(items: list[LatentItem], failures: list[Failure]) -> list[LatentItem]:
  seen: dict[str, LatentItem] = {}
  kept = []
  for item in items:
    if item.name in seen:
      failures.append(Failure(item.where, f"its output name {item.name!r} is already taken by"
                                          f" {seen[item.name].where}; rename one input"))
    else:
      seen[item.name] = item
      kept.append(item)
  return kept


class LatentReader:
  """Reads latents one at a time, keeping the last array open (rows of a batch are read in
  order, so a batch file is opened once per global batch rather than once per row)."""

  def __init__(self):
    self._key, self._array = None, None

  def read(self, item: LatentItem) -> np.ndarray:
    """The latent as float32, (4, h, w) or (h, w, 4) as stored. Raises on a bad file."""
    array = self._open(item.path, item.array)
    value = array if item.row is None else array[item.row]
    return np.asarray(value, dtype=np.float32)

  def _open(self, path: str, name: Optional[str]):
    if self._key != (path, name):
      self._key, self._array = None, None
      if path.endswith(".npy"):
        self._array = np.load(path, mmap_mode="r", allow_pickle=False)
      elif path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
          self._array = z[name]
      else:
        from safetensors import safe_open
        with safe_open(path, framework="numpy") as handle:
          self._array = handle.get_tensor(name)
      self._key = (path, name)
    return self._array
