"""`encode` on large images: XLA's compiled memory (compiles, never runs) and the time of one
encode, for the SD VAE's encoder (34M params) at SD widths.

The mid block's attention is over (H/8 x W/8) positions: 65,536 at 2048^2, whose full score
matrix would be 16 GiB in float32. jaxconsdec computes it a chunk of 4,096 queries at a time
(`models/vae.ATTENTION_CHUNK`); `--no-chunk` compiles the unchunked attention to compare.

Usage: python benchmarks/encode_memory.py [--sizes 512,1024,2048] [--time-sizes 512,1024]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default="512,1024,2048")
  parser.add_argument("--time-sizes", default="512,1024",
                      help="sizes to run and time as well (float32, batch 1)")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--no-chunk", action="store_true", help="the attention unchunked")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  import jax
  import jax.numpy as jnp
  import numpy as np

  import jaxconsdec as jcd
  from jaxconsdec.models import vae as vae_module
  if args.no_chunk:
    vae_module.ATTENTION_CHUNK = 1 << 40
  rows = []
  for size in [int(s) for s in args.sizes.split(",")]:
    for dtype in ("float32", "bfloat16"):
      cfg = jcd.SD_VAE.replace(dtype=dtype, param_dtype=dtype)
      params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                            jcd.abstract_params(cfg, halves=("encoder",)))
      images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8)
      fn = jax.jit(lambda p, x: jcd.encode(p, x, config=cfg, layout="NHWC"),
                   compiler_options=jcd.compiler_options())
      start = time.perf_counter()
      compiled = fn.lower(params, images).compile()
      m = compiled.memory_analysis()
      gib = 2.0 ** 30
      row = dict(size=size, dtype=dtype, compile_s=time.perf_counter() - start,
                 temp_gib=m.temp_size_in_bytes / gib, argument_gib=m.argument_size_in_bytes / gib,
                 total_gib=(m.temp_size_in_bytes + m.argument_size_in_bytes
                            + m.output_size_in_bytes - m.alias_size_in_bytes) / gib)
      if dtype == "float32" and str(size) in args.time_sizes.split(","):
        real = jcd.random_params(cfg, 0, halves=("encoder",))
        pixels = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, size, size, 3),
                                                                 np.uint8))
        compiled(real, pixels).block_until_ready()  # warm
        times = []
        for _ in range(args.repeats):
          start = time.perf_counter()
          compiled(real, pixels).block_until_ready()
          times.append(time.perf_counter() - start)
        row["seconds"] = statistics.median(times)
      rows.append(row)
      print(json.dumps(row), flush=True)
  result = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "chunked_attention": not args.no_chunk, "rows": rows,
            "command": "python benchmarks/encode_memory.py " + " ".join(sys.argv[1:])}
  name = args.out or (f"benchmarks/results/encode_memory_{jax.default_backend()}"
                      + ("_unchunked" if args.no_chunk else "") + ".json")
  os.makedirs(os.path.dirname(name) or ".", exist_ok=True)
  with open(name, "w") as f:
    json.dump(result, f, indent=2)
  print("\n| image | dtype | total GiB | temporaries GiB | params GiB | compile s | encode s |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    seconds = f"{r['seconds']:.1f}" if "seconds" in r else "-"
    print(f"| {r['size']}² | {r['dtype']} | {r['total_gib']:.2f} | {r['temp_gib']:.2f} |"
          f" {r['argument_gib']:.3f} | {r['compile_s']:.0f} | {seconds} |")
  print(f"wrote {name}")


if __name__ == "__main__":
  main()
