"""Training learns: CI-sized runs from scratch (the tests' smallest UNet, 32x32 crops of
scikit-image's photos, the demo model's fitted encoder), scored on a held-out photo.

- A consistency run raises the held-out PSNR of its 1-step decodes by a set margin.
- A denoising run (stage 1 of the demo's recipe) raises their colour fidelity past what a
  picture made without the latents reaches: at this size the consistency run barely uses
  the latents yet, so only this run can tell.

Mutations checked by hand at 100 steps (consistency gain; denoising colour): correct +5.0
dB; 21.9 dB. The teacher at the student's level +0.9 dB; latents that never reach the UNet
14.6 dB. Each fails a test. (At 150 steps, before: +5.2, 21.7; 0.0, 14.6. On the tiny UNet,
before this one: a sign flip in the consistency loss -3.3 dB; an optimiser that never
applies its updates 0.0 dB and 9.1 dB; not rerun here.)"""

import json
import os
import subprocess

from PIL import Image

from hostile import cli_command
from small_models import config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ("rocket", "coffee", "chelsea", "hubble_deep_field", "immunohistochemistry",
         "colorwheel")
HELD_OUT = "astronaut"
STEPS = 100
MARGIN_DB = 3.0   # measured: +5.0 dB (8.74 -> 13.76)
COLOUR_DB = 18.0  # measured: 21.9 dB (9.8 untrained); 14.6 with the latents zeroed


def _photos(folder, names):
  import skimage.data
  os.makedirs(folder, exist_ok=True)
  for name in names:
    pixels = getattr(skimage.data, name)()[..., :3]
    Image.fromarray(pixels).save(os.path.join(folder, f"{name}.png"))
  return folder


def _first_and_last_evals(tmp_path, *flags):
  """Trains STEPS steps from scratch with `flags` and returns the held-out evaluations of
  step 0 and of the last step."""
  train = _photos(str(tmp_path / "train"), TRAIN)
  held = _photos(str(tmp_path / "held"), (HELD_OUT,))
  run = str(tmp_path / "run")
  proc = subprocess.run(cli_command(
      "train", train, "--out", run, "--config", config_file(tmp_path), "--vae",
      os.path.join(ROOT, "samples", "demo", "model"), "--steps", str(STEPS), "--batch-size",
      "8", "--resolution", "32", "--lr", "1e-3", "--warmup", "10", "--ema-decay", "0.9",
      "--eval-every", str(STEPS), "--save-every", str(STEPS), "--log-every", "25",
      "--eval-images", held, "--no-progress", "--compile-cache", str(tmp_path / "xla"),
      *flags), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  evals = {l["step"]: l for l in map(json.loads, open(os.path.join(run, "metrics.jsonl")))
           if l["kind"] == "eval"}
  first, last = evals[0], evals[STEPS]
  print("MEASURED", {k: (round(first[k], 2), round(last[k], 2)) for k in (
      "psnr_1_step", "colour_psnr_1_step", "psnr_blur_baseline")})
  return first, last


def test_a_short_run_raises_held_out_psnr_by_the_margin(tmp_path):
  first, last = _first_and_last_evals(tmp_path)
  gain = last["psnr_1_step"] - first["psnr_1_step"]
  assert gain >= MARGIN_DB, (first["psnr_1_step"], last["psnr_1_step"])


def test_a_short_denoising_run_learns_colour_from_the_latents(tmp_path):
  _, last = _first_and_last_evals(tmp_path, "--objective", "denoising", "--noise-law",
                                  "1.0,2.0")
  assert last["colour_psnr_1_step"] >= COLOUR_DB, last["colour_psnr_1_step"]
