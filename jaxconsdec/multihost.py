"""Decisions that every process of a multi-host job must take together.

In a multi-controller JAX job each process runs the same program and meets the others in
collectives. A decision taken on one process alone (an error raised, a loop left early)
leaves the others waiting in the next collective forever. So every decision that can differ
between processes is first gathered here, and every process acts on the same answer.
With one process these are plain local operations.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import jax
import numpy as np


def gather_json(value: Any) -> list[Any]:
  """Every process's JSON-serialisable `value`, in process order (a collective)."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils
  blob = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int64(len(blob))))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:len(blob)] = blob
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(row[:int(n)].tobytes()) for n, row in zip(sizes, gathered)]


def or_over_processes(flags: np.ndarray) -> np.ndarray:
  """Element-wise OR of a bool array of the same shape on every process (a collective)."""
  if jax.process_count() == 1:
    return np.asarray(flags, bool)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(flags, bool))).any(axis=0)


def sum_over_processes(value: int) -> int:
  return int(sum(gather_json(int(value))))


# Iterations of a loop between its processes' agreements (stop requests, errors). Each is two
# small allgathers across hosts, a round trip that would hold up every step of a fast loop,
# so a process that fails or is asked to stop carries on to the next sync point, at most
# this many iterations on. One process agrees with itself at every iteration, for free.
SYNC_EVERY = 10


def sync_point(index: int) -> bool:
  """Whether iteration `index` (0-based) of a loop that every process runs alike ends at a
  sync point."""
  return jax.process_count() == 1 or (index + 1) % SYNC_EVERY == 0


def agree(flag: bool, error: Optional[BaseException],
          kinds: Sequence[type[BaseException]]) -> bool:
  """Whether `flag` is set on any process, after raising on every process if `error` is set
  on any (a collective).

  The process that failed re-raises its own exception; the others raise one of the same
  kind (the first of `kinds` it is an instance of, else RuntimeError), saying which process
  failed and why, so all of them stop at the same point with the same exit status.
  """
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return bool(flag)
  report = None
  if error is not None:
    report = [[k.__name__ for k in type(error).__mro__], str(error)]
  views = gather_json([bool(flag), report])
  if error is not None:
    raise error
  for process, (_, report) in enumerate(views):
    if report is not None:
      names, message = report
      kind = next((k for k in kinds if k.__name__ in names), RuntimeError)
      raise kind(f"process {process} stopped the job: {message}")
  return any(flag for flag, _ in views)


def raise_together(error: Optional[BaseException],
                   kinds: Sequence[type[BaseException]]) -> None:
  """Raises on every process if `error` is set on any (a collective); see `agree`."""
  agree(False, error, kinds)
