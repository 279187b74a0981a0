"""`jaxconsdec eval`: how well the SD VAE's own (GAN) decoder and the Consistency Decoder
reconstruct a set of images, side by side, as OpenAI's README shows them.

Each image is encoded (the posterior mean), decoded by the VAE's decoder (when the VAE holds
one) and by the Consistency Decoder at each schedule asked for, and compared with the image
the VAE saw: PSNR and SSIM (`metrics`, scikit-image's definitions) on 8-bit pixels, and the
time of each decode (compiled ahead, so compile time is not counted). The report folder gets
`report.json`, `report.md` (a table per image and the means) and `grids/NAME.png`: original |
SD decoder | Consistency Decoder at each schedule.

One process, the default device; images one at a time (a report, not a pod job).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np

from jaxconsdec.autoencoder import encode, vae_decode
from jaxconsdec.config import UNetConfig, VAEConfig
from jaxconsdec.files import contents, make_dirs_inside, read_json_object, write_atomic
from jaxconsdec.images import encode_png, side_by_side, to_uint8
from jaxconsdec.jobs.engine import JobMismatchError, example_keys_for
from jaxconsdec.inputs.image_files import IMAGE_ERRORS, list_images, read_pixels
from jaxconsdec.inputs.listing import Failure
from jaxconsdec.inputs.listing import DEFAULT_MAX_PIXELS
from jaxconsdec.metrics import SCORES, blur_baseline
from jaxconsdec.sampler import decode
from jaxconsdec.xla_options import compiler_options

SD_DECODER = "SD VAE decoder"


MARKER = "jaxconsdec-eval.json"  # what makes a folder a report of ours, to update
MARKER_CONTENT = {"written_by": "jaxconsdec eval"}


def check_out_dir(out_dir: str) -> None:
  """A report goes into a new or empty folder, or one that holds a report `eval` wrote
  (its marker file); anything else is the user's and is refused before any work."""
  if not os.path.lexists(out_dir):
    return
  if os.path.islink(out_dir) or not os.path.isdir(out_dir):
    raise JobMismatchError(f"-o {out_dir} exists and is not a folder")
  if not os.listdir(out_dir):
    return
  try:
    if read_json_object(os.path.join(out_dir, MARKER), 4096) == MARKER_CONTENT:
      return
    reason = f"its {MARKER} is not eval's"
  except (OSError, ValueError) as e:
    reason = f"no readable {MARKER} ({e.strerror if isinstance(e, OSError) else e})"
  raise JobMismatchError(
      f"-o {out_dir} is a folder of something else ({reason}); it holds {contents(out_dir)}."
      " eval writes into a new or empty folder, or updates a report it wrote: choose another"
      " -o. Nothing was changed.")


# The bar every decoder must clear: the picture average-pooled onto the latent grid and
# upsampled bicubically. It is scored beside the decoders (not timed, not in the grids).
BLUR = "blur baseline (8x8 means, bicubic)"


def decoder_name(schedule: Sequence[float]) -> str:
  steps = len(schedule)
  return f"Consistency Decoder, {steps} step{'s' if steps > 1 else ''}"


@dataclasses.dataclass
class Evaluation:
  decoders: list[str]
  rows: list[dict]            # per image: image, size, each metric (per decoder and BLUR),
                              # seconds (per decoder)
  failures: list              # inputs.Failure
  means: dict                 # each metric and seconds: per decoder (metrics: and BLUR)


def evaluate(images: Sequence[str], out_dir: str, *, params, config: UNetConfig, vae_params,
             vae_config: VAEConfig, vae_halves: Sequence[str],
             schedules: Sequence[Sequence[float]] = ((1.0,), (1.0, 0.5)), seed: int = 0,
             fit: str = "refuse", max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
             progress: bool = True) -> Evaluation:
  """Evaluates every image of `images` and writes the report into `out_dir` (a line per
  image on stderr with `progress`). `out_dir` must be new, empty, or an earlier report
  (`check_out_dir`)."""
  check_out_dir(out_dir)
  listing = list_images(images, multiple=vae_config.downsample_factor, fit=fit,
                        max_pixels=max_pixels, exclude=[out_dir])
  decoders = ([SD_DECODER] if "decoder" in vae_halves else []) + [
      decoder_name(s) for s in schedules]
  programs = _Programs(params, config, vae_params, vae_config, vae_halves, schedules)
  os.makedirs(out_dir, exist_ok=True)
  write_atomic(os.path.join(out_dir, MARKER), json.dumps(MARKER_CONTENT).encode())
  rows, failures = [], list(listing.failures)
  for n, item in enumerate(listing.items, 1):
    try:
      pixels = read_pixels(item)
    except IMAGE_ERRORS as e:  # changed or broken since it was listed
      failures.append(Failure(item.where, f"unreadable ({type(e).__name__}: {e})"))
      continue
    key = example_keys_for([item.name], seed)
    outputs, seconds = programs.run(pixels, key)
    region = _compared_region(item)
    original = pixels[region]
    row = {"image": item.path, "name": item.name, "size": list(item.hw),
           "original_size": list(item.original), "fit": item.fit,
           **{metric: {} for metric in SCORES}, "seconds": seconds}
    for name, image in {BLUR: blur_baseline(pixels), **outputs}.items():
      for metric, score in SCORES.items():
        row[metric][name] = float(score(original, image[region]))
    grid = os.path.join(make_dirs_inside(out_dir, os.path.join("grids",
                                                               os.path.dirname(item.name))),
                        os.path.basename(item.name) + ".png")
    write_atomic(grid, encode_png(side_by_side(pixels, outputs)))
    row["grid"] = os.path.relpath(grid, out_dir)
    rows.append(row)
    if progress:
      print(f"[{n}/{len(listing.items)}] {item.path}: " + ", ".join(
          f"{k} {row['psnr'][k]:.2f} dB" for k in decoders), file=sys.stderr)
  means = {metric: {d: statistics.fmean(r[metric][d] for r in rows) for d in [BLUR, *decoders]}
           for metric in SCORES} if rows else {}
  if rows:
    means["seconds"] = {d: statistics.fmean(r["seconds"][d] for r in rows) for d in decoders}
  evaluation = Evaluation(decoders, rows, failures, means)
  _write_report(out_dir, evaluation, dict(schedules=[list(s) for s in schedules], seed=seed,
                                          fit=fit, vae_halves=list(vae_halves)))
  return evaluation


class _Programs:
  """Each decoder as a program compiled once per image size, so its time excludes compiling."""

  def __init__(self, params, config, vae_params, vae_config, vae_halves, schedules):
    self.params, self.config, self.schedules = params, config, schedules
    self.vae_params, self.vae_config, self.vae_halves = vae_params, vae_config, vae_halves
    self._compiled = {}

  def _compile(self, name, fn, *args):
    key = (name,) + tuple(a.shape for a in args if hasattr(a, "shape"))
    if key not in self._compiled:
      self._compiled[key] = jax.jit(fn, compiler_options=compiler_options()).lower(
          *args).compile()
    return self._compiled[key]

  def run(self, pixels: np.ndarray, key) -> tuple[dict, dict]:
    """-> ({decoder: (H, W, 3) uint8}, {decoder: seconds})."""
    vae_cfg, cfg = self.vae_config, self.config
    batch = pixels[None]
    encoder = self._compile("encode", lambda p, x: encode(p, x, config=vae_cfg, layout="NHWC"),
                            self.vae_params, batch)
    latents = encoder(self.vae_params, batch)
    outputs, seconds = {}, {}
    if "decoder" in self.vae_halves:
      fn = self._compile(SD_DECODER, lambda p, z: vae_decode(p, z, config=vae_cfg,
                                                             layout="NHWC"),
                         self.vae_params, latents)
      outputs[SD_DECODER], seconds[SD_DECODER] = _timed(fn, self.vae_params, latents)
    for schedule in self.schedules:
      name = decoder_name(schedule)
      fn = self._compile(name, lambda p, z, k, s=tuple(schedule): decode(
          p, z, k, config=cfg, schedule=s, layout="NHWC"), self.params, latents, key)
      outputs[name], seconds[name] = _timed(fn, self.params, latents, key)
    return outputs, seconds


def _timed(compiled, *args) -> tuple[np.ndarray, float]:
  start = time.perf_counter()
  images = compiled(*args).block_until_ready()
  seconds = time.perf_counter() - start
  return np.asarray(to_uint8(images))[0], seconds


def _compared_region(item) -> tuple[slice, slice]:
  """The pixels that are the image's own: all of a cropped image, the original part of a
  padded one."""
  if item.fit == "pad":
    return slice(0, item.original[0]), slice(0, item.original[1])
  return slice(None), slice(None)


def _write_report(out_dir: str, evaluation: Evaluation, settings: dict) -> None:
  report = {"settings": settings, "decoders": evaluation.decoders, "baseline": BLUR,
            "images": evaluation.rows,
            "mean": evaluation.means, "failures": [f.to_json() for f in evaluation.failures]}
  write_atomic(os.path.join(out_dir, "report.json"), json.dumps(report, indent=2).encode())
  write_atomic(os.path.join(out_dir, "report.md"), markdown(evaluation).encode())


def markdown(evaluation: Evaluation) -> str:
  """The report as markdown: PSNR (dB) / SSIM per image and decoder (the blur baseline
  first), and the means; the means of every metric; the decoders' times."""
  d = [BLUR, *evaluation.decoders]
  lines = ["| image | " + " | ".join(f"{name}: PSNR dB / SSIM" for name in d) + " |",
           "|---|" + "---|" * len(d)]
  for row in evaluation.rows:
    lines.append(f"| {row['name']} | " + " | ".join(
        f"{row['psnr'][n]:.2f} / {row['ssim'][n]:.4f}" for n in d) + " |")
  if evaluation.rows:
    m = evaluation.means
    lines.append("| **mean** | " + " | ".join(
        f"**{m['psnr'][n]:.2f} / {m['ssim'][n]:.4f}**" for n in d) + " |")
    lines += ["", "| decoder (means) | PSNR dB | SSIM | colour PSNR dB (8x8 means) |"
              " detail ratio (1 = the original's) |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {m['psnr'][n]:.2f} | {m['ssim'][n]:.4f} | {m['colour_psnr'][n]:.2f} |"
              f" {m['detail_ratio'][n]:.3f} |" for n in d]
    lines += ["", "| decoder | seconds per image (compiled, median of images) |", "|---|---|"]
    lines += [f"| {n} | {statistics.median(r['seconds'][n] for r in evaluation.rows):.3f} |"
              for n in evaluation.decoders]
  if evaluation.failures:
    lines += ["", f"{len(evaluation.failures)} image(s) not evaluated:"]
    lines += [f"- {f.input}: {f.reason}" for f in evaluation.failures]
  return "\n".join(lines) + "\n"
