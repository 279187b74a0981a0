"""Latents on disk: which files a job reads, the latents they hold, and their output names.

Inputs are `.npy`, `.npz` and `.safetensors` files, or directories of them (walked in sorted
order). A file holds one latent (rank 3, e.g. (C, h, w) in NCHW) or a batch (rank 4); an
`.npz` or `.safetensors` file holds one or more such arrays under names.

Output names are derived from input names, so they are stable from run to run:
    x.npy           one latent        -> x
    x.npy           a batch of 12     -> x-00 ... x-11
    x.npz / x.safetensors, array "a"  -> x-a, or x-a-00 ... for a batch
    DIR/sub/x.npy                     -> sub/x   (a directory's tree is mirrored)

Every file is treated as possibly hostile. Listing reads headers only and refuses, as a
listed failure of that input:
  - anything but a regular file (a FIFO would block forever, /dev/zero never ends);
  - an array name that is not one plain file name ('/../x', 'a\\b', '..', NUL, ...), since
    it becomes part of an output path;
  - a header that declares more data than the file holds (a 384-byte file claiming
    (1, 4, 100000, 100000)), checked before any data is read;
  - a latent whose image would exceed `max_pixels` (the job would compile a program far
    too large for any device).
`LatentReader` then reads one latent (one row of a batch) at a time, so a batch file of any
length never sits in memory whole.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import zipfile
from typing import BinaryIO, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from jaxconsdec import layout as layouts
from jaxconsdec.convert import safetensors_file
from jaxconsdec.files import TMP_PREFIX, open_regular, path_component_problem
from jaxconsdec.inputs.listing import (DEFAULT_MAX_PIXELS, Failure, Listing, drop_name_clashes,
                                       files, unreadable)
from jaxconsdec.config import CONSISTENCY_DECODER, UNetConfig
from jaxconsdec.sampler import UPSAMPLE, channels_message

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
  def group(self) -> tuple[int, int]:
    """Latents of one size share a compiled program."""
    return self.hw

  @property
  def where(self) -> str:
    """A human-readable location: file, array name and row."""
    out = self.path + (f"[{self.array!r}]" if self.array is not None else "")
    return out + (f"[{self.row}]" if self.row is not None else "")


class DeclaredSizeError(ValueError):
  """A header declares more data than the file holds."""


# What a broken, hostile or changed latent file raises while it is parsed or read (zip and
# npy headers, safetensors JSON); anything else is a bug, and surfaces as one.
LATENT_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, struct.error,
                 DeclaredSizeError)


@dataclasses.dataclass(frozen=True)
class ArrayHeader:
  """An array in a latent file as its header declares it (sizes checked against the file)."""
  name: str                  # "" for .npy
  shape: tuple[int, ...]
  dtype: np.dtype
  offset: int                # where the data starts, in the file or in its .npz member
  fortran: bool              # column-major data (np.save of a transposed array)


def list_latents(inputs: Sequence[str], *, layout: str,
                 config: UNetConfig = CONSISTENCY_DECODER,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 exclude: Sequence[str] = ()) -> Listing:
  """Every latent the inputs hold, in a stable order, and every input that holds none.

  config: the decoder, which fixes the latent channel count and the size images must divide
    by (its downsampling factor).
  max_pixels: the largest image (8h * 8w pixels) accepted; None for no limit.
  exclude: folders never walked into (the job's own OUT_DIR, when it lies inside an input).
  """
  layouts.check_layout(layout)
  listing = Listing([], [])
  for path, name in files(inputs, EXTENSIONS, "a latent file", listing, exclude):
    try:
      arrays = read_headers(path)
    except LATENT_ERRORS as e:  # a parse error of a user's file is that file's failure
      listing.failures.append(Failure(path, unreadable(path, e, DeclaredSizeError)))
      continue
    if not arrays:
      listing.failures.append(Failure(path, "holds no arrays"))
    single_array = path.endswith(".npy")
    for header in arrays:
      where = path + ("" if single_array else f"[{header.name!r}]")
      problem = (None if single_array else _array_name_problem(header.name)) or _check_shape(
          header, layout, config, max_pixels)
      if problem:
        listing.failures.append(Failure(where, problem))
        continue
      stem = name if single_array else f"{name}-{header.name}"
      if os.path.basename(stem).startswith(TMP_PREFIX):
        listing.failures.append(Failure(where, f"output names starting with {TMP_PREFIX!r} are"
                                               " reserved for the job's temporary files"))
        continue
      array = None if single_array else header.name
      hw = _hw(header.shape[-3:], layout)
      if len(header.shape) == 3:
        listing.items.append(LatentItem(path, array, None, stem, hw))
      else:
        width = len(str(header.shape[0] - 1))
        listing.items += [LatentItem(path, array, i, f"{stem}-{i:0{width}d}", hw)
                          for i in range(header.shape[0])]
  listing.items = drop_name_clashes(listing.items, listing.failures)
  return listing


def read_headers(path: str) -> list[ArrayHeader]:
  """The arrays in a latent file, from headers only; every declared size is compared with
  the bytes on disk. Raises (OSError, ValueError, ...) on a file that is not what it says."""
  with open_regular(path) as f:
    return _headers(f, path)


def _headers(f: BinaryIO, path: str) -> list[ArrayHeader]:
  if path.endswith(".npz"):
    with zipfile.ZipFile(f) as z:
      return [_npz_member_header(z, info) for info in z.infolist()
              if info.filename.endswith(".npy")]
  if path.endswith(".safetensors"):
    return [ArrayHeader(name, e.shape, e.dtype if e.dtype is not None else np.dtype("O"),
                        e.offset, False)
            for name, e in safetensors_file.read_header(f).items()]
  return [_npy_header(f, "", os.fstat(f.fileno()).st_size)]


def _npz_member_header(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> ArrayHeader:
  with z.open(info) as member:  # reads stop at the size the member declares
    return _npy_header(member, info.filename[:-len(".npy")], info.file_size)


def _npy_header(f: BinaryIO, name: str, size: int) -> ArrayHeader:
  """The header of an .npy stream whose total size is `size` bytes."""
  version = np.lib.format.read_magic(f)
  read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                 else np.lib.format.read_array_header_2_0)
  shape, fortran, dtype = read_header(f)
  header = ArrayHeader(name, tuple(shape), np.dtype(dtype), f.tell(), bool(fortran))
  need = _nbytes(header.shape, header.dtype)
  if header.offset + need > size:
    raise DeclaredSizeError(f"the header declares shape {header.shape} of {header.dtype} ({need:,}"
                     f" bytes of data) but only {max(size - header.offset, 0):,} bytes follow it")
  return header


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
  return int(np.prod(shape, dtype=object)) * dtype.itemsize


def _array_name_problem(name: str) -> Optional[str]:
  problem = path_component_problem(name)
  if problem:
    return f"array name {name!r} cannot be part of an output name: {problem}"
  return None


def _check_shape(header: ArrayHeader, layout: str, config: UNetConfig,
                 max_pixels: Optional[int]) -> Optional[str]:
  size_multiple, channels = config.downsample_factor, config.latent_channels
  shape, dtype = header.shape, header.dtype
  c = channels
  want = f"({c}, h, w) or (B, {c}, h, w)" if layout == "NCHW" else f"(h, w, {c}) or (B, h, w, {c})"
  if len(shape) not in (3, 4):
    return f"shape {shape} has rank {len(shape)}; a latent file holds {want} ({layout})"
  if not jnp.issubdtype(dtype, jnp.floating):  # float16/32/64 and bfloat16 (ml_dtypes)
    return f"dtype {dtype}; latents must be floats"
  caxis = layouts.channel_axis(layout) - 1
  if shape[-3:][caxis] != config.latent_channels:
    other = "NHWC" if layout == "NCHW" else "NCHW"
    return f"shape {shape}: " + channels_message(
        shape[-3:][caxis], config, layout, shape[-3:][layouts.channel_axis(other) - 1])
  if 0 in shape:
    return f"shape {shape} is empty"
  if header.fortran and len(shape) == 4 and header.name:
    return ("a Fortran-ordered (column-major) batch inside an archive, whose rows are not"
            " stored one after another; save it with np.ascontiguousarray(x)")
  h, w = _hw(shape[-3:], layout)
  if max_pixels is not None and (UPSAMPLE * h) * (UPSAMPLE * w) > max_pixels:
    return (f"latent size {h}x{w} gives a {UPSAMPLE * h}x{UPSAMPLE * w} image,"
            f" {UPSAMPLE * h * UPSAMPLE * w / 1e6:.1f} megapixels, above the limit of"
            f" {max_pixels / 1e6:.1f} (--max-pixels {max_pixels}); raise it if your devices"
            " have the memory")
  if (UPSAMPLE * h) % size_multiple or (UPSAMPLE * w) % size_multiple:
    return (f"latent size {h}x{w} gives a {UPSAMPLE * h}x{UPSAMPLE * w} image, which does not"
            f" divide by the UNet's downsampling factor {size_multiple}")
  return None


def _hw(shape3, layout) -> tuple[int, int]:
  return (shape3[1], shape3[2]) if layout == "NCHW" else (shape3[0], shape3[1])


class LatentReader:
  """Reads latents one at a time, keeping the last array's file open (rows of a batch are
  read in order, so a batch file is opened once per global batch, not once per row, and
  only one row is ever in memory)."""
  errors = LATENT_ERRORS  # what a bad file raises: that input's failure, not a bug

  def __init__(self):
    self._key, self._open = None, None

  def read(self, item: LatentItem) -> np.ndarray:
    """The latent as float32, (4, h, w) or (h, w, 4) as stored. Raises on a bad file,
    including one that changed since it was listed."""
    stream, header = self._array(item.path, item.array)
    rank = len(header.shape)
    if (item.row is None) != (rank == 3) or (item.row is not None and item.row >= header.shape[0]):
      raise ValueError(f"the file changed since it was listed: now of shape {header.shape}")
    if header.fortran and rank == 4:  # a column-major .npy batch: a row is spread over the
      # whole file, so it is read through a read-only map of the file (pages the kernel can
      # drop), never by loading the array
      whole = np.memmap(stream, header.dtype, "r", header.offset, header.shape, order="F")
      return np.array(whole[item.row], np.float32)
    shape = header.shape if item.row is None else header.shape[1:]
    count = int(np.prod(shape))
    stream.seek(header.offset + (item.row or 0) * count * header.dtype.itemsize)
    data = stream.read(count * header.dtype.itemsize)
    if len(data) != count * header.dtype.itemsize:
      raise ValueError("the data ends early (the file was truncated after listing)")
    array = np.frombuffer(data, header.dtype).reshape(shape, order="F" if header.fortran else "C")
    return array.astype(np.float32)

  def _array(self, path: str, name: Optional[str]) -> tuple[BinaryIO, ArrayHeader]:
    if self._key != (path, name):
      self.close()
      file = open_regular(path)
      try:
        if path.endswith(".npz"):
          archive = zipfile.ZipFile(file)
          info = archive.getinfo(name + ".npy")
          header = _npz_member_header(archive, info)
          stream = archive.open(info)
          self._open = (stream, archive, file)
        else:
          header = next(h for h in _headers(file, path) if h.name == (name or ""))
          stream = file
          self._open = (file,)
      except BaseException:
        file.close()
        raise
      self._key, self._header, self._stream = (path, name), header, stream
    return self._stream, self._header

  def close(self) -> None:
    for handle in self._open or ():
      handle.close()
    self._key, self._open = None, None

