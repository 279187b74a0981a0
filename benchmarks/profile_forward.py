"""Where one UNet forward pass spends its time outside the convolutions, and GroupNorm + SiLU
alone against PyTorch's.

  python benchmarks/profile_forward.py --size 128

1. Runs one released-widths forward (batch 1) under `jax.profiler` and sums the trace's
   per-op events by HLO op kind (`divide_multiply_fusion.12` -> `divide_multiply_fusion`).
   XLA:CPU hands convolutions to Eigen asynchronously, so their events only cover the
   dispatch; everything else is timed in full. The table is the non-convolution time.
2. Times GroupNorm(32) + SiLU alone at the largest activation shapes: Flax two-pass variance
   (what jaxconsdec uses), Flax one-pass ("fast") variance, and torch.

Writes benchmarks/results/profile_forward_<backend>.json.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import platform
import re
import sys
import tempfile
import time

import numpy as np

from timing import best_seconds


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", type=int, default=128, help="image side in pixels")
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp

  import jaxconsdec as jcd

  cfg = jcd.CONSISTENCY_DECODER
  params = jax.device_put(jcd.random_params(cfg, 0))
  x = jnp.asarray(np.random.default_rng(0).standard_normal(
      (1, args.size, args.size, cfg.in_channels)).astype(np.float32))
  t = jnp.array([512], jnp.int32)
  forward = jax.jit(lambda p, x, t: jcd.UNet(cfg).apply({"params": p}, x, t),
                    compiler_options=jcd.compiler_options())
  forward(params, x, t).block_until_ready()
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    forward(params, x, t).block_until_ready()
    total_s = time.perf_counter() - start
    jax.profiler.stop_trace()
    trace = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
    with gzip.open(trace) as f:
      events = json.load(f)["traceEvents"]

  by_kind, count = collections.Counter(), collections.Counter()
  for event in events:
    name = event.get("name", "")
    if event.get("ph") != "X" or not re.match(r"^[a-z_\-]+(\.\d+)?$", name):
      continue  # runtime bookkeeping (executor, Python frames), not HLO ops
    kind = re.sub(r"\.\d+$", "", name)
    by_kind[kind] += event["dur"] / 1e6
    count[kind] += 1
  convolution = {k for k in by_kind if k.startswith("conv")}
  print(f"forward {args.size}²: {total_s:.2f} s; outside convolutions (profiled):")
  for kind, seconds in by_kind.most_common():
    if kind not in convolution and seconds >= 0.001:
      print(f"  {seconds:7.3f} s  {count[kind]:4d}x  {kind}")
  outside = sum(s for k, s in by_kind.items() if k not in convolution)
  print(f"  {outside:7.3f} s  total, {100 * outside / total_s:.0f}% of the forward")

  norms = _group_norm_timings(jcd)
  result = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "size": args.size,
            "forward_s": total_s, "outside_convolutions_s": outside,
            "outside_by_kind_s": {k: s for k, s in by_kind.items() if k not in convolution},
            "group_norm_silu_ms": norms,
            "command": "python benchmarks/profile_forward.py " + " ".join(sys.argv[1:])}
  os.makedirs("benchmarks/results", exist_ok=True)
  with open(f"benchmarks/results/profile_forward_{jax.default_backend()}.json", "w") as f:
    json.dump(result, f, indent=2)


def _group_norm_timings(jcd) -> dict:
  import flax.linen as nn
  import jax
  import torch

  rows = {}
  print("GroupNorm(32) + SiLU alone, ms (best of 7):")
  for size, channels in ((128, 640), (256, 320), (256, 640)):
    x = (np.random.default_rng(0).standard_normal((1, size, size, channels)) * 2 + 3
         ).astype(np.float32)
    row = {}
    for name, fast in (("flax_two_pass", False), ("flax_fast_variance", True)):
      norm = nn.GroupNorm(32, epsilon=1e-5, use_fast_variance=fast)
      variables = norm.init(jax.random.key(0), x[:, :8, :8])
      f = jax.jit(lambda v, x: nn.silu(norm.apply(v, x)),
                  compiler_options=jcd.compiler_options())
      xj = jax.device_put(x)
      row[name] = 1e3 * best_seconds(lambda: f(variables, xj).block_until_ready(), 7)
    norm = torch.nn.GroupNorm(32, channels)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
      row["torch"] = 1e3 * best_seconds(lambda: torch.nn.functional.silu(norm(xt)), 7)
    rows[f"{size}x{size}x{channels}"] = row
    print(f"  {size}² x {channels}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()))
  return rows


if __name__ == "__main__":
  main()
