"""The one timing loop the benchmark scripts share."""

import time


def best_seconds(fn, repeats: int) -> float:
  """Calls `fn` once to warm up (and compile), then `repeats` times; the fastest, in seconds.
  `fn` must block until its work is done (`block_until_ready()` for JAX)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)
