"""Peak RSS of `jaxconsdec convert` on a full-size synthetic fp32 weight file.

Writes a released-widths UNet2DModel safetensors file (random values, 2.49 GB) in one
process, converts it in a child process, and reports the child's peak RSS next to the file
size. Usage: python benchmarks/convert_memory.py [WORKDIR]
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def write_file(path):
  import flax
  from safetensors.numpy import save_file

  import jaxconsdec as jcd
  from jaxconsdec.weights import path_to_torch_key
  flat = flax.traverse_util.flatten_dict(jcd.abstract_params(jcd.CONSISTENCY_DECODER))
  rng = np.random.default_rng(0)
  tensors = {}
  for path_, leaf in flat.items():
    key = path_to_torch_key(path_)
    shape = leaf.shape
    if path_[-1] == "kernel" and len(shape) == 4:
      shape = (shape[3], shape[2], shape[0], shape[1])  # HWIO -> OIHW, as torch stores it
    elif path_[-1] == "kernel":
      shape = shape[::-1]
    tensors[key] = rng.standard_normal(shape, dtype=np.float32)
  save_file(tensors, path)


def main():
  work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
  src = os.path.join(work, "unet.safetensors")
  out = os.path.join(work, "ckpt")
  if not os.path.exists(src):
    subprocess.run([sys.executable, __file__, "--write", src], check=True)
  shutil.rmtree(out, ignore_errors=True)
  start = time.perf_counter()
  proc = subprocess.Popen([sys.executable, "-m", "jaxconsdec.cli", "convert", src, "-o", out])
  _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the writer's
  seconds = time.perf_counter() - start
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit("convert failed")
  peak = usage.ru_maxrss * 1024  # KiB -> bytes
  size = os.path.getsize(src)
  result = dict(file_bytes=size, peak_rss_bytes=peak, ratio=peak / size, seconds=seconds,
                machine=f"{platform.machine()}, {os.cpu_count()} cores, CPU only")
  print(f"| file size | peak RSS of convert | peak / file | time |\n|---|---|---|---|\n"
        f"| {size / 2**30:.2f} GiB | {peak / 2**30:.2f} GiB | {peak / size:.2f} | {seconds:.0f} s |")
  os.makedirs("benchmarks/results", exist_ok=True)
  with open("benchmarks/results/convert_memory.json", "w") as f:
    json.dump(result, f, indent=2)
  shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
  if sys.argv[1:2] == ["--write"]:
    write_file(sys.argv[2])
  else:
    main()
