"""`jaxconsdec decode`: latent files in (`latent_files`), one image file per latent out, through
the Consistency Decoder on every device (`ShardedDecoder`). The engine does the rest."""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional

import numpy as np

from jaxconsdec.images import encode_png, png_is_complete, to_uint8
from jaxconsdec.jobs import engine
from jaxconsdec.inputs.listing import DEFAULT_MAX_PIXELS
from jaxconsdec.jobs.latent_files import (LatentReader, list_latents,
                                          read_headers)
from jaxconsdec.sampler import UPSAMPLE
from jaxconsdec.sharded import ShardedDecoder

FORMATS = ("png", "npy")


@dataclasses.dataclass(frozen=True)
class JobSettings:
  """What decides the outputs' values; a re-run into the same OUT_DIR must match it."""
  weights: str                # identity of the weights, by content (checkpoint.identity)
  seed: int
  schedule: tuple[float, ...]
  scaled_latents: bool
  format: str = "png"
  layout: str = "NCHW"
  noise_scheme: int = engine.NOISE_SCHEME


class DecodeJob(engine.Job):
  what = "latent"
  nonfinite = "the latent holds NaN or inf values"

  def __init__(self, decoder: ShardedDecoder, settings: JobSettings,
               max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
    if settings.format not in FORMATS:
      raise ValueError(f"format must be one of {FORMATS}, got {settings.format!r}")
    self.program, self.config = decoder, decoder.config
    self.job_settings, self.max_pixels = settings, max_pixels
    self.extension = settings.format

  def settings(self) -> dict:
    out = {"job": "decode", **dataclasses.asdict(self.job_settings)}
    out["schedule"] = list(self.job_settings.schedule)
    return out

  def list(self, inputs, exclude):
    return list_latents(inputs, layout=self.job_settings.layout, config=self.config,
                        max_pixels=self.max_pixels, exclude=exclude)

  def example_shape(self, hw) -> tuple[int, ...]:
    c = self.config.latent_channels
    return (c, *hw) if self.job_settings.layout == "NCHW" else (*hw, c)

  def reader(self):
    return _ScaledLatents(LatentReader(), self.config if self.job_settings.scaled_latents
                          else None)

  def keys(self, names):
    return engine.example_keys_for(names, self.job_settings.seed)

  def check_first(self, latents: np.ndarray) -> None:
    warn_if_scale_looks_wrong(latents, self.job_settings.scaled_latents, self.config)

  def output_complete(self, path: str, item) -> bool:
    h, w = UPSAMPLE * item.hw[0], UPSAMPLE * item.hw[1]
    if self.extension == "png":
      return png_is_complete(path, w, h)
    want = (3, h, w) if self.job_settings.layout == "NCHW" else (h, w, 3)
    [header] = read_headers(path)  # checks the header's size against the file's
    return header.shape == want and header.dtype == np.float32 and not header.fortran

  def encode_output(self, item, image: np.ndarray) -> bytes:
    if self.extension == "png":
      hwc = image.transpose(1, 2, 0) if self.job_settings.layout == "NCHW" else image
      return encode_png(to_uint8(hwc))
    return engine.npy_bytes(image)


class _ScaledLatents:
  """Reads latents; pipeline latents (--scaled-latents) become raw: / scaling + shift."""
  errors = LatentReader.errors

  def __init__(self, reader: LatentReader, config):
    self.inner, self.config = reader, config

  def read(self, item) -> np.ndarray:
    latent = self.inner.read(item)
    if self.config is None:
      return latent
    return latent / self.config.scaling_factor + self.config.shift_factor

  def close(self) -> None:
    self.inner.close()


def warn_if_scale_looks_wrong(latents: np.ndarray, scaled: bool, config) -> None:
  """Passing pipeline latents for raw ones (or the reverse) is the most common mistake, and
  gives washed-out or burnt images. Raw latents spread like the decoder's statistics divided
  by the scaling factor (SD 1.x: std near 5.5); pipeline latents near 1."""
  finite = latents[np.isfinite(latents)]
  if finite.size < 64:
    return
  expected = float(np.sqrt(np.mean(np.square(config.latent_std) + np.square(config.latent_mean)))
                   / config.scaling_factor)
  std = float(finite.std())
  if std < expected / 2.2:
    advice = ("--scaled-latents may be dividing raw latents a second time" if scaled else
              "if they are pipeline latents (before / vae.config.scaling_factor), pass"
              " --scaled-latents")
  elif std > expected * 2.7:
    advice = ("if they are raw latents, drop --scaled-latents" if scaled else
              "are they in another unit?")
  else:
    return
  print(f"WARNING: the latents have std {std:.2f} as the decoder sees them, raw latents of"
        f" its latent space about {expected:.1f}: {advice}", file=sys.stderr)
