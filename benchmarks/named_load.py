"""Loading the released decoder by name, against loading its local checkpoint directly.

Builds a full-size `openai/consistency-decoder` folder in the Hub's layout (diffusers'
ConsistencyDecoderVAE at the released widths, random values, saved in float16 as published:
config.json + diffusion_pytorch_model.safetensors), serves it from a web server on the
loopback address in the Hub's API paths (tests/hub_server.py, through HF_ENDPOINT), and
times, each in a fresh process:

- the first `jaxconsdec.load("openai/consistency-decoder")`: download, convert, cache, load;
- a cached `jaxconsdec.load("openai/consistency-decoder")` (no request reaches the server);
- `jaxconsdec.load(CKPT)` of the same file converted by `jaxconsdec convert`.

The time is that of the call, until the params are on the device. Needs torch and diffusers
(the test extra) to write the folder. Usage: python benchmarks/named_load.py [WORKDIR]
Results: benchmarks/results/named_load_cpu.{json,md}.
"""

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "openai/consistency-decoder"
REPEATS = 3
TIMED_LOAD = """
import sys, time, jax, jaxconsdec as jcd
start = time.perf_counter()
params, config = jcd.load(sys.argv[1])
jax.block_until_ready(params)
print("SECONDS", time.perf_counter() - start)
"""


def write_folder(folder):
  import torch
  from diffusers import ConsistencyDecoderVAE
  torch.manual_seed(0)
  ConsistencyDecoderVAE().half().save_pretrained(folder, safe_serialization=True)


def timed(env, target):
  proc = subprocess.run([sys.executable, "-c", TIMED_LOAD, target], env=env,
                        capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f"load {target} failed:\n{proc.stderr[-3000:]}")
  return next(float(l.split()[1]) for l in proc.stdout.splitlines() if l.startswith("SECONDS"))


def main():
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from hub_server import Server
  work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
  folder = os.path.join(work, "hub")
  weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
  if not os.path.exists(weights):
    subprocess.run([sys.executable, __file__, "--write", folder], check=True)
  for stale in ("cache", "hf", "ckpt"):
    shutil.rmtree(os.path.join(work, stale), ignore_errors=True)
  server = Server()
  server.repos[NAME] = {name: open(os.path.join(folder, name), "rb").read()
                        for name in ("config.json", "diffusion_pytorch_model.safetensors")}
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_ENDPOINT=server.url,
             HF_HOME=os.path.join(work, "hf"), JAXCONSDEC_CACHE=os.path.join(work, "cache"),
             HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1")
  first = timed(env, NAME)
  fetched = len(server.log)
  ckpt = os.path.join(work, "ckpt")
  subprocess.run([sys.executable, "-m", "jaxconsdec.cli", "convert", weights, "-o", ckpt],
                 env=env, check=True, capture_output=True)
  cached, local = [], []
  for _ in range(REPEATS):
    cached.append(timed(env, NAME))
    local.append(timed(env, ckpt))
  assert len(server.log) == fetched, "a cached load reached the server"
  server.close()
  result = dict(
      file_bytes=os.path.getsize(weights), first_use_seconds=first,
      cached_seconds=cached, local_checkpoint_seconds=local,
      cached_median=statistics.median(cached), local_median=statistics.median(local),
      requests_first_use=fetched, requests_cached=0,
      machine=f"{platform.machine()}, {os.cpu_count()} cores, CPU only")
  table = (
      f"Released widths, {result['file_bytes'] / 2**30:.2f} GiB float16 file in the Hub's"
      f" layout, served on the loopback address; {result['machine']}; median of"
      f" {REPEATS} fresh processes\n\n"
      "| load | seconds |\n|---|---|\n"
      f"| `load(\"{NAME}\")`, first use (download, convert, cache) | {first:.1f} |\n"
      f"| `load(\"{NAME}\")`, cached | {result['cached_median']:.2f} |\n"
      f"| `load(CKPT)`, the local checkpoint | {result['local_median']:.2f} |\n")
  print(table)
  out = os.path.join(ROOT, "benchmarks", "results")
  with open(os.path.join(out, "named_load_cpu.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(out, "named_load_cpu.md"), "w") as f:
    f.write(f"`python benchmarks/named_load.py`\n\n{table}")


if __name__ == "__main__":
  if sys.argv[1:2] == ["--write"]:
    write_folder(sys.argv[2])
  else:
    main()
