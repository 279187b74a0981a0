"""The demo recipe's ablation table: each run's exported model evaluated by `jaxconsdec eval`
on the whole held-out photos (1 and 2 steps, against the blur baseline), beside the settings
that differ between the runs.

    python samples/demo/ablation_table.py PHOTOS_DIR OUT_DIR RUN_DIR...

Writes OUT_DIR/ablations.json and ablations.md; each run's eval report stays in
RUN_DIR/eval_held_out (reused when it is already there, so the table can be rebuilt).
"""

import json
import os
import subprocess
import sys

from jaxconsdec.training.pairs import ICT_LAW

ONE, TWO = "Consistency Decoder, 1 step", "Consistency Decoder, 2 steps"
BLUR = "blur baseline (8x8 means, bicubic)"


def held_out_report(run_dir: str, photos_dir: str) -> dict:
  out = os.path.join(run_dir, "eval_held_out")
  if not os.path.exists(os.path.join(out, "report.json")):
    subprocess.run(["jaxconsdec", "eval", os.path.join(photos_dir, "held_out"), "-o", out,
                    "--weights", run_dir, "--fit", "crop"], check=True,
                   stdout=subprocess.DEVNULL)
  with open(os.path.join(out, "report.json")) as f:
    return json.load(f)


def settings_of(run_dir: str) -> dict:
  with open(os.path.join(run_dir, "run.json")) as f:
    run = json.load(f)
  s = run["settings"]
  init = run["init"] or ""
  return {"objective": s["objective"],
          "init": init.split(":")[-1][:8] if init.startswith("checkpoint") else "scratch",
          "steps": s["steps"], "batch": s["batch_size"], "crop": s["resolution"],
          "lr": s["optimization"]["lr"], "ema": s["optimization"]["ema_decay"],
          "noise law": ",".join(f"{v:g}" for v in s.get("noise_law", ICT_LAW)),
          "curriculum": ",".join(str(d) for d in s["curriculum"])
          if s["objective"] == "consistency" else "-",
          "weighting": s.get("pair_weighting", "ict") if s["objective"] == "consistency" else "-",
          "anchor": s.get("anchor_share", 0.0) if s["objective"] == "consistency" else "-"}


def main(photos_dir: str, out_dir: str, *run_dirs: str) -> None:
  rows = []
  for run_dir in run_dirs:
    mean = held_out_report(run_dir, photos_dir)["mean"]
    rows.append({"run": os.path.basename(run_dir.rstrip("/")), **settings_of(run_dir),
                 "psnr_1": mean["psnr"][ONE], "psnr_2": mean["psnr"][TWO],
                 "colour_1": mean["colour_psnr"][ONE], "colour_2": mean["colour_psnr"][TWO],
                 "detail_1": mean["detail_ratio"][ONE], "detail_2": mean["detail_ratio"][TWO],
                 "ssim_1": mean["ssim"][ONE], "psnr_blur": mean["psnr"][BLUR]})
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "ablations.json"), "w") as f:
    json.dump(rows, f, indent=2)
  keys = ["run", "objective", "init", "steps", "lr", "noise law", "curriculum", "weighting",
          "anchor"]
  md = ["| " + " | ".join(keys) + " | PSNR 1 / 2 steps | colour PSNR 1 / 2 | detail ratio"
        " 1 / 2 | SSIM 1 step |", "|" + "---|" * (len(keys) + 4)]
  for r in rows:
    md.append("| " + " | ".join(f"{r[k]:g}" if isinstance(r[k], float) else str(r[k])
                                for k in keys)
              + f" | {r['psnr_1']:.2f} / {r['psnr_2']:.2f} | {r['colour_1']:.1f} /"
              f" {r['colour_2']:.1f} | {r['detail_1']:.2f} / {r['detail_2']:.2f} |"
              f" {r['ssim_1']:.3f} |")
  md.append(f"\nEvery run: batch 8, 64x64 crops, EMA 0.995. Blur baseline on the same"
            f" pictures: {rows[0]['psnr_blur']:.2f} dB.")
  with open(os.path.join(out_dir, "ablations.md"), "w") as f:
    f.write("\n".join(md) + "\n")
  print("\n".join(md))


if __name__ == "__main__":
  main(*sys.argv[1:])
