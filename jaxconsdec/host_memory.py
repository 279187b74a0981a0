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

What is kept is also what setting up a run freed: the compiler's working memory, the
initial weights' copies, the first evaluation. A training step's temporaries are one block
(8 GB for the released decoder at 256x256), which those scattered holes cannot hold, so the
heap grows past them and the process would keep both. `release_free_memory` hands the free
pages back to the kernel once, before the first step; the trainer calls it there.

A freed step's block is also not always whole when the next step asks for it: whatever the
host allocates between two steps (the next rows, the metrics) can be carved out of it, and
the next block then comes from fresh pages, the heap one step's temporaries larger (6.5 GiB
for the released decoder at 256x256, which took a 24 GB machine to its limit in its second
step). So where the memory available before the first step cannot hold two steps'
temporaries (`cannot_grow_by`), the trainer hands the free pages back after each step: the
next block faults in afresh, within what is there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Optional

# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


@functools.lru_cache(maxsize=None)
def _libc():
  """glibc, or None where the C library is another (macOS, musl, Windows)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc's, absent elsewhere)
  except (OSError, AttributeError):
    return None
  libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
  return libc


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
  """Applies the settings of this module's docstring; True if they took effect. A no-op
  returning False where the C library is not glibc (macOS, musl, Windows)."""
  libc = _libc()
  if libc is None:
    return False
  # mallopt's value is an int; glibc widens it to size_t, so -1 is "never trim".
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  return all(libc.mallopt(param, value) == 1 for param, value in settings)


def release_free_memory() -> None:
  """Hands the pages of every free heap block back to the kernel (glibc's `malloc_trim`);
  the blocks stay the process's and fault back in when reused. A no-op without glibc."""
  libc = _libc()
  if libc is not None:
    libc.malloc_trim(0)


class _Mallinfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in (
      "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
      "fordblks", "keepcost")]


def heap_bytes() -> Optional[tuple[int, int]]:
  """glibc's heap: (bytes in use, bytes free but kept by the process), or None without
  glibc 2.33's `mallinfo2`."""
  libc = _libc()
  if libc is None or not hasattr(libc, "mallinfo2"):
    return None
  libc.mallinfo2.restype = _Mallinfo2
  m = libc.mallinfo2()
  return m.uordblks + m.hblkhd, m.fordblks


def available_bytes() -> Optional[int]:
  """What can still be allocated without swapping: Linux's MemAvailable, or less where this
  process's cgroup (v2: a container's memory limit) leaves less; None off Linux."""
  machine = _read_bytes("/proc/meminfo", "MemAvailable:", 1024)
  limit = _read_bytes("/sys/fs/cgroup/memory.max")  # "max" (no limit) reads as None
  used = _read_bytes("/sys/fs/cgroup/memory.current")
  if machine is not None and limit is not None and used is not None:
    return min(machine, max(0, limit - used))
  return machine


def _read_bytes(path: str, key: str = "", unit: int = 1) -> Optional[int]:
  """The number on the line of `path` that starts with `key` (the first line when no key),
  times `unit`; None when the file, the line or the number is missing."""
  try:
    with open(path) as f:
      for line in f:
        if line.startswith(key):
          return int(line[len(key):].split()[0]) * unit
  except (OSError, ValueError, IndexError):
    pass
  return None


def short_of(needed: Optional[int]) -> bool:
  """Whether the machine has less memory available than `needed` bytes (False when either
  is unknown)."""
  available = available_bytes()
  return needed is not None and available is not None and available < needed


def cannot_grow_by(temporaries: Optional[int]) -> bool:
  """Whether a process whose steps each allocate `temporaries` bytes (None: not on the host)
  should hand its free pages back after each step: the memory available now, before the
  first step, cannot hold the step's block twice (once, and once more where the heap grows
  past a block that was split between steps)."""
  return temporaries is not None and short_of(2 * temporaries)
