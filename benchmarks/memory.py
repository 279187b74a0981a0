"""Compiled peak memory of one decode, from XLA's memory analysis (compiles, never runs).

For each size and precision: the argument (params + latents), output and temporary buffers
XLA assigns, and their sum. With --devices N (simulated CPU devices when no accelerator has
that many) it also compiles the height-sharded decode and reports the per-device figures.

Usage: python benchmarks/memory.py [--sizes 1024,2048] [--devices 4] [--out FILE.json]
"""

import argparse
import json
import os
import platform
import sys
import time


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default="512,1024,2048")
  parser.add_argument("--devices", type=int, default=4)
  parser.add_argument("--out", help="result path (default benchmarks/results/memory_<backend>.json)")
  args = parser.parse_args()
  if args.devices > 1 and "jax" not in sys.modules:
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")
  import jax
  import jax.numpy as jnp

  import jaxconsdec as jcd
  from jaxconsdec import sharded
  from jaxconsdec.sampler import top_level_program

  rows = []
  for size in [int(s) for s in args.sizes.split(",")]:
    for dtype in ("bfloat16", "float32"):
      cfg = jcd.CONSISTENCY_DECODER.replace(dtype=dtype, param_dtype=dtype)
      params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                            jcd.abstract_params(cfg))
      latents = jax.ShapeDtypeStruct((1, 4, size // 8, size // 8), jnp.float32)
      keys = jax.eval_shape(lambda: jcd.example_keys(0, 1))
      timesteps = jcd.timesteps_for((1.0, 0.5))
      start = time.perf_counter()
      compiled = top_level_program(jax.default_backend()).lower(
          params, latents, keys, None, config=cfg, timesteps=timesteps, clamp=True,
          layout="NCHW").compile()
      rows.append(_row(size, dtype, 1, compiled, time.perf_counter() - start))
      print(_line(rows[-1]), flush=True)
      n = min(args.devices, jax.device_count())
      if n > 1 and (size // 8) % n == 0:
        mesh = sharded.data_mesh(jax.devices()[:n], axis="space")
        program = sharded.spatial_program(mesh, "space", cfg, timesteps, True, "NCHW")
        start = time.perf_counter()
        compiled = program.lower(params, latents, keys).compile()
        rows.append(_row(size, dtype, n, compiled, time.perf_counter() - start))
        print(_line(rows[-1]), flush=True)
  result = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": rows,
            "command": "python benchmarks/memory.py " + " ".join(sys.argv[1:])}
  name = args.out or f"benchmarks/results/memory_{jax.default_backend()}.json"
  os.makedirs(os.path.dirname(name) or ".", exist_ok=True)
  with open(name, "w") as f:
    json.dump(result, f, indent=2)
  print(f"\n| image | dtype | devices | per-device total (GiB) | temp | args | out | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['size']}² | {r['dtype']} | {r['devices']} | {r['total_gib']:.2f} |"
          f" {r['temp_gib']:.2f} | {r['argument_gib']:.2f} | {r['output_gib']:.3f} |"
          f" {r['compile_s']:.0f} |")
  print(f"wrote {name}")


def _row(size, dtype, devices, compiled, seconds):
  m = compiled.memory_analysis()
  gib = 2.0 ** 30
  parts = dict(temp_gib=m.temp_size_in_bytes / gib, argument_gib=m.argument_size_in_bytes / gib,
               output_gib=m.output_size_in_bytes / gib,
               alias_gib=m.alias_size_in_bytes / gib)
  total = parts["temp_gib"] + parts["argument_gib"] + parts["output_gib"] - parts["alias_gib"]
  return dict(size=size, dtype=dtype, devices=devices, total_gib=total, compile_s=seconds,
              **parts)


def _line(r):
  return (f"{r['size']}x{r['size']} {r['dtype']:8s} on {r['devices']} device(s): "
          f"{r['total_gib']:.2f} GiB per device (temp {r['temp_gib']:.2f})")


if __name__ == "__main__":
  main()
