"""Images on disk for `jaxconsdec encode`: which files a job reads, their sizes, and pixels.

PNG and JPEG files (any case of the extension), or folders of them; names mirror the inputs
as for latent files (`inputs.files`). Listing reads headers only (Pillow reads the size without
decoding), so an image above `max_pixels` is refused before its pixels are touched, and only
regular files are opened.

Sizes: the VAE halves the image 3 times, so both sides must divide by 8. Another size is
never resized: `fit="refuse"` (the default) lists it as a failure, "crop" keeps the centered
largest multiple of 8, "pad" extends the bottom and right edges (edge pixels repeated) to the
next multiple. Pixels become RGB: grey and palette images are expanded, alpha is dropped,
and a JPEG's EXIF orientation is applied, so the VAE sees the picture as viewers show it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from jaxconsdec.files import TMP_PREFIX, open_regular
from jaxconsdec.inputs.listing import Failure, Listing, drop_name_clashes, files, unreadable

EXTENSIONS = (".png", ".jpg", ".jpeg")
FITS = ("refuse", "crop", "pad")
# Modes Pillow turns into 8-bit RGB without guessing (16-bit and float images are refused).
_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclasses.dataclass(frozen=True)
class ImageItem:
  path: str
  name: str                  # output name without extension, relative to OUT_DIR
  hw: tuple[int, int]        # the size the VAE sees (after fit)
  original: tuple[int, int]  # the file's size (after EXIF orientation)
  fit: str

  @property
  def group(self) -> tuple[int, int]:
    return self.hw

  @property
  def where(self) -> str:
    return self.path


def list_images(inputs: Sequence[str], *, multiple: int = 8, fit: str = "refuse",
                max_pixels: Optional[int] = None, exclude: Sequence[str] = ()) -> Listing:
  """Every image the inputs hold, in a stable order, and every input refused, with why."""
  if fit not in FITS:
    raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
  listing = Listing([], [])
  for path, name in files(inputs, EXTENSIONS, "an image (PNG or JPEG)", listing, exclude):
    try:
      original = image_size(path)
    except IMAGE_ERRORS as e:
      listing.failures.append(Failure(path, unreadable(path, e)))
      continue
    problem = _size_problem(original, multiple, fit, max_pixels)
    if problem:
      listing.failures.append(Failure(path, problem))
    elif name.split("/")[-1].startswith(TMP_PREFIX):
      listing.failures.append(Failure(path, f"output names starting with {TMP_PREFIX!r} are"
                                            " reserved for the job's temporary files"))
    else:
      listing.items.append(ImageItem(path, name, fitted(original, multiple, fit), original,
                                     fit))
  listing.items = drop_name_clashes(listing.items, listing.failures)
  return listing


# What a broken or foreign image file raises in Pillow (SyntaxError: a broken PNG chunk);
# anything else is a bug, and surfaces as one.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
FORMATS = ("PNG", "JPEG")  # what Pillow may open: never GIF, BMP, EPS (Ghostscript), ...
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# EXIF orientation -> the transposition that shows the image upright (as ImageOps does).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def _open(f) -> Image.Image:
  """A PNG or JPEG image from an open file, header only (no pixels decoded). 16-bit PNGs
  are refused here: Pillow would reduce their RGB to 8 bits without a word."""
  head = f.read(25)
  f.seek(0)
  if head.startswith(_PNG_SIGNATURE) and len(head) == 25 and head[24] == 16:
    raise ValueError("a 16-bit PNG (16-bit or float images are refused): save it as 8-bit RGB")
  try:
    return Image.open(f, formats=FORMATS)
  except Image.UnidentifiedImageError:
    raise ValueError("not a PNG or JPEG image") from None


def _orientation(image: Image.Image) -> int:
  """The EXIF orientation, read without decoding pixels. A PNG's EXIF is taken from the
  chunks before its image data: Pillow's getexif() on a PNG without one decodes the whole
  image to look for it after the data."""
  if image.format == "PNG":
    data = image.info.get("exif")
    if not data:
      return 1
    exif = Image.Exif()
    exif.load(data)
    return exif.get(0x0112, 1)
  return image.getexif().get(0x0112, 1)


def image_size(path: str) -> tuple[int, int]:
  """(height, width) as viewers show the image, from its header (no pixels decoded)."""
  with open_regular(path) as f, _open(f) as image:
    if image.mode not in _MODES:
      raise ValueError(f"pixel mode {image.mode} (16-bit or float): save it as 8-bit RGB")
    w, h = image.size
    if _orientation(image) in _ROTATED:
      w, h = h, w
    return h, w


def fitted(hw: tuple[int, int], multiple: int, fit: str) -> tuple[int, int]:
  if fit == "crop":
    return tuple(s // multiple * multiple for s in hw)
  if fit == "pad":
    return tuple(-(-s // multiple) * multiple for s in hw)
  return tuple(hw)


def _size_problem(hw, multiple, fit, max_pixels) -> Optional[str]:
  h, w = hw
  if max_pixels is not None and h * w > max_pixels:
    return (f"{h}x{w}, {h * w / 1e6:.1f} megapixels, above the limit of {max_pixels / 1e6:.1f}"
            f" (--max-pixels {max_pixels}); raise it if your devices have the memory")
  if fit == "refuse" and (h % multiple or w % multiple):
    return (f"{h}x{w} does not divide by {multiple}: pass --fit crop (keep the centered"
            f" {fitted(hw, multiple, 'crop')}) or --fit pad (to {fitted(hw, multiple, 'pad')});"
            " images are never resized")
  if min(fitted(hw, multiple, fit)) == 0:
    return f"{h}x{w} is smaller than {multiple} pixels on a side"
  return None


def read_pixels(item: ImageItem) -> np.ndarray:
  """(H, W, 3) uint8 pixels of an image, fitted to the item's size."""
  with open_regular(item.path) as f, _open(f) as image:
    if image.mode not in _MODES:
      raise ValueError(f"pixel mode {image.mode}")
    orientation = _orientation(image)
    if orientation in _UPRIGHT:
      image = image.transpose(_UPRIGHT[orientation])
    if image.mode in ("LA", "PA", "P"):
      image = image.convert("RGBA")
    pixels = np.asarray(image.convert("RGB"), np.uint8)
  if pixels.shape[:2] != item.original:
    raise ValueError(f"the image changed since it was listed: now {pixels.shape[:2]}")
  (h, w), (fh, fw) = item.original, item.hw
  if item.fit == "crop":
    top, left = (h - fh) // 2, (w - fw) // 2
    return pixels[top:top + fh, left:left + fw]
  if item.fit == "pad":
    return np.pad(pixels, ((0, fh - h), (0, fw - w), (0, 0)), mode="edge")
  return pixels


class ImageReader:
  """The engine's reader: one image at a time."""
  errors = IMAGE_ERRORS  # what a bad file raises: that input's failure, not a bug

  def read(self, item: ImageItem) -> np.ndarray:
    return read_pixels(item)

  def close(self) -> None:
    pass
