"""PNG file size: Pillow's per-row filters (what jaxconsdec writes) against unfiltered rows
(what it wrote before), on real photos shipped with scikit-image and on noise (what a
randomly initialised decoder produces). Usage: python benchmarks/png_size.py
"""

import json
import os
import platform
import struct
import zlib

import numpy as np


def unfiltered_png(pixels: np.ndarray) -> bytes:
  """8-bit RGB PNG with filter type 0 on every row, zlib level 6 (the previous encoder)."""
  h, w, _ = pixels.shape
  raw = np.concatenate([np.zeros((h, 1), np.uint8), pixels.reshape(h, w * 3)], axis=1)

  def chunk(tag, data):
    return (struct.pack(">I", len(data)) + tag + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))


def main():
  import skimage.data

  from jaxconsdec.images import encode_png
  images = {name: getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea")}
  images["noise"] = np.random.default_rng(0).integers(0, 256, (512, 512, 3), np.uint8)
  rows = []
  for name, pixels in images.items():
    before, after = len(unfiltered_png(pixels)), len(encode_png(pixels))
    rows.append(dict(image=name, shape=list(pixels.shape), unfiltered_bytes=before,
                     pillow_bytes=after, ratio=after / before))
  print("| image | unfiltered | Pillow (jaxconsdec) | ratio |\n|---|---|---|---|")
  for r in rows:
    print(f"| {r['image']} {r['shape'][1]}x{r['shape'][0]} | {r['unfiltered_bytes']:,} |"
          f" {r['pillow_bytes']:,} | {r['ratio']:.2f} |")
  os.makedirs("benchmarks/results", exist_ok=True)
  with open("benchmarks/results/png_size.json", "w") as f:
    json.dump({"rows": rows, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}, f,
              indent=2)


if __name__ == "__main__":
  main()
