"""Images out of the decoder: [-1, 1] floats -> uint8 pixels -> PNG files."""

from __future__ import annotations

import os
import struct
import tempfile
import zlib

import jax.numpy as jnp
import numpy as np


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
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
          + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))


TMP_PREFIX = ".jaxconsdec-tmp-"  # what a killed writer can leave behind; safe to delete


def write_atomic(path: str, data: bytes) -> None:
  """Writes to a temporary file beside `path`, then renames: never a half-written file."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def save_png(path: str, image_hwc) -> None:
  """One [-1, 1] (H, W, 3) image -> PNG file at `path`, written atomically."""
  write_atomic(path, encode_png(np.asarray(to_uint8(image_hwc))))
