"""The demo model's report: its 1- and 2-step decodes of the held-out photos and of the
unseen photos (samples/demo/photos.py), scored against each original on PSNR, SSIM, colour
fidelity (PSNR of 8x8 block means) and detail ratio (jaxconsdec.metrics), beside the blur
baseline (the photo pooled onto the latent grid and upsampled bicubically), the small VAE's
own decoder and the stage-1 (denoising) model; the targets the demo must meet; grids with
each number under its picture; the training curves.

    python samples/demo/report.py RUN_DIR STAGE1_RUN_DIR VAE_CKPT PHOTOS_DIR OUT_DIR

VAE_CKPT is the small VAE the run trained with, decoder included (the exported model holds
only its encoder).
"""

import glob
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

import jaxconsdec as jcd
from jaxconsdec.metrics import SCORES, blur_baseline
from photos import crop_to_multiple_of_8

SETS = ("held_out", "unseen")
BLUR, VAE = "blur baseline", "small VAE's decoder"
DEMO_1, DEMO_2 = "demo, 1 step", "demo, 2 steps"
STAGE1_1, STAGE1_2 = "stage 1 (denoising), 1 step", "stage 1 (denoising), 2 steps"
SHOWN = ("original", BLUR, VAE, DEMO_1, DEMO_2)  # the grid's columns
SCHEDULES = ((1.0,), (1.0, 0.5))
PANEL = 256  # the grids show each picture's centred PANEL x PANEL (numbers: whole picture)


def photo(path: str) -> np.ndarray:
  return crop_to_multiple_of_8(np.asarray(Image.open(path).convert("RGB")))


def decodes(x, demo, stage1, vae) -> dict:
  lat = jcd.encode(vae.vae_params, x[None], config=vae.vae_config, layout="NHWC")
  out = {BLUR: blur_baseline(x), VAE: np.asarray(jcd.to_uint8(jcd.vae_decode(
      vae.vae_params, lat, config=vae.vae_config, layout="NHWC")))[0]}
  for model, labels in ((demo, (DEMO_1, DEMO_2)), (stage1, (STAGE1_1, STAGE1_2))):
    for label, schedule in zip(labels, SCHEDULES):
      out[label] = np.asarray(jcd.to_uint8(jcd.decode(
          model.params, lat, 0, config=model.config, schedule=schedule, layout="NHWC")))[0]
  return out


def scores(x, out) -> dict:
  return {label: {name: float(score(x, image)) for name, score in SCORES.items()}
          for label, image in out.items()}


def panel(image: np.ndarray, caption: list[str], top: int, left: int) -> Image.Image:
  crop = image[top:top + PANEL, left:left + PANEL]
  canvas = Image.new("RGB", (PANEL, 18 + PANEL + 14 * len(caption) + 4), "white")
  canvas.paste(Image.fromarray(crop), (0, 18))
  draw = ImageDraw.Draw(canvas)
  draw.text((2, 3), caption[0], fill="black")
  for i, line in enumerate(caption[1:]):
    draw.text((2, 18 + PANEL + 2 + 14 * i), line, fill="black")
  return canvas


def grid_row(x, out, row) -> Image.Image:
  h, w = x.shape[:2]
  top, left = max(0, (h - PANEL) // 2), max(0, (w - PANEL) // 2)
  panels = [panel(x, ["original", f"{w}x{h}"], top, left)]
  for label in SHOWN[1:]:
    r = row[label]
    panels.append(panel(out[label], [label, f"PSNR {r['psnr']:.2f} dB  SSIM {r['ssim']:.3f}",
                                     f"colour {r['colour_psnr']:.1f} dB  detail"
                                     f" {r['detail_ratio']:.2f}"], top, left))
  canvas = Image.new("RGB", (sum(p.width + 8 for p in panels) - 8,
                             max(p.height for p in panels)), "white")
  x0 = 0
  for p in panels:
    canvas.paste(p, (x0, 0))
    x0 += p.width + 8
  return canvas


def stack(rows: list[Image.Image]) -> Image.Image:
  canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 8 for r in rows)),
                     "white")
  y = 0
  for r in rows:
    canvas.paste(r, (0, y))
    y += r.height + 8
  return canvas


def targets(mean: dict, rows: list[dict]) -> dict:
  """The bars issue-style: what the demo must show on each set of photos."""
  return {
      "1-step PSNR at or above the blur baseline": mean[DEMO_1]["psnr"] >= mean[BLUR]["psnr"],
      "colour fidelity at least 30 dB (1 and 2 steps)":
          min(mean[DEMO_1]["colour_psnr"], mean[DEMO_2]["colour_psnr"]) >= 30.0,
      "2 steps no more than 0.5 dB below 1 step":
          mean[DEMO_2]["psnr"] >= mean[DEMO_1]["psnr"] - 0.5,
      "detail ratio in [0.5, 1.5] on every picture": all(
          0.5 <= r["scores"][label]["detail_ratio"] <= 1.5 for r in rows
          for label in (DEMO_1, DEMO_2)),
      "consistency stage at or above stage 1 at 2 steps (PSNR)":
          mean[DEMO_2]["psnr"] >= mean[STAGE1_2]["psnr"],
  }


def loss_curve(metrics_path: str, out_png: str, size=(640, 300)) -> None:
  lines = [json.loads(l) for l in open(metrics_path)]
  train = [(l["step"], l["loss"]) for l in lines if l["kind"] == "train" and l["loss"]]
  evals = [(l["step"], l["psnr_1_step"], l["psnr_2_steps"]) for l in lines if l["kind"] == "eval"]
  blur = [l["psnr_blur_baseline"] for l in lines if l["kind"] == "eval"][0]
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
  hi = max(max(max(p1, p2) for _, p1, p2 in evals), blur + 0.5)
  plot([(s, p) for s, p, _ in evals], h, lo, hi, "blue", f"held-out PSNR, 1 step ({lo:.1f} .."
       f" {hi:.1f} dB)", 0)
  plot([(s, p) for s, _, p in evals], h, lo, hi, "red", "held-out PSNR, 2 steps", 1)
  plot([(0, blur), (steps, blur)], h, lo, hi, "gray", f"blur baseline ({blur:.1f} dB)", 2)
  img.save(out_png)


def main(run_dir, stage1_dir, vae_ckpt, photos_dir, out_dir):
  os.makedirs(out_dir, exist_ok=True)
  demo, stage1, vae = jcd.load(run_dir), jcd.load(stage1_dir), jcd.load(vae_ckpt)
  report = {"run": os.path.basename(run_dir.rstrip("/")),
            "stage1": os.path.basename(stage1_dir.rstrip("/"))}
  md = []
  for name in SETS:
    rows, grid = [], []
    for path in sorted(glob.glob(os.path.join(photos_dir, name, "*.png"))):
      x = photo(path)
      out = decodes(x, demo, stage1, vae)
      row = {"image": os.path.splitext(os.path.basename(path))[0],
             "size": list(x.shape[:2]), "scores": scores(x, out)}
      rows.append(row)
      grid.append(grid_row(x, out, row["scores"]))
    labels = list(rows[0]["scores"])
    mean = {k: {m: float(np.mean([r["scores"][k][m] for r in rows])) for m in SCORES}
            for k in labels}
    report[name] = {"images": rows, "mean": mean, "targets": targets(mean, rows)}
    stack(grid).save(os.path.join(out_dir, f"{name}_grid.png"))
    md += [f"### {name.replace('_', '-')} photos ({', '.join(r['image'] for r in rows)})", "",
           "| decoder | PSNR dB | SSIM | colour PSNR dB | detail ratio (min .. max) |",
           "|---|---|---|---|---|"]
    for k in labels:
      ratios = [r["scores"][k]["detail_ratio"] for r in rows]
      md.append(f"| {k} | {mean[k]['psnr']:.2f} | {mean[k]['ssim']:.3f} |"
                f" {mean[k]['colour_psnr']:.1f} | {mean[k]['detail_ratio']:.2f}"
                f" ({min(ratios):.2f} .. {max(ratios):.2f}) |")
    md += [""] + [f"- {'met' if ok else 'NOT met'}: {t}" for t, ok in
                  report[name]["targets"].items()] + [""]
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write("Whole pictures, 8-bit pixels, means over each set\n\n" + "\n".join(md))
  print("\n".join(md))
  loss_curve(os.path.join(run_dir, "metrics.jsonl"), os.path.join(out_dir, "training_curve.png"))
  loss_curve(os.path.join(stage1_dir, "metrics.jsonl"),
             os.path.join(out_dir, "training_curve_stage1.png"))


if __name__ == "__main__":
  main(*sys.argv[1:6])
