"""The inputs of a job: files given or found in folders, each with the output name it gets.

A folder is walked in sorted order; its tree is mirrored in the output names (DIR/sub/x.npy
-> sub/x). Dot-files and dot-folders are skipped and counted, the job's own OUT_DIR is never
walked into, and an output name used twice is a listed failure. Only the file's name is
looked at here; opening it (regular files only) is the reader's business.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from jaxconsdec.files import path_component_problem

# The largest image a job reads or writes unless told otherwise: 2048x2048 (a 256x256
# latent). The released model needs ~55 GiB of device memory for it in float32
# (benchmarks/memory.py).
DEFAULT_MAX_PIXELS = 2048 * 2048


@dataclasses.dataclass(frozen=True)
class Failure:
  input: str
  reason: str

  def to_json(self) -> dict:
    return {"input": self.input, "reason": self.reason}


@dataclasses.dataclass
class Listing:
  items: list[Any]            # every example to run, in a stable order
  failures: list[Failure]     # every input (file, array) refused, with its reason
  hidden: int = 0             # dot-files and dot-folders skipped while walking folders


def shown(path: str) -> str:
  """A path as it can be printed and written to JSON: bytes that are not UTF-8 (held as
  surrogates by Python) appear as backslash escapes."""
  return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def name_problem(stem: str) -> str | None:
  """Why an input's output name (its path below the folder given, less the extension)
  cannot name outputs, grids and report rows; None if it can."""
  for part in stem.split(os.sep):
    try:
      part.encode("utf-8")
    except UnicodeEncodeError:
      return f"the name {shown(part)!r} is not valid UTF-8"
    problem = path_component_problem(part)
    if problem:
      return problem
  return None


def files(inputs: Sequence[str], extensions: tuple[str, ...], what: str, listing: Listing,
          exclude: Sequence[str] = ()):
  """(path, output stem) of every input file with one of `extensions` (any case), folders
  walked in sorted order; what is not one (a `what`, in words) is a failure in `listing`,
  and so is a file whose name cannot name its outputs (`name_problem`)."""
  for path, stem in _candidates(inputs, extensions, what, listing, exclude):
    problem = name_problem(stem)
    if problem:
      listing.failures.append(Failure(shown(path), f"{problem}: rename the file"))
    else:
      yield path, stem


def _candidates(inputs, extensions, what, listing, exclude):
  excluded = {os.path.realpath(p) for p in exclude}
  wanted = lambda name: name.lower().endswith(extensions)
  for given in inputs:
    if os.path.isdir(given) and os.path.realpath(given) in excluded:
      listing.failures.append(Failure(shown(given), "this is the job's own output folder"))
    elif os.path.isdir(given):
      found = 0
      for root, dirs, names in os.walk(given):
        kept = []
        for d in sorted(dirs):
          if d.startswith("."):
            listing.hidden += 1
          elif os.path.realpath(os.path.join(root, d)) not in excluded:
            kept.append(d)
        dirs[:] = kept
        for f in sorted(names):
          if f.startswith("."):
            listing.hidden += 1
          elif wanted(f):
            path = os.path.join(root, f)
            found += 1
            yield path, os.path.splitext(os.path.relpath(path, given))[0]
      if not found:
        listing.failures.append(
            Failure(shown(given), f"directory holds no {', '.join(extensions)} files"))
    elif not os.path.exists(given):
      listing.failures.append(Failure(shown(given), "no such file or directory" + (
          " (a symlink to a missing target)" if os.path.islink(given) else "")))
    elif not wanted(given):
      listing.failures.append(
          Failure(shown(given), f"not {what}: expected {', '.join(extensions)}"))
    else:
      yield given, os.path.splitext(os.path.basename(given))[0]


def gather_failures(failures: list[Failure]) -> list[Failure]:
  """Every process's failures, in process order, each (input, reason) once: what every
  process sees (a listing) is not repeated. A collective: every process calls it."""
  from jaxconsdec import multihost  # JAX: not imported by the listing itself
  out, seen = [], set()
  for process_failures in multihost.gather_json([f.to_json() for f in failures]):
    for f in process_failures:
      key = (f["input"], f["reason"])
      if key not in seen:
        seen.add(key)
        out.append(Failure(f["input"], f["reason"]))
  return out


def drop_name_clashes(items: list, failures: list[Failure]) -> list:
  """Keeps the first item of each output name; the others are failures."""
  seen: dict = {}
  kept = []
  for item in items:
    if item.name in seen:
      failures.append(Failure(item.where, f"its output name {item.name!r} is already taken by"
                                          f" {seen[item.name].where}; rename one input"))
    else:
      seen[item.name] = item
      kept.append(item)
  return kept


def unreadable(path: str, error: Exception, size_error: type = ()) -> str:
  """Why a file could not be read, in words."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror  # e.g. "a FIFO (named pipe), not a regular file", "Permission denied"
  if os.path.isfile(path) and os.path.getsize(path) == 0:
    return "empty file"
  if size_error and isinstance(error, size_error):
    return str(error)
  return f"unreadable ({type(error).__name__}: {str(error)[:200]})"
