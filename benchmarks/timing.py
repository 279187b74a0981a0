"""What the benchmark scripts share: the timing loop, the device's matmul peak, XLA's FLOPs."""

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


def matmul_peak(dtype: str) -> float:
  """FLOP/s of a large square matmul on the default device: the MFU denominator."""
  import jax
  import jax.numpy as jnp

  import jaxconsdec as jcd
  n = 8192 if jax.default_backend() == "gpu" else 4096
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a, compiler_options=jcd.compiler_options())
  return 2 * n ** 3 / best_seconds(lambda: f(a).block_until_ready(), 5)


def xla_flops(compiled):
  """FLOPs of a compiled program by XLA's cost analysis, or None where a backend has none."""
  try:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis.get("flops", 0)) or None
  except Exception:  # some backends have none
    return None
