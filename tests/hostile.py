"""Helpers for the hostile-input tests: running the CLI as a user would (a child process whose
peak memory is measured), and checking that nothing was written or deleted where it must
not be."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

from jaxconsdec.files import TMP_PREFIX


@dataclasses.dataclass
class Run:
  code: int          # exit status
  out: str
  err: str
  peak_rss: int      # bytes: the child's peak resident memory after it started (VmHWM)


# The child sets its limit itself, before importing anything (no preexec_fn: forking a
# process that runs JAX's threads is unsafe), and records its own peak RSS when it exits:
# VmHWM belongs to the address space that exec created, while rusage's ru_maxrss would also
# count the forking test process's pages.
_CHILD = """
import atexit, resource, runpy, sys
limit, report = {limit!r}, {report!r}
if limit is not None:
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
def peak():
  with open("/proc/self/status") as f:
    kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
  with open(report, "w") as f:
    f.write(str(kib * 1024))
if report:
  atexit.register(peak)
sys.argv[0] = "jaxconsdec"
runpy.run_module("jaxconsdec.cli", run_name="__main__")
"""


def cli_command(*args, file_size_limit=None, peak_report=None) -> list[str]:
  """argv that runs `jaxconsdec ARGS`. file_size_limit: RLIMIT_FSIZE, so a write past it
  fails with EFBIG as it would on a full disk (Python ignores SIGXFSZ, so the write returns
  an error). peak_report: a file the child writes its peak RSS (bytes) into at exit."""
  code = _CHILD.format(limit=file_size_limit, report=peak_report)
  return [sys.executable, "-c", code, *map(str, args)]


def run_cli(*args, file_size_limit=None, timeout=300, env=None) -> Run:
  """Runs `jaxconsdec ARGS` as a user would, in a child process (see cli_command)."""
  env = dict(os.environ if env is None else env, JAX_PLATFORMS="cpu")
  with tempfile.TemporaryDirectory() as scratch:
    report = os.path.join(scratch, "peak")
    try:
      proc = subprocess.run(cli_command(*args, file_size_limit=file_size_limit,
                                        peak_report=report),
                            env=env, text=True, stdin=subprocess.DEVNULL, capture_output=True,
                            timeout=timeout)
    except subprocess.TimeoutExpired as e:
      raise AssertionError(f"jaxconsdec {' '.join(map(str, args))} hung:\n{e.stderr}")
    peak = int(open(report).read()) if os.path.exists(report) else -1
    return Run(proc.returncode, proc.stdout, proc.stderr, peak)


def snapshot(root, skip=()):
  """{relative path: (kind, size, mtime)} of everything under `root`, except under `skip`."""
  skip = [os.path.abspath(s) for s in skip]
  out = {}
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if os.path.abspath(os.path.join(folder, d)) not in skip]
    for name in dirs + files:
      path = os.path.join(folder, name)
      info = os.lstat(path)
      out[os.path.relpath(path, root)] = (info.st_mode >> 12, info.st_size, info.st_mtime_ns)
  return out


def leftovers(root, ignore=()):
  """Temporary files or folders of ours anywhere under `root` (but the paths in `ignore`)."""
  found = []
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(folder, name)
      if (name.startswith(TMP_PREFIX) or ".tmp-" in name) and path not in map(str, ignore):
        found.append(path)
  return found


def npy_header_only(path, shape, data_bytes, dtype="<f4"):
  """An .npy file whose header declares `shape` but which holds `data_bytes` bytes of data."""
  with open(path, "wb") as f:
    np.lib.format.write_array_header_1_0(
        f, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
    f.write(b"\0" * data_bytes)
  return str(path)


def npz_with_names(path, arrays: dict):
  """An .npz whose members are named exactly as given (np.savez would refuse some names)."""
  with zipfile.ZipFile(path, "w") as z:
    for name, array in arrays.items():
      buffer = io.BytesIO()
      np.save(buffer, array)
      z.writestr(name + ".npy", buffer.getvalue())
  return str(path)


def deflate_bomb_npz(path, name, shape):
  """An .npz with one deflated member of zeros: tiny on disk, huge once read."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    with z.open(name + ".npy", "w", force_zip64=True) as f:
      np.lib.format.write_array_header_1_0(
          f, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)})
      block = b"\0" * (1 << 24)
      left = int(np.prod(shape)) * 4
      while left:
        f.write(block[:min(left, len(block))])
        left -= min(left, len(block))
  return str(path)
