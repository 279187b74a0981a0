"""jaxconsdec vs diffusers' ConsistencyDecoderVAE: the same weights, the same shapes, timed
alternately in one process.

Per (size, batch): ms/image and images/s for each implementation (median of --repeats
alternating runs, after a warm-up), the ratio jaxconsdec/reference per repeat (median and
spread), jaxconsdec's compile time, XLA's compiled memory, the device's peak memory (GPU),
torch's peak (GPU), and model FLOP utilisation: FLOPs from XLA's cost analysis (checked
against docs/model.md's count) over the peak FLOP/s of a large matmul measured on the same device.
The jaxconsdec runs are timed under `jax.transfer_guard("disallow")`: no hidden host
transfers. Writes benchmarks/results/decode_speed_<backend>.json and .md.

  CPU (fp32 both):  python benchmarks/decode_speed.py --sizes 256 --batches 1 --repeats 3
  GPU:              python benchmarks/decode_speed.py --sizes 256,512,1024 --batches 1,8,32 \
                        --dtype bfloat16 --reference fp16,fp16-compile
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

from timing import best_seconds, matmul_peak, xla_flops

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

SPEC_TFLOP_PER_FORWARD_256 = 8.41  # docs/model.md, scales with pixel count
SCHEDULE = (1.0, 0.5)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default="256")
  parser.add_argument("--batches", default="1")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--reference", default="fp32",
                      help="comma list of fp32, fp16, fp16-compile (channels_last + compile)")
  parser.add_argument("--tiny", action="store_true", help="tiny widths: a smoke run")
  parser.add_argument("--out", help="result path without extension (default:"
                      " benchmarks/results/decode_speed_<backend>[_tiny])")
  args = parser.parse_args()

  import jax
  import torch

  import jaxconsdec as jcd
  from reference import diffusers_vae, state_dict_numpy

  base = jcd.TINY if args.tiny else jcd.CONSISTENCY_DECODER
  cfg = base.replace(dtype=args.dtype, param_dtype=args.dtype)
  gpu = jax.default_backend() == "gpu"
  torch_device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
  vae = diffusers_vae(base, seed=0)
  params = jax.device_put(jcd.params_from_torch(state_dict_numpy(vae.decoder_unet), cfg))
  references = {mode: _reference(vae, mode, torch_device) for mode in args.reference.split(",")}
  peak = matmul_peak(args.dtype)
  print(f"device {jax.devices()[0].device_kind}; matmul peak {peak / 1e12:.2f} TFLOP/s"
        f" ({args.dtype})", flush=True)

  rows = []
  for size in [int(s) for s in args.sizes.split(",")]:
    for batch in [int(b) for b in args.batches.split(",")]:
      rows.append(_measure(cfg, params, references, size, batch, args.repeats, peak,
                           torch_device))
      print(json.dumps(rows[-1]), flush=True)
  result = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "jax": jax.__version__, "torch": torch.__version__, "dtype": args.dtype,
            "matmul_peak_tflops": peak / 1e12, "schedule": SCHEDULE, "tiny": args.tiny,
            "command": "python benchmarks/decode_speed.py " + " ".join(sys.argv[1:]),
            "rows": rows}
  stem = args.out or (f"benchmarks/results/decode_speed_{jax.default_backend()}"
                      + ("_tiny" if args.tiny else ""))
  os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=2)
  table = _table(result)
  with open(stem + ".md", "w") as f:
    f.write(table)
  print(table)


def _reference(vae, mode, device):
  """A callable decoding latents with diffusers, in the given precision mode."""
  import copy

  import torch
  model = copy.deepcopy(vae).to(device)
  if mode in ("fp16", "fp16-compile"):
    model = model.half()
  if mode == "fp16-compile":
    model = model.to(memory_format=torch.channels_last)
    model.decoder_unet = torch.compile(model.decoder_unet)
  dtype = torch.float16 if mode.startswith("fp16") else torch.float32

  def run(latents: np.ndarray, seed: int):
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
      x = torch.from_numpy(latents).to(device, dtype)  # raw latents, as jaxconsdec takes
      out = model.decode(x, generator=generator).sample
    if device == "cuda":
      torch.cuda.synchronize()
    return out
  return run


def _measure(cfg, params, references, size, batch, repeats, peak, torch_device):
  import jax
  import torch

  import jaxconsdec as jcd
  from jaxconsdec.sampler import top_level_program
  rng = np.random.default_rng(size + batch)
  latents_np = (rng.standard_normal((batch, 4, size // 8, size // 8)) / 0.18215).astype(np.float32)
  latents = jax.device_put(latents_np)
  keys = jax.device_put(jcd.example_keys(0, batch))
  timesteps = jcd.timesteps_for(SCHEDULE)
  start = time.perf_counter()
  # The program `jcd.decode` runs (with its compiler options), compiled here to time it.
  compiled = top_level_program(jax.default_backend()).lower(
      params, latents, keys, None, config=cfg, timesteps=timesteps, clamp=True,
      layout="NCHW").compile()
  compile_s = time.perf_counter() - start
  # XLA's cost analysis counts a lax.scan body once, not once per iteration: x steps.
  flops = xla_flops(compiled)
  flops = flops * len(SCHEDULE) if flops else None
  spec_flops = SPEC_TFLOP_PER_FORWARD_256 * 1e12 * (size / 256) ** 2 * len(SCHEDULE) * batch
  memory = compiled.memory_analysis()

  def run_jax():
    with jax.transfer_guard("disallow"):
      compiled(params, latents, keys, None).block_until_ready()

  run_jax()  # warm-up
  for ref in references.values():
    ref(latents_np, 0)
  if torch_device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  jax_times, ref_times = [], {m: [] for m in references}
  for _ in range(repeats):  # alternate, so drift (thermal, other load) hits both alike
    start = time.perf_counter()
    run_jax()
    jax_times.append(time.perf_counter() - start)
    for mode, ref in references.items():
      start = time.perf_counter()
      ref(latents_np, 0)
      ref_times[mode].append(time.perf_counter() - start)
  jax_s = statistics.median(jax_times)
  stats = jax.devices()[0].memory_stats() or {}
  row = dict(size=size, batch=batch, jax_ms_per_image=1e3 * jax_s / batch,
             jax_images_per_s=batch / jax_s, jax_compile_s=compile_s,
             xla_flops=flops, spec_flops=spec_flops,
             mfu=(flops or spec_flops) / jax_s / peak,
             xla_memory_gib=(memory.temp_size_in_bytes + memory.argument_size_in_bytes
                             + memory.output_size_in_bytes - memory.alias_size_in_bytes) / 2**30,
             device_peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30 or None,
             torch_peak_gib=(torch.cuda.max_memory_allocated() / 2**30
                             if torch_device == "cuda" else None),
             jax_times_s=jax_times)
  for mode, times in ref_times.items():
    ratios = [j / r for j, r in zip(jax_times, times)]
    row[f"{mode}_ms_per_image"] = 1e3 * statistics.median(times) / batch
    row[f"{mode}_images_per_s"] = batch / statistics.median(times)
    row[f"{mode}_times_s"] = times
    row[f"ratio_vs_{mode}_median"] = statistics.median(ratios)
    row[f"ratio_vs_{mode}_range"] = [min(ratios), max(ratios)]
  return row


def _table(result) -> str:
  modes = [k[len("ratio_vs_"):-len("_median")] for k in result["rows"][0]
           if k.startswith("ratio_vs_") and k.endswith("_median")]
  head = ["size", "batch", "jaxconsdec ms/img", "img/s", "compile s"]
  for m in modes:
    head += [f"{m} ms/img", f"jax/{m} (median, range)"]
  head += ["XLA mem GiB", "device peak GiB", "torch peak GiB", "XLA TFLOP", "SPEC TFLOP", "MFU"]
  lines = [f"Device: {result['device']} ({result['backend']}, {result['machine']}),"
           f" {result['dtype']}, schedule {list(result['schedule'])}, matmul peak"
           f" {result['matmul_peak_tflops']:.2f} TFLOP/s. Command: `{result['command']}`", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  fmt = lambda v, p=1: "n/a" if v is None else f"{v:.{p}f}"
  for r in result["rows"]:
    cells = [f"{r['size']}²", str(r["batch"]), fmt(r["jax_ms_per_image"]),
             fmt(r["jax_images_per_s"], 3), fmt(r["jax_compile_s"])]
    for m in modes:
      lo, hi = r[f"ratio_vs_{m}_range"]
      cells += [fmt(r[f"{m}_ms_per_image"]),
                f"{r[f'ratio_vs_{m}_median']:.3f} ({lo:.3f}-{hi:.3f})"]
    cells += [fmt(r["xla_memory_gib"], 2), fmt(r["device_peak_gib"], 2),
              fmt(r["torch_peak_gib"], 2), fmt((r["xla_flops"] or 0) / 1e12, 2),
              fmt(r["spec_flops"] / 1e12, 2), f"{100 * r['mfu']:.0f}%"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
