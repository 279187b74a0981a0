"""`jaxconsdec encode`: image files in (`image_files`), one latent file per image out, through
the SD VAE's encoder on every device (`ShardedEncoder`). The engine does the rest.

Outputs are raw latents, (C, h, w) float32, what `jaxconsdec decode` reads: `x.png` gives
`x.npy` (or `x.safetensors`, one tensor "latent", with the image's size, original size and
fit in its metadata). The posterior's mean by default; `sample=True` draws a sample per image
with the noise scheme of the decode job (a 64-bit hash of the output name and the seed).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from jaxconsdec.convert import safetensors_file
from jaxconsdec.files import open_regular
from jaxconsdec.jobs import engine
from jaxconsdec.inputs.image_files import ImageReader, list_images
from jaxconsdec.inputs.listing import DEFAULT_MAX_PIXELS
from jaxconsdec.jobs.latent_files import read_headers
from jaxconsdec.sharded import ShardedEncoder

FORMATS = ("npy", "safetensors")
TENSOR = "latent"  # the tensor's name in a .safetensors output


@dataclasses.dataclass(frozen=True)
class EncodeSettings:
  """What decides the outputs' values; a re-run into the same OUT_DIR must match it."""
  vae: str                    # identity of the VAE weights, by content (checkpoint.identity)
  sample: bool
  seed: int
  format: str = "npy"
  fit: str = "refuse"
  noise_scheme: int = engine.NOISE_SCHEME


class EncodeJob(engine.Job):
  what = "image"

  def __init__(self, encoder: ShardedEncoder, settings: EncodeSettings,
               max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
    if settings.format not in FORMATS:
      raise ValueError(f"format must be one of {FORMATS}, got {settings.format!r}")
    self.program, self.config = encoder, encoder.config
    self.job_settings, self.max_pixels = settings, max_pixels
    self.extension = settings.format

  def settings(self) -> dict:
    return {"job": "encode", **dataclasses.asdict(self.job_settings)}

  def list(self, inputs, exclude):
    return list_images(inputs, multiple=self.config.downsample_factor,
                       fit=self.job_settings.fit, max_pixels=self.max_pixels, exclude=exclude)

  def example_shape(self, hw) -> tuple[int, ...]:
    return (*hw, self.config.in_channels)

  def reader(self):
    return ImageReader()

  def keys(self, names):
    return engine.example_keys_for(names, self.job_settings.seed)

  def _latent_shape(self, item) -> tuple[int, int, int]:
    f = self.config.downsample_factor
    return (self.config.latent_channels, item.hw[0] // f, item.hw[1] // f)

  def output_complete(self, path: str, item) -> bool:
    if self.extension == "npy":
      [header] = read_headers(path)  # checks the header's size against the file's
      return (header.shape == self._latent_shape(item) and header.dtype == np.float32
              and not header.fortran)
    with open_regular(path) as f:
      entry = safetensors_file.read_header(f).get(TENSOR)
    return entry is not None and entry.shape == self._latent_shape(item) and (
        entry.dtype == np.float32)

  def encode_output(self, item, latent: np.ndarray) -> bytes:
    if self.extension == "npy":
      return engine.npy_bytes(latent)
    metadata = {"image_size": "x".join(map(str, item.hw)),
                "original_size": "x".join(map(str, item.original)), "fit": item.fit,
                "latents": "raw"}
    return safetensors_file.to_bytes({TENSOR: latent.astype(np.float32)}, metadata)
