"""The batch job: latent files in, image files out, across every device of every process.

`run_job` lists the inputs (headers only), skips what OUT_DIR already holds, groups the rest
by latent size (one compile per size), and decodes them in global batches with a
`ShardedDecoder`; each process reads and writes only its own rows of each batch.

Nothing is lost or half-written: every output is written under a temporary name, fsync-ed
and renamed into place, so an output that exists is complete. A re-run (after a crash,
SIGKILL, pre-emption) checks each existing output (a PNG must end with its IEND chunk, an
NPY must hold all the bytes its header declares) and does only what is missing or cut
short. Bad inputs are skipped with their reason, listed at the end and in
OUT_DIR/failures.json; with `strict` the job stops at the first one. Every output path is
checked to lie inside OUT_DIR (symlinked subfolders included) before anything is written.

Several processes: every decision that can fail or differ (the inputs each sees, OUT_DIR and
its manifest, a write error) is gathered (`multihost`) so that all processes stop together
with the same error instead of waiting forever in the next collective.

Noise: each example's key is derived from the seed and a 64-bit hash of its output name
(`example_key`), so an image depends only on (weights, seed, schedule, its latent, its
name): not on the batch size, the device or host count, or what else the job holds. Adding
latents and re-running is fine. The scheme is versioned in the manifest (NOISE_SCHEME).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import stat
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np
import tqdm

from jaxconsdec import multihost
from jaxconsdec.files import (TMP_PREFIX, UnsafePathError, is_inside, make_dirs_inside,
                              path_component_problem, read_json_object, write_atomic)
from jaxconsdec.images import encode_png, png_is_complete, to_uint8
from jaxconsdec.latent_files import (DEFAULT_MAX_PIXELS, Failure, LatentItem, LatentReader,
                                     list_latents, read_headers)
from jaxconsdec.sampler import UPSAMPLE
from jaxconsdec.sharded import ShardedDecoder

MANIFEST = "jaxconsdec-job.json"
FAILURES = "failures.json"
FORMATS = ("png", "npy")
MAX_MANIFEST_BYTES = 1 << 20


# How an example's noise key follows from the seed and its output name. 1: a 32-bit hash
# folded in once (collides among ~77k names, 50% odds). 2: a 64-bit hash, folded in as two
# 32-bit halves. Outputs of different schemes are never mixed in one OUT_DIR.
NOISE_SCHEME = 2


@dataclasses.dataclass(frozen=True)
class JobSettings:
  """What decides the outputs' values; a re-run into the same OUT_DIR must match it."""
  weights: str                # identity of the weights, by content (see cli._weights_arg)
  seed: int
  schedule: tuple[float, ...]
  scaled_latents: bool
  format: str = "png"
  layout: str = "NCHW"
  noise_scheme: int = NOISE_SCHEME


class JobMismatchError(ValueError):
  """OUT_DIR holds the outputs of a job with other settings."""


class ProcessesDisagreeError(ValueError):
  """The processes of one job list different inputs, so they cannot share its batches."""


# Errors that stop the job before any work, raised on every process together.
SETUP_ERRORS = (JobMismatchError, ProcessesDisagreeError, OSError)


@dataclasses.dataclass
class JobReport:
  total: int                  # latents found
  done_before: int            # already complete in OUT_DIR when the job started
  decoded: int                # written by this run (all processes)
  failures: list[Failure]
  seconds: float
  stopped: bool = False       # stopped early: strict mode at a bad input, or an environment error
  redone: int = 0             # outputs found cut short (a crash before they were flushed), redone
  hidden: int = 0             # dot-files and dot-folders skipped while walking input folders
  environment_error: Optional[str] = None  # what stopped the job (disk full, permission, I/O)


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


def run_job(decoder: ShardedDecoder, inputs: Sequence[str], out_dir: str,
            settings: JobSettings, *, batch_size: int = 8, strict: bool = False,
            progress: bool = True, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> JobReport:
  """Decodes every latent of `inputs` into OUT_DIR. See the module docstring.

  Raises (on every process together) JobMismatchError if OUT_DIR holds another job's
  outputs, ProcessesDisagreeError if the processes see different inputs, OSError if OUT_DIR
  cannot be used. Errors while writing outputs stop the job and are reported in the
  JobReport (`environment_error`), not raised.
  """
  if settings.format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {settings.format!r}")
  start = time.perf_counter()
  lead = jax.process_index() == 0
  listing = list_latents(inputs, layout=settings.layout, config=decoder.config,
                         max_pixels=max_pixels, exclude=[out_dir])
  items, failures = listing.items, listing.failures
  _check_same_inputs(items)
  if strict and failures:
    return JobReport(len(items), 0, 0, failures, time.perf_counter() - start, stopped=True,
                     hidden=listing.hidden)
  error = None
  try:
    _prepare_out_dir(out_dir, settings)
  except SETUP_ERRORS as e:
    error = e
  multihost.raise_together(error, SETUP_ERRORS)
  done, incomplete = _done_everywhere(out_dir, items, settings)
  pending = [item for item, d in zip(items, done) if not d]
  groups = list(_by_size(pending).values())
  _compile_programs(decoder, groups, settings, batch_size, lead)
  bar = _progress_bar(len(pending), enabled=progress and lead)
  decoded, stopped, environment_error = 0, False, None
  for group in groups:
    count, bad, stopped, environment_error = _decode_group(decoder, group, out_dir, settings,
                                                           batch_size, strict, bar, lead)
    decoded += count
    failures += bad
    if stopped:
      break
  bar.close()
  failures = _gather_failures(failures)
  decoded = multihost.sum_over_processes(decoded)
  report = JobReport(len(items), int(sum(done)), decoded, failures, time.perf_counter() - start,
                     stopped, incomplete, listing.hidden, environment_error)
  # Each process writes the same list into its OUT_DIR (they may be one shared folder or one
  # per host); no collective follows, so a process that cannot write it hangs nobody.
  _write_failures(out_dir, failures, report)
  return report


def _check_same_inputs(items: list[LatentItem]) -> None:
  """Every process must plan the same batches: compare what each one listed."""
  if jax.process_count() == 1:
    return
  digest = hashlib.sha256(json.dumps([(i.name, i.hw) for i in items]).encode()).hexdigest()
  seen = multihost.gather_json([digest, len(items)])
  if len({d for d, _ in seen}) > 1:
    counts = ", ".join(f"process {p}: {n}" for p, (_, n) in enumerate(seen))
    raise ProcessesDisagreeError(
        f"the processes see different inputs ({counts} latents, or the same number under"
        " other names). Every host must read the same input files: put them on shared"
        " storage or copy them identically to each host.")


def _batches(group: list[LatentItem], global_batch: int, decoder: ShardedDecoder):
  """(items, size of the program's batch) for each step over one size group: full global
  batches, then the rest padded only up to a multiple of the device count."""
  for first in range(0, len(group), global_batch):
    batch = group[first:first + global_batch]
    yield batch, decoder.global_batch(len(batch))


def _latent_shape(hw: tuple[int, int], settings: JobSettings,
                  config) -> tuple[int, int, int]:
  c = config.latent_channels
  return (c, *hw) if settings.layout == "NCHW" else (*hw, c)


def _compile_programs(decoder, groups, settings, batch_size, lead) -> None:
  """Compiles every program the job will run before decoding starts, so that the progress
  bar's rate and time left count decoding only."""
  global_batch = decoder.global_batch(batch_size)
  needed = {(size, group[0].hw) for group in groups
            for _, size in _batches(group, global_batch, decoder)}
  if needed and lead:
    shapes = ", ".join(f"{size} x {h}x{w}" for size, (h, w) in sorted(needed))
    print(f"compiling {len(needed)} program(s) (batch x latent size: {shapes})",
          file=sys.stderr)
  for size, hw in sorted(needed):
    decoder.compile(size, _latent_shape(hw, settings, decoder.config))


def _decode_group(decoder, group, out_dir, settings, batch_size, strict, bar, lead):
  """Decodes the pending latents of one size.

  -> (written here, failures here, stopped, environment error or None). After each batch
  the processes agree whether to stop, so they leave the loop together.
  """
  reader = LatentReader()
  written, failures = 0, []
  try:
    for step, (batch, size) in enumerate(_batches(group, decoder.global_batch(batch_size),
                                                  decoder)):
      rows = decoder.local_rows(size)
      mine = batch[rows]
      n_rows = rows.stop - rows.start
      latents, unreadable = _read_rows(reader, mine, settings, n_rows, group[0], decoder.config)
      if step == 0 and lead:  # the warning shows whether or not a progress bar does
        _warn_if_scale_looks_wrong(latents[:len(mine)], settings.scaled_latents, decoder.config)
      names = [item.name for item in mine] + [""] * (n_rows - len(mine))
      keys = example_keys_for(names, settings.seed)
      images, finite, all_finite = decoder(latents, keys, size)
      environment_error = None
      for i, item in enumerate(mine):
        if i in unreadable:
          failures.append(Failure(item.where, unreadable[i]))
        elif not finite[i]:
          failures.append(Failure(item.where, "the latent holds NaN or inf values"))
        elif environment_error is None:
          problem, environment_error = _write_output(out_dir, item, images[i], settings)
          if problem:
            failures.append(Failure(item.where, problem))
          else:
            written += 1
      bar.update(len(batch))
      errors = [e for e in multihost.gather_json(environment_error) if e]
      if errors:
        return written, failures, True, errors[0]
      if strict and (not all_finite or multihost.any_process(bool(failures))):
        return written, failures, True, None
    return written, failures, False, None
  finally:
    reader.close()


def _read_rows(reader, mine, settings, n_rows, like, config):
  """This process's latents of one batch, padded with zeros to n_rows. A row that cannot be
  read becomes NaN, so the program flags it on every process (strict mode agrees to stop)."""
  latents = np.zeros((n_rows, *_latent_shape(like.hw, settings, config)), np.float32)
  unreadable = {}
  for i, item in enumerate(mine):
    try:
      latents[i] = reader.read(item)
    except Exception as e:  # the file changed or broke after listing
      latents[i] = np.nan
      unreadable[i] = f"unreadable ({type(e).__name__}: {str(e)[:200]})"
  if settings.scaled_latents:  # pipeline latents -> raw: / scaling_factor + shift_factor
    latents = latents / config.scaling_factor + config.shift_factor
  return latents, unreadable


def _warn_if_scale_looks_wrong(latents: np.ndarray, scaled: bool, config) -> None:
  """Passing pipeline latents for raw ones (or the reverse) is the most common mistake, and
  gives washed-out or burnt images. Raw latents spread like the decoder's statistics divided
  by the scaling factor (SD 1.x: std near 5.5); pipeline latents near 1."""
  finite = latents[np.isfinite(latents)]
  if finite.size < 64:
    return
  expected = float(np.sqrt(np.mean(np.square(config.latent_std) + np.square(config.latent_mean)))
                   / config.scaling_factor)
  std = float(finite.std())
  if std < expected / 2.2:
    advice = ("--scaled-latents may be dividing raw latents a second time" if scaled else
              "if they are pipeline latents (before / vae.config.scaling_factor), pass"
              " --scaled-latents")
  elif std > expected * 2.7:
    advice = ("if they are raw latents, drop --scaled-latents" if scaled else
              "are they in another unit?")
  else:
    return
  print(f"WARNING: the latents have std {std:.2f} as the decoder sees them, raw latents of"
        f" its latent space about {expected:.1f}: {advice}", file=sys.stderr)


def output_path(out_dir: str, item: LatentItem, fmt: str) -> str:
  return os.path.join(out_dir, f"{item.name}.{fmt}")


# Write errors that concern one output's path, not the machine: that output is a listed
# failure and the job goes on. Any other OSError (disk full, quota, read-only file system,
# permission, I/O error) would fail every output alike, so it stops the job.
_PATH_ERRNOS = (errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EINVAL, errno.EXDEV)


def _write_output(out_dir, item, image, settings) -> tuple[Optional[str], Optional[str]]:
  """Writes one output inside OUT_DIR. -> (why this output failed, environment error)."""
  folder, base = os.path.split(item.name)
  try:
    if path_component_problem(base):  # listing guarantees this; never trust it blindly
      raise UnsafePathError(errno.EINVAL, path_component_problem(base), item.name)
    directory = make_dirs_inside(out_dir, folder) if folder else out_dir
    path = os.path.join(directory, f"{base}.{settings.format}")
    if settings.format == "png":
      hwc = image.transpose(1, 2, 0) if settings.layout == "NCHW" else image
      data = encode_png(to_uint8(hwc))
    else:
      buffer = io.BytesIO()
      np.save(buffer, image.astype(np.float32))
      data = buffer.getvalue()
    write_atomic(path, data)
    return None, None
  except OSError as e:
    where = e.filename or os.path.join(out_dir, item.name)
    message = f"cannot write {where}: {e.strerror or e}"
    if isinstance(e, UnsafePathError) or e.errno in _PATH_ERRNOS:
      return message, None
    return message, message


def _by_size(items: list[LatentItem]) -> dict[tuple[int, int], list[LatentItem]]:
  groups: dict[tuple[int, int], list[LatentItem]] = {}
  for item in items:
    groups.setdefault(item.hw, []).append(item)
  return groups


def _prepare_out_dir(out_dir: str, settings: JobSettings) -> None:
  """Creates OUT_DIR, checks or writes its manifest, clears a killed run's temporary files.
  Every process does this for its own OUT_DIR (one shared folder, or one per host)."""
  os.makedirs(out_dir, exist_ok=True)
  _check_manifest(out_dir, settings)
  _remove_temporaries(out_dir)


def _check_manifest(out_dir: str, settings: JobSettings) -> None:
  path = os.path.join(out_dir, MANIFEST)
  ours = {"jaxconsdec_job": 1, **dataclasses.asdict(settings)}
  ours["schedule"] = list(settings.schedule)
  if not os.path.lexists(path):
    write_atomic(path, json.dumps(ours, indent=2, sort_keys=True).encode())
    return
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
        " them would give a set of images that no single run produces: use another -o, or"
        " delete the folder to start over.")


def _remove_temporaries(out_dir: str) -> None:
  for root, _, files in os.walk(out_dir):
    for f in files:
      if f.startswith(TMP_PREFIX):
        try:
          os.unlink(os.path.join(root, f))
        except FileNotFoundError:  # another process sharing OUT_DIR removed it first
          pass


def _done_everywhere(out_dir: str, items: list[LatentItem],
                     settings: JobSettings) -> tuple[list[bool], int]:
  """Which outputs are complete, OR-ed over processes (each may have its own OUT_DIR), so
  every process plans the same batches; and how many were found cut short (to be redone)."""
  states = [_output_state(out_dir, item, settings) for item in items]
  done = multihost.or_over_processes(np.array([s == "complete" for s in states], bool))
  cut = multihost.or_over_processes(np.array([s == "incomplete" for s in states], bool))
  return done.tolist(), int((cut & ~done).sum())


def _output_state(out_dir: str, item: LatentItem, settings: JobSettings) -> str:
  """'complete', 'absent', or 'incomplete' (present but not a whole output of this shape)."""
  path = output_path(out_dir, item, settings.format)
  try:
    mode = os.lstat(path).st_mode
  except OSError:
    return "absent"
  if not stat.S_ISREG(mode) or not is_inside(os.path.dirname(path), out_dir):
    return "incomplete"
  h, w = UPSAMPLE * item.hw[0], UPSAMPLE * item.hw[1]
  if settings.format == "png":
    return "complete" if png_is_complete(path, w, h) else "incomplete"
  want = (3, h, w) if settings.layout == "NCHW" else (h, w, 3)
  try:
    [header] = read_headers(path)  # checks the header's size against the file's
  except Exception:
    return "incomplete"
  ok = header.shape == want and header.dtype == np.float32 and not header.fortran
  return "complete" if ok else "incomplete"


def _gather_failures(failures: list[Failure]) -> list[Failure]:
  """Every process's failures, in process order. Listing failures are seen by every process,
  so they are kept once."""
  out, seen = [], set()
  for process_failures in multihost.gather_json([f.to_json() for f in failures]):
    for f in process_failures:
      key = (f["input"], f["reason"])
      if key not in seen:
        seen.add(key)
        out.append(Failure(f["input"], f["reason"]))
  return out


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


def _progress_bar(total: int, enabled: bool) -> tqdm.tqdm:
  """images done / total, images/s and time left (tqdm): redrawn in place on a terminal,
  a line every 10 s in a log file."""
  stream = sys.stderr  # looked up now: it may have been replaced since import
  tty = hasattr(stream, "isatty") and stream.isatty()
  return tqdm.tqdm(total=total, disable=not enabled or total == 0, unit="image",
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
