"""Training images: which files, and the crop each example of each step sees.

The loader is a pure function of (seed, global example index), not an iterator with hidden
state: example g of the run is file `permutation(seed, epoch)[g % N]` of the N usable images
(epoch = g // N), cropped at an offset and flipped as `numpy.random.default_rng((seed, g))`
says. So its checkpointable state is one integer (the next example index, i.e. step x batch
size); a resumed run, or one on another number of devices or hosts, sees exactly the same
crops; and each process reads only the rows of the global batch it feeds. (grain's
`MapDataset` offers the same index-based design; for file lists of this size it would add a
dependency and worker threads without doing more.)

Images are PNG/JPEG files or folders of them, as for `jaxconsdec encode`; one smaller than
the crop on either side, or unreadable, is a listed failure and the run goes on without it.
A file that lists well but fails to decode when first read (a truncated JPEG) is left out
from then on: an example whose image it is takes the next readable image of its epoch's
order instead. That choice depends only on which files are unreadable, which they are on
every read, so an uninterrupted run and a resumed one still see the same crops.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import functools
import sys
from typing import Sequence

import numpy as np
from PIL import Image

from jaxconsdec.inputs.image_files import ImageItem, list_images, read_pixels
from jaxconsdec.inputs.listing import Failure, Listing

SEED_STREAM_ORDER, SEED_STREAM_CROP = 0, 1  # numpy seed streams: file order, crop and flip


def list_training_images(inputs: Sequence[str], resolution: int,
                         max_pixels: int) -> Listing:
  """Usable images (at least `resolution` on both sides) and failures, in a stable order."""
  listing = list_images(inputs, multiple=1, fit="refuse", max_pixels=max_pixels)
  usable = []
  for item in listing.items:
    if min(item.original) < resolution:
      h, w = item.original
      listing.failures.append(Failure(item.path, f"{h}x{w} is smaller than the {resolution}x"
                                                 f"{resolution} training crops (--resolution)"))
    else:
      usable.append(item)
  listing.items = usable
  return listing


# A failed read that is the machine's, not the file's: it stops the run (exit 3, resumable).
_ENVIRONMENT_ERRNOS = (errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.ESTALE)


class NoReadableImagesError(ValueError):
  """Every training image failed to decode."""


# Decoded images kept between crops: bounded in bytes, not in images, since one image at the
# pixel limit (4096x4096) takes 48 MiB and a count bound would hold up to ~13 GB.
CACHE_BYTES = 1 << 30


class _ImageCache:
  """The most recently used decoded images, at most `limit` bytes of them (the newest one is
  kept whatever its size)."""

  def __init__(self, read, limit: int):
    self._read, self.limit = read, limit
    self._images: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self.nbytes = 0

  def __call__(self, index: int) -> np.ndarray:
    if index in self._images:
      self._images.move_to_end(index)
      return self._images[index]
    image = self._read(index)
    self._images[index] = image
    self.nbytes += image.nbytes
    while self.nbytes > self.limit and len(self._images) > 1:
      self.nbytes -= self._images.popitem(last=False)[1].nbytes
    return image


class TrainingCrops:
  """The crops of a run: `rows(first, count)` -> (count, R, R, 3) uint8. `failures` lists
  the images left out because they failed to decode when read."""

  def __init__(self, items: Sequence[ImageItem], resolution: int, seed: int, flip: bool = True,
               cache_bytes: int = CACHE_BYTES, log=sys.stderr):
    if not items:
      raise ValueError("no usable training images")
    self.items = list(items)
    self.resolution = resolution
    self.seed = seed
    self.flip = flip
    self.failures: list[Failure] = []
    self._unreadable: set[int] = set()
    self._log = log
    self._pixels = _ImageCache(lambda index: read_pixels(self.items[index]), cache_bytes)

  @property
  def cached_bytes(self) -> int:
    """Host memory the decoded images kept between crops take (at most `cache_bytes`, or
    the one newest image)."""
    return self._pixels.nbytes

  def readable(self, index: int) -> bool:
    """Whether image `index` decodes (it is read, and cached, on the first call)."""
    if index in self._unreadable:
      return False
    try:
      self._pixels(index)
      return True
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS:
        raise
      item = self.items[index]
      reason = f"failed to decode during training, left out ({type(e).__name__}: {e})"
      self._unreadable.add(index)
      self.failures.append(Failure(item.path, reason))
      print(f"LEFT OUT {item.path}: {reason}", file=self._log)
      if len(self._unreadable) == len(self.items):
        raise NoReadableImagesError("every training image failed to decode") from None
      return False

  def pixels(self, index: int) -> np.ndarray:
    """Image `index`, or the first readable one after it (cyclically)."""
    n = len(self.items)
    index = next(i % n for i in range(index, index + n) if self.readable(i % n))
    return self._pixels(index)

  @functools.lru_cache(maxsize=4)
  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng((self.seed, SEED_STREAM_ORDER, epoch)).permutation(len(self.items))

  def source(self, example: int) -> int:
    """Which image example `example` of the run is cropped from: its place in its epoch's
    order, or the next readable image of that order."""
    n = len(self.items)
    order = self._order(example // n)
    return next(int(order[i % n]) for i in range(example % n, example % n + n)
                if self.readable(int(order[i % n])))

  def crop(self, example: int) -> np.ndarray:
    pixels = self._pixels(self.source(example))
    rng = np.random.default_rng((self.seed, SEED_STREAM_CROP, example))
    r = self.resolution
    top = int(rng.integers(0, pixels.shape[0] - r + 1))
    left = int(rng.integers(0, pixels.shape[1] - r + 1))
    out = pixels[top:top + r, left:left + r]
    if self.flip and rng.random() < 0.5:
      out = out[:, ::-1]
    return np.ascontiguousarray(out)

  def rows(self, first: int, count: int) -> np.ndarray:
    return np.stack([self.crop(first + i) for i in range(count)])


class Prefetcher:
  """The rows of steps `start` .. `end` - 1 (`crops.rows(first(step), count)`), made
  `depth` steps ahead on a background thread, so that decoding and cropping run while the
  devices compute (PIL and numpy release the interpreter lock while they work). One thread,
  so images are read, and failures listed, in the same order as without it.

  `rows(step)` returns that step's rows, or raises what making them raised. `close()` waits
  for the thread.
  """

  def __init__(self, crops: TrainingCrops, first, count: int, start: int, end: int,
               depth: int = 2):
    self._make = lambda step: crops.rows(first(step), count)
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxconsdec-crops")
    self._ahead: collections.deque = collections.deque()
    self._next, self._end, self._depth = start, end, max(1, depth)

  def rows(self, step: int) -> np.ndarray:
    while len(self._ahead) < self._depth + 1 and self._next < self._end:
      self._ahead.append((self._next, self._pool.submit(self._make, self._next)))
      self._next += 1
    made, future = self._ahead.popleft() if self._ahead else (None, None)
    if made != step:
      raise ValueError(f"the prefetcher made step {made}, and step {step} was asked for: steps"
                       " are taken in order, one at a time")
    return future.result()

  def close(self) -> None:
    for _, future in self._ahead:
      future.cancel()
    self._pool.shutdown(wait=True)


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
  """The centered size x size square of (H, W, 3) pixels (H, W >= size)."""
  top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
  return pixels[top:top + size, left:left + size]
