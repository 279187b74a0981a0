"""Images out of the decoder: [-1, 1] floats -> uint8 pixels -> PNG files."""

from __future__ import annotations

import os
import struct
import zlib

import jax.numpy as jnp
import numpy as np

from jaxconsdec.files import open_regular, write_atomic


def to_uint8(images):
  """[-1, 1] images -> uint8 pixels, as the original does: `((x + 1) * 127.5)`, clipped to
  [0, 255], then truncated (not rounded) by the integer cast. Any layout; shape unchanged.
  Runs inside a caller's `jax.jit`; a numpy array stays on the host (numpy in, numpy out)."""
  xp = np if isinstance(images, np.ndarray) else jnp
  x = xp.asarray(images, dtype=xp.float32)
  return xp.clip((x + 1.0) * 127.5, 0, 255).astype(xp.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
  """(H, W, 3) uint8 -> PNG bytes (8-bit RGB, no filtering). Needs nothing beyond zlib."""
  pixels = np.ascontiguousarray(pixels)
  if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
    raise ValueError(f"encode_png takes (H, W, 3) uint8, got {pixels.shape} {pixels.dtype}")
  h, w, _ = pixels.shape
  raw = np.concatenate([np.zeros((h, 1), np.uint8), pixels.reshape(h, w * 3)], axis=1)

  def chunk(tag: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + tag + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

  header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
  return (_PNG_SIGNATURE + chunk(b"IHDR", header)
          + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND") & 0xFFFFFFFF)


def png_is_complete(path: str, width: int, height: int) -> bool:
  """Whether `path` is a PNG of this size that was written to the end (signature, IHDR with
  the size, and the IEND chunk last). Cheap: reads 33 bytes at the start and 12 at the end.
  After a crash a renamed but unflushed file can be empty or cut short; it fails this."""
  try:
    with open_regular(path) as f:
      head = f.read(33)
      size = os.fstat(f.fileno()).st_size
      if size < 33 + len(_PNG_END):
        return False
      f.seek(size - len(_PNG_END))
      tail = f.read(len(_PNG_END))
  except OSError:
    return False
  return (head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR"
          and struct.unpack(">II", head[16:24]) == (width, height) and tail == _PNG_END)


def save_png(path: str, image_hwc) -> None:
  """One [-1, 1] (H, W, 3) image -> PNG file at `path`, written atomically."""
  write_atomic(path, encode_png(np.asarray(to_uint8(image_hwc))))
