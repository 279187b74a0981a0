"""How long `jaxconsdec --version` and `--help` take, and whether they import JAX.

Usage: python benchmarks/cli_startup.py [--source DIR] [--label NAME] [--repeats 7]

Runs `python -m jaxconsdec.cli FLAG` in a fresh interpreter `--repeats` times each (the
first run is a warm-up, not counted) and reports the median wall time. `--source DIR` runs
another checkout of jaxconsdec (put first on PYTHONPATH), e.g. a `git worktree` of an older
commit, for a before/after row. Writes results/cli_startup.json (rows keyed by label).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROBE = ("import runpy, sys\n"
         "sys.argv = ['jaxconsdec', sys.argv[1]]\n"
         "try:\n  runpy.run_module('jaxconsdec.cli', run_name='__main__')\n"
         "except SystemExit:\n  pass\n"
         "sys.stderr.write('JAX_IMPORTED=%s\\n' % ('jax' in sys.modules))\n")


def measure(flag: str, repeats: int, env: dict) -> dict:
  times, jax_imported = [], None
  for i in range(repeats + 1):
    start = time.perf_counter()
    # From the filesystem root: `python -c` puts the working folder first on sys.path, and
    # a checkout there would shadow the copy asked for.
    proc = subprocess.run([sys.executable, "-c", PROBE, flag], capture_output=True, text=True,
                          env=env, timeout=120, cwd="/")
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or "JAX_IMPORTED=" not in proc.stderr:
      raise SystemExit(f"{flag} failed:\n{proc.stderr[-2000:]}")
    jax_imported = "JAX_IMPORTED=True" in proc.stderr
    if i:
      times.append(elapsed)
  return {"flag": flag, "median_s": statistics.median(times), "min_s": min(times),
          "max_s": max(times), "repeats": repeats, "imports_jax": jax_imported}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--source", help="a checkout of jaxconsdec to run instead of the installed one")
  parser.add_argument("--label", default="current")
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  env = dict(os.environ)
  if args.source:
    env["PYTHONPATH"] = os.path.abspath(args.source)
  rows = [measure(flag, args.repeats, env) for flag in ("--version", "--help")]
  print(f"| {args.label} | flag | median s | min-max s | imports JAX |\n|---|---|---|---|---|")
  for r in rows:
    print(f"| {args.label} | `{r['flag']}` | {r['median_s']:.3f} | {r['min_s']:.3f}-"
          f"{r['max_s']:.3f} | {r['imports_jax']} |")
  path = os.path.join(HERE, "results", "cli_startup.json")
  results = json.load(open(path)) if os.path.exists(path) else {}
  results[args.label] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores,"
                                    f" {platform.python_version()}", "rows": rows}
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
