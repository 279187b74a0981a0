"""The XLA compiler options jaxconsdec compiles its programs with, per platform.

XLA:CPU in jaxlib 0.10 hands convolutions and dots to YNNPACK by default. On this model's
3x3 convolutions YNNPACK reaches 140-166 GFLOP/s on a 2-core AMD EPYC (Zen 4), where XLA's
own Eigen path reaches 190-210, level with PyTorch's oneDNN (`benchmarks/conv_kernels.py`);
a VALID-padded convolution drops to 52. The whole 128x128 decode is 12% faster without it.
So every CPU program jaxconsdec compiles turns the YNN fusions off. Other platforms get no
options: a TPU or GPU compiler may refuse names it does not know.

Options can only be set on a top-level `jax.jit`. `decode` called inside a caller's own
`jax.jit` compiles with the caller's options; on CPU pass ours:

    jax.jit(my_pipeline, compiler_options=jaxconsdec.compiler_options("cpu"))
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Optional

import jax

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # "" = no YNN fusion types


def compiler_options(platform: Optional[str] = None) -> dict[str, str]:
  """Options for `jax.jit(..., compiler_options=...)` on `platform` (default: JAX's default
  backend)."""
  platform = platform or jax.default_backend()
  if platform != "cpu":
    return {}
  return dict(CPU_OPTIONS) if _accepted(tuple(CPU_OPTIONS.items())) else {}


@functools.lru_cache(maxsize=None)
def _accepted(options: tuple[tuple[str, str], ...]) -> bool:
  """Whether this jaxlib's XLA:CPU knows the options. The YNN one is experimental: a jaxlib
  that drops or renames it refuses every program that names it ("No such compile option"),
  so it is probed once on a trivial program, and decoding falls back to XLA's defaults
  (slower on CPU, never wrong), saying so once."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(
        jax.ShapeDtypeStruct((), "float32")).compile()
    return True
  except Exception as e:  # jaxlib's error type for an unknown option has changed over time
    warnings.warn(f"this jaxlib's XLA:CPU does not accept {dict(options)} ({str(e)[:200]});"
                  " jaxconsdec compiles with XLA's default CPU options instead, which are"
                  " slower on this model's convolutions (benchmarks/conv_kernels.py)",
                  RuntimeWarning, stacklevel=3)
    return False


def platform_of(*args: Any) -> str:
  """The platform a top-level jit of `args` compiles for: that of the first committed
  `jax.Array` among them, else JAX's default backend."""
  for arg in args:
    if isinstance(arg, jax.Array) and not isinstance(arg, jax.core.Tracer):
      if getattr(arg, "committed", False):
        return next(iter(arg.sharding.device_set)).platform
  return jax.default_backend()


def is_traced(*trees: Any) -> bool:
  """Whether any leaf is a tracer, i.e. we are being called inside a caller's transform."""
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(trees))


def top_level_jit(fn, static_argnames: tuple[str, ...]):
  """platform -> `jax.jit(fn)` compiled with that platform's options, made once per platform.
  (The nestable `jax.jit(fn)` is the one to call inside a caller's transforms.)"""
  @functools.lru_cache(maxsize=None)
  def program(platform: str):
    return jax.jit(fn, static_argnames=static_argnames,
                   compiler_options=compiler_options(platform))
  return program


def program_for(nested, top_level, *args):
  """The program to run on `args`: the nestable one when a caller is tracing them, else the
  top-level one for their platform."""
  return nested if is_traced(*args) else top_level(platform_of(*args))
