"""How the training process holds host memory: freed memory is kept for reuse, not handed
back to the kernel.

Why. XLA:CPU allocates each execution's temporaries afresh: for one training step of the
released decoder that is one 2.9 GB block (the gradients, mostly; 64x64 crop, batch 1).
glibc serves a block that large with its own `mmap` and returns it with `munmap` when the step
ends, so the next step touches fresh pages again: about 760,000 page faults, each a kernel
entry and a zeroed page, 2-3 s of a 16 s step on a 2-core CPU (`benchmarks/train_speed.py`;
the `minflt` counter of `getrusage` shows them). With the settings below the block comes
from the heap and stays there, and every step after the first faults none.

The settings are glibc's `mallopt` ones, for the whole process: one malloc arena (a thread
that has its own arena still maps big blocks itself, whatever the other settings say), no
`mmap` for large blocks, and no trimming of the heap. The cost is that the process keeps
its peak host memory until it exits, which a training run reaches every step anyway.
They only govern threads that start after them, and XLA starts its CPU threads with the
JAX backend, so this must run before the first JAX computation: `jaxconsdec train` does so
first thing; a program that trains through `jaxconsdec.training.loop.train` calls it
itself, at start-up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
  """Applies the settings of this module's docstring; True if they took effect. A no-op
  returning False where the C library is not glibc (macOS, musl, Windows)."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc: no mallopt
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # mallopt's value is an int; glibc widens it to size_t, so -1 is "never trim".
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  return all(mallopt(param, value) == 1 for param, value in settings)
