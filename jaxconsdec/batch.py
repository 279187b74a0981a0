"""The batch job: latent files in, image files out, across every device of every process.

`run_job` lists the inputs (headers only), skips what OUT_DIR already holds, groups the rest
by latent size (one compile per size), and decodes them in global batches with a
`ShardedDecoder`; each process reads and writes only its own rows of each batch.

Nothing is lost or half-written: every output is written under a temporary name and renamed
into place, so an output that exists is complete, and a re-run (after a crash, SIGKILL,
pre-emption) does only what is missing. Bad inputs are skipped with their reason, listed at
the end and in OUT_DIR/failures.json; with `strict` the job stops at the first one.

Noise: the CLI's example index is a 32-bit hash of the example's output name, so an image
depends only on (weights, seed, schedule, its latent, its name): not on the batch size, the
device or host count, or what else the job holds. Adding latents and re-running is fine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np

from jaxconsdec.images import TMP_PREFIX, encode_png, to_uint8, write_atomic
from jaxconsdec.latent_files import Failure, LatentItem, LatentReader, list_latents
from jaxconsdec.sampler import LATENT_CHANNELS, LATENT_SCALE
from jaxconsdec.sharded import ShardedDecoder

MANIFEST = "jaxconsdec-job.json"
FAILURES = "failures.json"
FORMATS = ("png", "npy")


@dataclasses.dataclass(frozen=True)
class JobSettings:
  """What decides the outputs' values; a re-run into the same OUT_DIR must match it."""
  weights: str                # identity of the weights (checkpoint metadata hash, file, ...)
  seed: int
  schedule: tuple[float, ...]
  scaled_latents: bool
  format: str = "png"
  layout: str = "NCHW"


class JobMismatchError(ValueError):
  """OUT_DIR holds the outputs of a job with other settings."""


@dataclasses.dataclass
class JobReport:
  total: int                  # latents found
  done_before: int            # already in OUT_DIR when the job started
  decoded: int                # written by this run (all processes)
  failures: list[Failure]
  seconds: float
  stopped: bool = False       # strict mode stopped at a bad input


def example_index(name: str) -> int:
  """The example's global index for noise: a stable 32-bit hash of its output name."""
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def run_job(decoder: ShardedDecoder, inputs: Sequence[str], out_dir: str,
            settings: JobSettings, *, batch_size: int = 8, strict: bool = False,
            progress: bool = True) -> JobReport:
  if settings.format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {settings.format!r}")
  start = time.perf_counter()
  lead = jax.process_index() == 0
  items, failures = list_latents(inputs, layout=settings.layout, channels=LATENT_CHANNELS,
                                 size_multiple=decoder.config.downsample_factor)
  if strict and failures:
    return JobReport(len(items), 0, 0, failures, time.perf_counter() - start, stopped=True)
  os.makedirs(out_dir, exist_ok=True)
  _check_manifest(out_dir, settings, write=lead)
  if lead:
    _remove_temporaries(out_dir)  # before the first collective below: nobody writes yet
  done = _done_everywhere(out_dir, items, settings.format)
  pending = [item for item, d in zip(items, done) if not d]
  bar = _Progress(len(pending), enabled=progress and lead)
  decoded, stopped = 0, False
  for group in _by_size(pending).values():
    count, bad, stopped = _decode_group(decoder, group, out_dir, settings, batch_size, strict,
                                        bar)
    decoded += count
    failures += bad
    if stopped:
      break
  bar.close()
  if jax.process_count() > 1:
    failures = _gather_failures(failures)
  if lead:
    _write_failures(out_dir, failures)
  decoded = _sum_over_processes(decoded)
  return JobReport(len(items), int(sum(done)), decoded, failures, time.perf_counter() - start,
                   stopped)


def _decode_group(decoder, group, out_dir, settings, batch_size, strict, bar):
  """Decodes the pending latents of one size. -> (written here, failures here, stopped)."""
  global_batch = decoder.global_batch(batch_size)
  rows = decoder.local_rows(global_batch)
  reader = LatentReader()
  written, failures = 0, []
  for first in range(0, len(group), global_batch):
    batch = group[first:first + global_batch]
    mine = batch[rows]
    latents, unreadable = _read_rows(reader, mine, settings, rows.stop - rows.start, group[0])
    if first == 0 and bar.enabled:
      _warn_if_scale_looks_wrong(latents[:len(mine)], settings.scaled_latents)
    indices = [example_index(item.name) for item in mine]
    indices += [0] * (rows.stop - rows.start - len(indices))
    images, finite, all_finite = decoder(latents, indices, settings.seed, global_batch)
    for i, item in enumerate(mine):
      if i in unreadable:
        failures.append(Failure(item.where, unreadable[i]))
      elif not finite[i]:
        failures.append(Failure(item.where, "the latent holds NaN or inf values"))
      else:
        _write_output(out_dir, item, images[i], settings)
        written += 1
    bar.update(len(batch))
    if strict and not all_finite:
      return written, failures, True
  return written, failures, False


def _read_rows(reader, mine, settings, n_rows, like):
  """This process's latents of one batch, padded with zeros to n_rows. A row that cannot be
  read becomes NaN, so the program flags it on every process (strict mode agrees to stop)."""
  shape = (LATENT_CHANNELS, *like.hw) if settings.layout == "NCHW" else (*like.hw, LATENT_CHANNELS)
  latents = np.zeros((n_rows, *shape), np.float32)
  unreadable = {}
  for i, item in enumerate(mine):
    try:
      latents[i] = reader.read(item)
    except Exception as e:  # the file changed or broke after listing
      latents[i] = np.nan
      unreadable[i] = f"unreadable ({type(e).__name__}: {str(e)[:200]})"
  if settings.scaled_latents:
    latents /= LATENT_SCALE  # pipeline latents are raw latents * 0.18215
  return latents, unreadable


def _warn_if_scale_looks_wrong(latents: np.ndarray, scaled: bool) -> None:
  """Raw SD latents have a std near 1/0.18215 = 5.5; pipeline-scaled ones near 1. Passing one
  for the other is the most common mistake, and gives washed-out or burnt images."""
  finite = latents[np.isfinite(latents)]
  if finite.size < 64:
    return
  std = float(finite.std())
  if std < 2.5:
    advice = ("--scaled-latents may be dividing raw latents a second time" if scaled else
              "if they are pipeline latents (before / vae.config.scaling_factor), pass"
              " --scaled-latents")
  elif std > 15:
    advice = ("if they are raw latents, drop --scaled-latents" if scaled else
              "are they in another unit?")
  else:
    return
  print(f"WARNING: the latents have std {std:.2f} as the decoder sees them, raw SD latents"
        f" about 5.5: {advice}", file=sys.stderr)


def output_path(out_dir: str, item: LatentItem, fmt: str) -> str:
  return os.path.join(out_dir, f"{item.name}.{fmt}")


def _write_output(out_dir, item, image, settings) -> None:
  path = output_path(out_dir, item, settings.format)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if settings.format == "png":
    hwc = image.transpose(1, 2, 0) if settings.layout == "NCHW" else image
    write_atomic(path, encode_png(to_uint8(hwc)))
  else:
    buffer = io.BytesIO()
    np.save(buffer, image.astype(np.float32))
    write_atomic(path, buffer.getvalue())


def _by_size(items: list[LatentItem]) -> dict[tuple[int, int], list[LatentItem]]:
  groups: dict[tuple[int, int], list[LatentItem]] = {}
  for item in items:
    groups.setdefault(item.hw, []).append(item)
  return groups


def _check_manifest(out_dir: str, settings: JobSettings, write: bool) -> None:
  path = os.path.join(out_dir, MANIFEST)
  ours = {"jaxconsdec_job": 1, **dataclasses.asdict(settings)}
  ours["schedule"] = list(settings.schedule)
  if os.path.exists(path):
    with open(path) as f:
      theirs = json.load(f)
    diffs = [f"{k}: {theirs.get(k)!r} there, {v!r} now" for k, v in ours.items()
             if theirs.get(k) != v]
    if diffs:
      raise JobMismatchError(
          f"{out_dir} holds outputs of a job with other settings ({'; '.join(diffs)}). Mixing"
          " them would give a set of images that no single run produces: use another -o, or"
          " delete the folder to start over.")
  elif write:
    write_atomic(path, json.dumps(ours, indent=2, sort_keys=True).encode())


def _remove_temporaries(out_dir: str) -> None:
  for root, _, files in os.walk(out_dir):
    for f in files:
      if f.startswith(TMP_PREFIX):
        os.unlink(os.path.join(root, f))


def _done_everywhere(out_dir: str, items: list[LatentItem], fmt: str) -> list[bool]:
  """Which outputs exist, OR-ed over processes (each may have its own OUT_DIR), so every
  process plans the same batches."""
  done = np.array([os.path.exists(output_path(out_dir, item, fmt)) for item in items], bool)
  if jax.process_count() > 1 and len(items):
    from jax.experimental import multihost_utils
    done = np.asarray(multihost_utils.process_allgather(done)).any(axis=0)
  return done.tolist()


def _sum_over_processes(value: int) -> int:
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return int(np.asarray(multihost_utils.process_allgather(np.int64(value))).sum())


def _gather_failures(failures: list[Failure]) -> list[Failure]:
  """Every process's failures, in process order. Listing failures are seen by every process,
  so they are kept once."""
  from jax.experimental import multihost_utils
  blob = json.dumps([f.to_json() for f in failures]).encode()
  sizes = np.asarray(multihost_utils.process_allgather(np.int64(len(blob))))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:len(blob)] = np.frombuffer(blob, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  out, seen = [], set()
  for size, row in zip(sizes, gathered):
    for f in json.loads(row[:int(size)].tobytes()):
      key = (f["input"], f["reason"])
      if key not in seen:
        seen.add(key)
        out.append(Failure(f["input"], f["reason"]))
  return out


def _write_failures(out_dir: str, failures: list[Failure]) -> None:
  """OUT_DIR/failures.json describes the latest run; a clean run removes a stale one."""
  path = os.path.join(out_dir, FAILURES)
  if failures:
    blob = json.dumps({"count": len(failures), "failures": [f.to_json() for f in failures]},
                      indent=2)
    write_atomic(path, blob.encode())
  elif os.path.exists(path):
    os.unlink(path)


class _Progress:
  """images done / total, images/s, time left: redrawn in place on a terminal, a line every
  10 s otherwise (logs)."""

  def __init__(self, total: int, enabled: bool, stream=sys.stderr):
    self.total, self.enabled, self.stream = total, enabled and total > 0, stream
    self.done, self.start, self.last = 0, time.perf_counter(), 0.0
    self.tty = hasattr(stream, "isatty") and stream.isatty()

  def update(self, n: int) -> None:
    self.done += n
    now = time.perf_counter()
    if not self.enabled or (not self.tty and now - self.last < 10 and self.done < self.total):
      return
    self.last = now
    rate = self.done / max(now - self.start, 1e-9)
    left = (self.total - self.done) / rate if rate else float("inf")
    line = (f"{self.done}/{self.total} images  {rate:.2f} images/s  "
            f"{_duration(left)} left")
    self.stream.write(("\r" + line.ljust(60)) if self.tty else line + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.enabled and self.tty:
      self.stream.write("\n")


def _duration(seconds: float) -> str:
  if seconds == float("inf"):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else (
      f"{seconds // 60}m{seconds % 60:02d}s")
