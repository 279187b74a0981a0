"""The demo model's report: held-out PSNR and SSIM of its 1- and 2-step decodes, against the
untrained model it started from, the best linear decoder, and the small VAE's own decoder;
side-by-side grids; the loss curve.

The linear decoder is least squares from each latent pixel's C values (and a constant) to
its 8x8x3 block of pixels, fitted on random crops of the training photos (the same crop size
as training): the best any per-pixel linear map does with these latents.

    python samples/demo/report.py RUN_DIR VAE_CKPT PHOTOS_DIR OUT_DIR [STAGE1_RUN_DIR]

"untrained" is the random initialisation the decoder's training started from (the same
`jcd.random_params(config, seed)` as `jaxconsdec train --config`); with a stage-1 run, its
denoising-only model is reported too.
"""

import glob
import json
import os
import sys

import jax
import numpy as np
from PIL import Image, ImageDraw

import jaxconsdec as jcd
from jaxconsdec.images import side_by_side
from jaxconsdec.metrics import psnr, ssim
from photos import crop_to_multiple_of_8

LINEAR_FIT_CROPS = 2048


def photo(path: str) -> np.ndarray:
  return crop_to_multiple_of_8(np.asarray(Image.open(path).convert("RGB")))


def fit_linear(encoder, vae_config, photos, crop, seed=0):
  rng = np.random.default_rng(seed)
  crops = []
  for _ in range(LINEAR_FIT_CROPS):
    im = photos[rng.integers(len(photos))]
    t, l = rng.integers(0, im.shape[0] - crop + 1), rng.integers(0, im.shape[1] - crop + 1)
    crops.append(im[t:t + crop, l:l + crop])
  x = np.stack(crops)
  lat = np.concatenate([np.asarray(jcd.encode(encoder, x[i:i + 256], config=vae_config,
                                              layout="NHWC")) for i in range(0, len(x), 256)])
  b, h, w, c = lat.shape
  a = np.concatenate([lat.reshape(-1, c), np.ones((b * h * w, 1))], axis=1)
  y = (x / 127.5 - 1).reshape(b, h, 8, w, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b * h * w, -1)
  return np.linalg.lstsq(a, y, rcond=None)[0]


def linear_decode(weights, lat):
  h, w, c = lat.shape
  y = np.concatenate([lat.reshape(-1, c), np.ones((h * w, 1))], axis=1) @ weights
  img = y.reshape(h, w, 8, 8, 3).transpose(0, 2, 1, 3, 4).reshape(8 * h, 8 * w, 3)
  return np.clip(np.round((img + 1) * 127.5), 0, 255).astype(np.uint8)


def loss_curve(metrics_path: str, out_png: str, size=(640, 300)) -> None:
  lines = [json.loads(l) for l in open(metrics_path)]
  train = [(l["step"], l["loss"]) for l in lines if l["kind"] == "train"]
  evals = [(l["step"], l["psnr_1_step"], l["psnr_2_steps"]) for l in lines if l["kind"] == "eval"]
  w, h = size
  img = Image.new("RGB", (w, 2 * h), "white")
  draw = ImageDraw.Draw(img)
  steps = max(s for s, _ in train)

  def plot(points, top, lo, hi, colour, label, n):
    pts = [(40 + (w - 60) * s / steps, top + h - 30 - (h - 50) * (v - lo) / (hi - lo))
           for s, v in points]
    draw.line(pts, fill=colour, width=1)
    draw.text((50, top + 5 + 12 * n), label, fill=colour)

  losses = np.log10([v for _, v in train])
  plot([(s, v) for (s, _), v in zip(train, losses)], 0, losses.min(), losses.max(), "black",
       f"log10 training loss ({losses.min():.2f} .. {losses.max():.2f}), steps 0..{steps}", 0)
  lo = min(min(p1, p2) for _, p1, p2 in evals)
  hi = max(max(p1, p2) for _, p1, p2 in evals)
  plot([(s, p) for s, p, _ in evals], h, lo, hi, "blue", f"held-out PSNR, 1 step ({lo:.1f} .."
       f" {hi:.1f} dB)", 0)
  plot([(s, p) for s, _, p in evals], h, lo, hi, "red", "held-out PSNR, 2 steps", 1)
  img.save(out_png)


def main(run_dir, vae_ckpt, photos_dir, out_dir, stage1_dir=None):
  os.makedirs(out_dir, exist_ok=True)
  trained = jcd.load(run_dir)
  vae = jcd.load(vae_ckpt)
  run = json.load(open(os.path.join(run_dir, "run.json")))
  config = trained.config
  # The model training started from: the same init as `jaxconsdec train --config tiny`.
  first = json.load(open(os.path.join(stage1_dir or run_dir, "run.json")))
  untrained = jcd.random_params(config, seed=first["settings"]["seed"])
  models = [("trained", trained.params)]
  if stage1_dir:
    models.append(("stage 1 (denoising)", jcd.load(stage1_dir).params))
  models.append(("untrained", untrained))
  crop = run["settings"]["resolution"]
  train_photos = [photo(p) for p in sorted(glob.glob(os.path.join(photos_dir, "train", "*.png")))]
  weights = fit_linear(vae.vae_params, vae.vae_config, train_photos, crop)

  rows, grids = [], []
  for path in sorted(glob.glob(os.path.join(photos_dir, "held_out", "*.png"))):
    name = os.path.splitext(os.path.basename(path))[0]
    x = photo(path)
    lat = jcd.encode(vae.vae_params, x[None], config=vae.vae_config, layout="NHWC")
    outputs = {}
    for label, params in models:
      for steps, schedule in ((1, (1.0,)), (2, (1.0, 0.5))):
        img = jcd.decode(params, lat, 0, config=config, schedule=schedule, layout="NHWC")
        outputs[f"{label} CD, {steps} step{'s' if steps > 1 else ''}"] = np.asarray(
            jcd.to_uint8(img))[0]
    outputs["linear decoder"] = linear_decode(weights, np.asarray(lat[0]))
    outputs["small VAE's decoder"] = np.asarray(jcd.to_uint8(jcd.vae_decode(
        vae.vae_params, lat, config=vae.vae_config, layout="NHWC")))[0]
    row = {"image": name, "size": list(x.shape[:2])}
    for label, out in outputs.items():
      row[label] = {"psnr": float(psnr(x, out)), "ssim": float(ssim(x, out))}
    rows.append(row)
    shown = {k: v for k, v in outputs.items()
             if not k.startswith("untrained CD, 2") and not k.startswith("stage 1")}
    # The grid shows each picture's centred 256x256 (the numbers are over the whole picture).
    top, left = (x.shape[0] - 256) // 2, (x.shape[1] - 256) // 2
    crop = lambda a: a[top:top + 256, left:left + 256]
    grids.append(side_by_side(crop(x), {k: crop(v) for k, v in shown.items()}))
  labels = [k for k in rows[0] if k not in ("image", "size")]
  means = {k: {m: float(np.mean([r[k][m] for r in rows])) for m in ("psnr", "ssim")}
           for k in labels}
  report = {"run": run_dir, "step": json.load(open(os.path.join(
      trained.source, "jaxconsdec.json")))["provenance"]["step"], "rows": rows, "mean": means}
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  md = ["| decoder | " + " | ".join(r["image"] for r in rows) + " | mean |",
        "|---|" + "---|" * (len(rows) + 1)]
  for k in labels:
    md.append(f"| {k} | " + " | ".join(f"{r[k]['psnr']:.2f} dB / {r[k]['ssim']:.3f}"
                                        for r in rows)
              + f" | **{means[k]['psnr']:.2f} dB / {means[k]['ssim']:.3f}** |")
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write("PSNR / SSIM against the held-out photo (8-bit pixels)\n\n" + "\n".join(md) + "\n")
  print("\n".join(md))
  width = max(g.shape[1] for g in grids)
  grid = np.concatenate([np.pad(g, ((0, 8), (0, width - g.shape[1]), (0, 0)),
                                constant_values=255) for g in grids])
  Image.fromarray(grid).save(os.path.join(out_dir, "held_out_grid.png"))
  loss_curve(os.path.join(run_dir, "metrics.jsonl"), os.path.join(out_dir, "training_curve.png"))
  if stage1_dir:
    loss_curve(os.path.join(stage1_dir, "metrics.jsonl"),
               os.path.join(out_dir, "training_curve_stage1.png"))


if __name__ == "__main__":
  main(*sys.argv[1:6])
