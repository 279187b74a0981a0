"""Images out of the decoder: [-1, 1] floats -> uint8 pixels -> PNG files."""

from __future__ import annotations

import io
import os
import struct
import zlib

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from jaxconsdec.files import open_regular, write_atomic


def to_uint8(images):
  """[-1, 1] images -> uint8 pixels, as the original does: `((x + 1) * 127.5)`, clipped to
  [0, 255], then truncated (not rounded) by the integer cast. Any layout; shape unchanged.
  Runs inside a caller's `jax.jit`; a numpy array stays on the host (numpy in, numpy out)."""
  xp = np if isinstance(images, np.ndarray) else jnp
  x = xp.asarray(images, dtype=xp.float32)
  return xp.clip((x + 1.0) * 127.5, 0, 255).astype(xp.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
  """(H, W, 3) uint8 -> PNG bytes (8-bit RGB).

  Pillow picks a row filter per line (sub, up, average, Paeth): on scikit-image's photos
  the files are 27-32% smaller than with unfiltered rows, on noise the same size
  (`python benchmarks/png_size.py`).
  """
  pixels = np.ascontiguousarray(pixels)
  if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
    raise ValueError(f"encode_png takes (H, W, 3) uint8, got {pixels.shape} {pixels.dtype}")
  buffer = io.BytesIO()
  Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=6)
  return buffer.getvalue()


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


def side_by_side(original: np.ndarray, outputs: dict, gap: int = 8,
                 header: int = 18) -> np.ndarray:
  """original | each output, with their names above them: (H + header, n W + gaps, 3)."""
  panels = [("original", original)] + list(outputs.items())
  h, w, _ = original.shape
  canvas = Image.new("RGB", (len(panels) * w + (len(panels) - 1) * gap, h + header), "white")
  draw = ImageDraw.Draw(canvas)
  for i, (name, image) in enumerate(panels):
    x = i * (w + gap)
    canvas.paste(Image.fromarray(image), (x, header))
    draw.text((x + 2, 3), name.replace("Consistency Decoder", "CD"), fill="black")
  return np.asarray(canvas)
