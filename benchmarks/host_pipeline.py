"""How much of the trainer's host work (decoding, cropping, flipping images) the background
prefetcher hides behind the step.

Large pictures (scikit-image's photos, resized to --side pixels square and saved as PNG) with
an image cache too small to hold them, so every crop decodes its file, as on a data set
that does not fit in memory. The step is the trainer's (`TrainStep`, tiny widths by default,
so that it runs on any machine). Per step, the median of --steps steps:

  host      crops.rows alone
  device    the step alone, on rows made beforehand
  serial    rows then step, one after the other (the trainer without the prefetcher)
  prefetch  the step, its rows made by `Prefetcher` on a background thread

hidden = (serial - prefetch) / host: the share of the host time taken off the step.

  python benchmarks/host_pipeline.py --resolution 256 --batch 8 --steps 12
Writes benchmarks/results/host_pipeline_<backend>.json (and .md).
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--resolution", type=int, default=256)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=12)
  p.add_argument("--side", type=int, default=2048, help="pixels of each square picture")
  p.add_argument("--released", action="store_true", help="the released widths (slow on CPU)")
  p.add_argument("--out")
  args = p.parse_args()

  import jax
  import skimage.data
  from PIL import Image
  import jaxconsdec as jcd
  from jaxconsdec.training import data
  from jaxconsdec.training.step import Optimization, TrainStep

  cfg, vae_cfg = ((jcd.CONSISTENCY_DECODER, jcd.SD_VAE) if args.released
                  else (jcd.TINY, jcd.TINY_VAE))
  with tempfile.TemporaryDirectory() as folder:
    for name in ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry"):
      picture = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
      picture.resize((args.side, args.side)).save(os.path.join(folder, f"{name}.png"))
    items = data.list_training_images([folder], args.resolution, 1 << 40).items
    # Room for one picture: every example's picture is read again.
    crops = data.TrainingCrops(items, args.resolution, seed=0, cache_bytes=1)
    step = TrainStep(cfg, vae_cfg, Optimization(), seed=0)
    holder = {"state": step.first_state(jcd.random_params(cfg, 0))}
    vae = step.replicate(jcd.random_params(vae_cfg, 0, halves=("encoder",)))
    first = lambda s: s * args.batch

    def run(rows):
      holder["state"], metrics = step(holder["state"], vae, rows, 0, 16)
      jax.block_until_ready(metrics["loss"])

    run(crops.rows(0, args.batch))  # compiles
    timings = {"host": [], "device": [], "serial": [], "prefetch": []}
    fixed = crops.rows(0, args.batch)
    for s in range(args.steps):
      start = time.perf_counter()
      crops.rows(first(s), args.batch)
      timings["host"].append(time.perf_counter() - start)
      start = time.perf_counter()
      run(fixed)
      timings["device"].append(time.perf_counter() - start)
      start = time.perf_counter()
      run(crops.rows(first(s), args.batch))
      timings["serial"].append(time.perf_counter() - start)
    prefetch = data.Prefetcher(crops, first, args.batch, 0, args.steps)
    try:
      for s in range(args.steps):
        start = time.perf_counter()
        run(prefetch.rows(s))
        timings["prefetch"].append(time.perf_counter() - start)
    finally:
      prefetch.close()

  med = {k: statistics.median(v) for k, v in timings.items()}
  hidden = (med["serial"] - med["prefetch"]) / med["host"]
  result = {"machine": {"cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count()},
            "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "widths": "released" if args.released else "tiny", "resolution": args.resolution,
            "batch": args.batch, "side": args.side, "steps": args.steps,
            "seconds_per_step": timings, "median_s": med, "hidden_share": hidden}
  table = ("| backend | widths | crop | batch | host s | device s | serial s | prefetch s |"
           " hidden |\n|---|---|---|---|---|---|---|---|---|\n"
           f"| {result['backend']} ({os.cpu_count()} cores) | {result['widths']} |"
           f" {args.resolution}² from {args.side}² PNG | {args.batch} | {med['host']:.3f} |"
           f" {med['device']:.3f} | {med['serial']:.3f} | {med['prefetch']:.3f} |"
           f" {100 * hidden:.0f}% |\n")
  stem = args.out or os.path.join(HERE, "results", f"host_pipeline_{jax.default_backend()}")
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=2)
  with open(stem + ".md", "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  main()
