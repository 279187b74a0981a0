"""What a compiled program holds at its memory peak, from XLA's own account of it.

Compile with `XLA_FLAGS=--xla_dump_to=DIR` (and `--xla_dump_hlo_module_re=NAME` to dump only
the program of interest); XLA writes `*-live-range.txt`, whose "Stack trace breakdown for peak
usage" names, for each buffer live at the peak, the JAX operation (or argument) it came from.
This prints that tree down to `--depth` levels, the entries above `--min-mib`:

  XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/d \\
      --xla_dump_hlo_module_re=.*_step.*" \\
    python benchmarks/train_speed.py memory-worker --size 64 --batches 1 --variants "fp32, remat"
  python benchmarks/peak_breakdown.py /tmp/d/*jit__step*-live-range.txt --depth 3
"""

import argparse
import re


def breakdown(path: str, depth: int, min_mib: float):
  with open(path) as f:
    lines = f.read().splitlines()
  start = next(i for i, line in enumerate(lines) if "Stack trace breakdown for peak" in line)
  print(lines[start].strip())
  for line in lines[start + 1:]:
    m = re.match(r"^([ │├└─]*)(\S.*?) \((?:[\d.]+%), total: ([\d ]+) bytes", line)
    if not m:
      continue
    level = len(m.group(1)) // 4
    mib = int(m.group(3).replace(" ", "")) / 2 ** 20
    if level <= depth and mib >= min_mib:
      print(f"{'  ' * level}{m.group(2)}  {mib:.0f} MiB")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("live_range", help="an XLA dump's *-live-range.txt")
  parser.add_argument("--depth", type=int, default=2)
  parser.add_argument("--min-mib", type=float, default=30.0)
  args = parser.parse_args()
  breakdown(args.live_range, args.depth, args.min_mib)


if __name__ == "__main__":
  main()
