"""The engine of every file-to-file job: inputs in, one output file per example, across every
device of every process.

`run_job(job, ...)` lists the inputs (headers only), skips what OUT_DIR already holds, groups
the rest by size (one compile per size, all before the work starts), and runs them in global
batches through the job's sharded program; each process reads and writes only its own rows.
A `Job` says what its inputs, program and outputs are (`DecodeJob`, `EncodeJob`).

Nothing is lost or half-written: every output is written under a temporary name, fsync-ed
and renamed into place, so an output that exists is complete. A re-run (after a crash,
SIGKILL, pre-emption) checks each existing output and does only what is missing or cut
short. Bad inputs are skipped with their reason, listed at the end and in
OUT_DIR/failures.json; with `strict` the job stops at the first one. Every output path is
checked to lie inside OUT_DIR (symlinked subfolders included) before anything is written.

Several processes: every decision that can fail or differ (the inputs each sees, OUT_DIR and
its manifest, a write error) is gathered (`multihost`) so that all processes stop together
with the same error instead of waiting forever in the next collective.

Noise: each example's key is derived from the seed and a 64-bit hash of its output name
(`example_keys_for`), so an output depends only on the settings, its input and its name:
not on the batch size, the device or host count, or what else the job holds. The scheme is
versioned in the manifest (NOISE_SCHEME).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
import socket
import stat
import sys
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
import tqdm

from jaxconsdec import multihost
from jaxconsdec.files import (TMP_PREFIX, UnsafePathError, is_inside, make_dirs_inside,
                              open_regular_for_append, path_component_problem,
                              read_json_object, write_atomic)
from jaxconsdec.inputs.listing import Failure, gather_failures
from jaxconsdec.jobs.latent_files import LATENT_ERRORS

MANIFEST = "jaxconsdec-job.json"
FAILURES = "failures.json"
MAX_MANIFEST_BYTES = 1 << 20

# How an example's noise key follows from the seed and its output name. 1: a 32-bit hash
# folded in once (collides among ~77k names, 50% odds). 2: a 64-bit hash, folded in as two
# 32-bit halves. Outputs of different schemes are never mixed in one OUT_DIR.
NOISE_SCHEME = 2


class JobMismatchError(ValueError):
  """OUT_DIR holds the outputs of a job with other settings."""


class ProcessesDisagreeError(ValueError):
  """The processes of one job list different inputs, so they cannot share its batches."""


# Errors that stop the job before any work, raised on every process together.
SETUP_ERRORS = (JobMismatchError, ProcessesDisagreeError, OSError)


@dataclasses.dataclass
class JobReport:
  total: int                  # examples found
  done_before: int            # already complete in OUT_DIR when the job started
  written: int                # written by this run (all processes)
  failures: list[Failure]
  seconds: float
  stopped: bool = False       # stopped early: strict mode at a bad input, or an environment error
  redone: int = 0             # outputs found cut short (a crash before they were flushed), redone
  hidden: int = 0             # dot-files and dot-folders skipped while walking input folders
  environment_error: Optional[str] = None  # what stopped the job (disk full, permission, I/O)


class Job:
  """What a job does; `run_job` does the rest. Items (what `list` returns) have `name` (the
  output's path in OUT_DIR, without extension), `where` (the input, for people) and `group`
  (items of one group share one program shape)."""
  program: Any            # a ShardedProgram
  extension: str          # of the outputs
  what: str               # one example, in words ("latent", "image")
  nonfinite: str = "it holds NaN or inf values"

  def settings(self) -> dict:
    """Everything that decides the outputs' values: recorded in OUT_DIR's manifest, and a
    re-run into the same OUT_DIR must match it."""
    raise NotImplementedError

  def list(self, inputs: Sequence[str], exclude: Sequence[str]):
    """-> a Listing (items, failures, hidden), reading headers only."""
    raise NotImplementedError

  def example_shape(self, group) -> tuple[int, ...]:
    raise NotImplementedError

  def reader(self):
    """An object with read(item) -> one example (numpy) and close()."""
    raise NotImplementedError

  def keys(self, names: Sequence[str]) -> jax.Array:
    raise NotImplementedError

  def check_first(self, examples: np.ndarray) -> None:
    """Looks at the first batch's examples (process 0): a place for warnings."""

  def output_complete(self, path: str, item) -> bool:
    raise NotImplementedError

  def encode_output(self, item, output: np.ndarray) -> bytes:
    raise NotImplementedError


def example_index(name: str) -> int:
  """A stable 64-bit hash of an example's output name."""
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def example_keys_for(names: Sequence[str], seed: int) -> jax.Array:
  """The noise keys of the examples called `names`: fold_in(fold_in(key(seed), hi), lo),
  with hi and lo the two 32-bit halves of `example_index(name)`. Shape (len(names),)."""
  index = np.array([example_index(n) for n in names], np.uint64)
  hi, lo = (index >> np.uint64(32)).astype(np.uint32), index.astype(np.uint32)
  base = jax.random.key(seed)
  return jax.vmap(lambda h, l: jax.random.fold_in(jax.random.fold_in(base, h), l))(hi, lo)


def run_job(job: Job, inputs: Sequence[str], out_dir: str, *, batch_size: int = 8,
            strict: bool = False, progress: bool = True) -> JobReport:
  """Runs `job` on every example of `inputs` into OUT_DIR. See the module docstring.

  Raises (on every process together) JobMismatchError if OUT_DIR holds another job's
  outputs, ProcessesDisagreeError if the processes see different inputs, OSError if OUT_DIR
  cannot be used. Errors while writing outputs stop the job and are reported in the
  JobReport (`environment_error`), not raised.
  """
  start = time.perf_counter()
  lead = jax.process_index() == 0
  listing = job.list(inputs, exclude=[out_dir])
  items, failures = listing.items, listing.failures
  _check_same_inputs(items, job.what)
  if strict and failures:
    return JobReport(len(items), 0, 0, failures, time.perf_counter() - start, stopped=True,
                     hidden=listing.hidden)
  with contextlib.ExitStack() as held:
    # Collectives between the steps. A folder of another job is refused before anything in
    # it is touched; then the lock, since two jobs in one OUT_DIR would each clear "a killed
    # run's temporaries" and delete the other's files in flight; every process clearing a
    # shared OUT_DIR must be done before any process writes the manifest (under a
    # temporary name).
    for prepare in (lambda d: os.path.isdir(d) and _check_manifest(d, job.settings()),
                    lambda d: held.enter_context(out_dir_lock(d)),
                    lambda d: _clear_out_dir(d, job.settings()),
                    lambda d: _write_manifest(d, job.settings())):
      error = None
      try:
        prepare(out_dir)
      except SETUP_ERRORS as e:
        error = e
      multihost.raise_together(error, SETUP_ERRORS)
    done, incomplete = _done_everywhere(out_dir, items, job)
    pending = [item for item, d in zip(items, done) if not d]
    groups = list(_by_group(pending).values())
    _compile_programs(job, groups, batch_size, lead)
    bar = _progress_bar(len(pending), job.what, enabled=progress and lead)
    written, stopped, environment_error = 0, False, None
    for group in groups:
      count, bad, stopped, environment_error = _run_group(job, group, out_dir, batch_size,
                                                          strict, bar, lead)
      written += count
      failures += bad
      if stopped:
        break
    bar.close()
    failures = gather_failures(failures)
    written = multihost.sum_over_processes(written)
    report = JobReport(len(items), int(sum(done)), written, failures, time.perf_counter() - start,
                       stopped, incomplete, listing.hidden, environment_error)
    # Each process writes the same list into its OUT_DIR (they may be one shared folder or one
    # per host); no collective follows, so a process that cannot write it hangs nobody.
    _write_failures(out_dir, failures, report)
    return report


def _check_same_inputs(items, what: str) -> None:
  """Every process must plan the same batches: compare what each one listed."""
  if jax.process_count() == 1:
    return
  digest = hashlib.sha256(json.dumps([(i.name, list(i.group)) for i in items]).encode())
  seen = multihost.gather_json([digest.hexdigest(), len(items)])
  if len({d for d, _ in seen}) > 1:
    counts = ", ".join(f"process {p}: {n}" for p, (_, n) in enumerate(seen))
    raise ProcessesDisagreeError(
        f"the processes see different inputs ({counts} {what}s, or the same number under"
        " other names). Every host must read the same input files: put them on shared"
        " storage or copy them identically to each host.")


def _batches(group: list, global_batch: int, program):
  """(items, size of the program's batch) for each step over one group: full global
  batches, then the rest padded only up to a multiple of the device count."""
  for first in range(0, len(group), global_batch):
    batch = group[first:first + global_batch]
    yield batch, program.global_batch(len(batch))


def _compile_programs(job: Job, groups, batch_size: int, lead: bool) -> None:
  """Compiles every program the job will run before the work starts, so that the progress
  bar's rate and time left count the work only."""
  global_batch = job.program.global_batch(batch_size)
  needed = sorted({(size, tuple(job.example_shape(group[0].group))) for group in groups
                   for _, size in _batches(group, global_batch, job.program)})
  if needed and lead:
    shapes = ", ".join(f"{size} x {'x'.join(map(str, shape))}" for size, shape in needed)
    print(f"compiling {len(needed)} program(s) (batch x {job.what} shape: {shapes})",
          file=sys.stderr)
  for size, shape in needed:
    job.program.compile(size, shape)


def _run_group(job: Job, group, out_dir, batch_size, strict, bar, lead):
  """Runs the pending examples of one group.

  -> (written here, failures here, stopped, environment error or None). Every
  `multihost.SYNC_EVERY` batches (every batch with one process) and at the end the
  processes agree whether to stop, so they leave the loop together. A process whose
  environment failed (a full disk) writes nothing more until then.
  """
  reader = job.reader()
  written, failures = 0, []
  environment_error, strict_stop = None, False  # this process's, until agreed
  shape = job.example_shape(group[0].group)
  try:
    for step, (batch, size) in enumerate(_batches(group, job.program.global_batch(batch_size),
                                                  job.program)):
      rows = job.program.local_rows(size)
      mine = batch[rows]
      n_rows = rows.stop - rows.start
      examples = np.zeros((n_rows, *shape), job.program.example_dtype)
      unreadable = {}
      for i, item in enumerate(mine):
        try:
          examples[i] = reader.read(item)
        except reader.errors as e:  # the file changed or broke after listing
          unreadable[i] = f"unreadable ({type(e).__name__}: {str(e)[:200]})"
      if step == 0 and lead:  # warnings show whether or not a progress bar does
        job.check_first(np.delete(examples[:len(mine)], list(unreadable), axis=0))
      names = [item.name for item in mine] + [""] * (n_rows - len(mine))
      outputs, finite, all_finite = job.program(examples, job.keys(names), size)
      for i, item in enumerate(mine):
        if i in unreadable:
          failures.append(Failure(item.where, unreadable[i]))
        elif not finite[i]:
          failures.append(Failure(item.where, job.nonfinite))
        elif not np.isfinite(outputs[i]).all():  # finite input, broken weights
          failures.append(Failure(item.where, NONFINITE_OUTPUT))
        elif environment_error is None:
          problem, environment_error = _write_output(out_dir, item, outputs[i], job)
          if problem:
            failures.append(Failure(item.where, problem))
          else:
            written += 1
      bar.update(len(batch))
      strict_stop = strict_stop or (strict and (not all_finite or bool(failures)))
      if multihost.sync_point(step):
        error, stop = _agree(environment_error, strict_stop)
        if error or stop:
          return written, failures, True, error
    error, stop = _agree(environment_error, strict_stop)
    return written, failures, bool(error or stop), error
  finally:
    reader.close()


def _agree(environment_error: Optional[str], strict_stop: bool):
  """(the first process's environment error or None, whether any process must stop): a
  collective."""
  views = multihost.gather_json([environment_error, bool(strict_stop)])
  errors = [error for error, _ in views if error]
  return (errors[0] if errors else None), any(stop for _, stop in views)


NONFINITE_OUTPUT = ("the output holds NaN or inf values, from a finite input: the weights are"
                    " broken (a training run that diverged?); nothing was written")


def output_path(out_dir: str, item, job: Job) -> str:
  return os.path.join(out_dir, f"{item.name}.{job.extension}")


# Write errors that concern one output's path, not the machine: that output is a listed
# failure and the job goes on. Any other OSError (disk full, quota, read-only file system,
# permission, I/O error) would fail every output alike, so it stops the job.
_PATH_ERRNOS = (errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EINVAL, errno.EXDEV)


def _write_output(out_dir, item, output, job: Job) -> tuple[Optional[str], Optional[str]]:
  """Writes one output inside OUT_DIR. -> (why this output failed, environment error)."""
  folder, base = os.path.split(item.name)
  try:
    if path_component_problem(base):  # listing guarantees this; never trust it blindly
      raise UnsafePathError(errno.EINVAL, path_component_problem(base), item.name)
    directory = make_dirs_inside(out_dir, folder) if folder else out_dir
    write_atomic(os.path.join(directory, f"{base}.{job.extension}"),
                 job.encode_output(item, output))
    return None, None
  except OSError as e:
    where = e.filename or os.path.join(out_dir, item.name)
    message = f"cannot write {where}: {e.strerror or e}"
    if isinstance(e, UnsafePathError) or e.errno in _PATH_ERRNOS:
      return message, None
    return message, message


def npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array.astype(np.float32))
  return buffer.getvalue()


def _by_group(items: list) -> dict:
  groups: dict = {}
  for item in items:
    groups.setdefault(item.group, []).append(item)
  return groups


LOCK_PREFIX = ".jaxconsdec-lock-"


@contextlib.contextmanager
def out_dir_lock(out_dir: str):
  """An exclusive lock on OUT_DIR for this process of the job, held while the job runs: the
  file `.jaxconsdec-lock-P` (P: the process index), so the processes of one multi-host job
  share a folder and a second job's process P is refused. flock is released when a process
  dies, so a killed job leaves no stale lock; the file is removed at the end."""
  import fcntl
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{LOCK_PREFIX}{jax.process_index()}")
  while True:
    handle = open_regular_for_append(path)
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.close()
      raise JobMismatchError(
          f"another jaxconsdec job is writing into {out_dir} ({_holder(path)}). Two jobs in"
          " one OUT_DIR would delete each other's files in flight: wait for it to end, stop"
          " it, or use another -o") from None
    try:
      same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:  # not a file its last holder removed while this process was opening it
      break
    handle.close()
  try:
    handle.truncate(0)
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "command": " ".join(sys.argv)[:500],
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    handle.flush()
    yield
  finally:
    try:
      os.unlink(path)
    except FileNotFoundError:
      pass
    handle.close()


def _holder(path: str) -> str:
  try:
    info = read_json_object(path, 4096)
    return (f"process {info.get('pid')} on {info.get('host')}, since {info.get('started')}:"
            f" {info.get('command')}")
  except (OSError, ValueError):
    return "its holder is unknown"


def _clear_out_dir(out_dir: str, settings: dict) -> None:
  """Creates OUT_DIR, checks its manifest if it has one (so that a folder of another job is
  refused before anything in it is touched), and clears a killed run's temporary files.
  Every process does this for its own OUT_DIR (one shared folder, or one per host)."""
  os.makedirs(out_dir, exist_ok=True)
  _check_manifest(out_dir, settings)
  _remove_temporaries(out_dir)


def _write_manifest(out_dir: str, settings: dict) -> None:
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.lexists(path):
    write_atomic(path, json.dumps(_manifest(settings), indent=2, sort_keys=True).encode())


def _manifest(settings: dict) -> dict:
  return {"jaxconsdec_job": 1, **settings}


def _check_manifest(out_dir: str, settings: dict) -> None:
  """Refuses an OUT_DIR whose manifest is not this job's; one without a manifest passes."""
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.lexists(path):
    return
  ours = _manifest(settings)
  try:
    theirs = read_json_object(path, MAX_MANIFEST_BYTES)
  except (OSError, ValueError) as e:
    raise JobMismatchError(f"{path} is unreadable ({e}): OUT_DIR holds something that is not"
                           " a jaxconsdec job. Use another -o, or delete that file.")
  diffs = [f"{k}: {theirs.get(k)!r} there, {v!r} now" for k, v in ours.items()
           if theirs.get(k) != v]
  if diffs:
    raise JobMismatchError(
        f"{out_dir} holds outputs of a job with other settings ({'; '.join(diffs)}). Mixing"
        " them would give a set of outputs that no single run produces: use another -o, or"
        " delete the folder to start over.")


def _remove_temporaries(out_dir: str) -> None:
  for root, _, files in os.walk(out_dir):
    for f in files:
      if f.startswith(TMP_PREFIX):
        try:
          os.unlink(os.path.join(root, f))
        except FileNotFoundError:  # another process sharing OUT_DIR removed it first
          pass


def _done_everywhere(out_dir: str, items: list, job: Job) -> tuple[list[bool], int]:
  """Which outputs are complete, OR-ed over processes (each may have its own OUT_DIR), so
  every process plans the same batches; and how many were found cut short (to be redone)."""
  states = [_output_state(out_dir, item, job) for item in items]
  done = multihost.or_over_processes(np.array([s == "complete" for s in states], bool))
  cut = multihost.or_over_processes(np.array([s == "incomplete" for s in states], bool))
  return done.tolist(), int((cut & ~done).sum())


def _output_state(out_dir: str, item, job: Job) -> str:
  """'complete', 'absent', or 'incomplete' (present but not a whole output of this shape)."""
  path = output_path(out_dir, item, job)
  try:
    mode = os.lstat(path).st_mode
  except OSError:
    return "absent"
  if not stat.S_ISREG(mode) or not is_inside(os.path.dirname(path), out_dir):
    return "incomplete"
  try:
    return "complete" if job.output_complete(path, item) else "incomplete"
  except LATENT_ERRORS:  # an output cut short (a PNG's or an NPY's header): written again
    return "incomplete"


def _write_failures(out_dir: str, failures: list[Failure], report: JobReport) -> None:
  """OUT_DIR/failures.json describes the latest run; a clean run removes a stale one."""
  path = os.path.join(out_dir, FAILURES)
  try:
    if failures:
      blob = json.dumps({"count": len(failures), "stopped_by": report.environment_error,
                         "failures": [f.to_json() for f in failures]}, indent=2)
      write_atomic(path, blob.encode())
    elif os.path.exists(path):
      os.unlink(path)
  except FileNotFoundError:
    pass
  except OSError:
    if report.environment_error is None:  # otherwise the report already says what broke
      raise


def _progress_bar(total: int, what: str, enabled: bool) -> tqdm.tqdm:
  """done / total, per second and time left (tqdm): redrawn in place on a terminal, a line
  every 10 s in a log file."""
  stream = sys.stderr  # looked up now: it may have been replaced since import
  tty = hasattr(stream, "isatty") and stream.isatty()
  return tqdm.tqdm(total=total, disable=not enabled or total == 0, unit=what,
                   file=stream if tty else _LogLines(stream), mininterval=0.5 if tty else 10,
                   dynamic_ncols=tty, ascii=not tty)


class _LogLines(io.TextIOBase):
  """tqdm redraws its line with carriage returns; in a log each redraw is a line of its own."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, text: str) -> int:
    line = text.replace("\r", "").strip()
    if line:
      self.stream.write(line + "\n")
      self.stream.flush()
    return len(text)

  def flush(self) -> None:
    self.stream.flush()
