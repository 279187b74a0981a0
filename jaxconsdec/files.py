"""Every file jaxconsdec reads or writes goes through here: regular files only, outputs kept
inside their folder, written atomically and durably, with the modes an ordinary tool gives.

- Inputs are opened with `open_regular`: a FIFO, device, socket or folder is refused *before*
  reading (opening a FIFO for reading would block forever, /dev/zero never ends).
- Outputs are written by `write_atomic`: a temporary file beside the target, flushed and
  fsync-ed, renamed into place, then the folder fsync-ed, so after a crash an output is
  either absent or complete. Temporary files and folders are created with mode 0666/0777
  and the process umask applied, as `open()` and `mkdir` do (mkstemp's 0600 would survive
  the rename and make every output private).
- `make_dirs_inside` creates the folders of an output path one at a time and refuses any
  that is, or resolves through a symlink to, a place outside the root.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
from typing import BinaryIO

TMP_PREFIX = ".jaxconsdec-tmp-"  # what a killed writer can leave behind; safe to delete


class NotRegularFileError(OSError):
  """A path names a FIFO, device, socket or folder where a regular file is needed."""


class UnsafePathError(OSError):
  """An output path would leave its root folder (a name with separators, a symlink...)."""


def kind_of(mode: int) -> str:
  """What a stat mode is, in words."""
  for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"),
                     (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                     (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
    if test(mode):
      return name
  return "not a regular file"


def check_regular(path: str) -> os.stat_result:
  """stat (following links) and refuse anything but a regular file."""
  info = os.stat(path)
  if not stat.S_ISREG(info.st_mode):
    raise NotRegularFileError(errno.EINVAL, f"{kind_of(info.st_mode)}, not a regular file", path)
  return info


def open_regular(path: str) -> BinaryIO:
  """Opens a regular file for binary reading; refuses anything else without blocking.

  O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer; fstat on
  the open descriptor then decides, so the file cannot be swapped between check and read.
  """
  fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
  return _regular(fd, path, "rb")


def open_regular_for_append(path: str) -> BinaryIO:
  """Opens (or creates) a regular file for appending; refuses anything else without
  blocking. A FIFO with no reader fails to open at once (ENXIO) under O_NONBLOCK, where a
  plain open would wait for a reader forever."""
  flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
  try:
    fd = os.open(path, flags, 0o666)
  except OSError as e:
    if e.errno == errno.ENXIO:
      raise NotRegularFileError(errno.EINVAL, "a FIFO, not a regular file", path) from None
    raise
  return _regular(fd, path, "ab")


def _regular(fd: int, path: str, mode: str) -> BinaryIO:
  """The open descriptor `fd` as a blocking file object, if it is a regular file."""
  try:
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
      raise NotRegularFileError(errno.EINVAL, f"{kind_of(kind)}, not a regular file", path)
    os.set_blocking(fd, True)
    return os.fdopen(fd, mode)
  except BaseException:
    os.close(fd)
    raise


def os_error_in(error: BaseException) -> int | None:
  """The OS error number a tensorstore error carries (Orbax reports a failed write, disk
  full or quota or permission, as a ValueError holding `os_error_code=N`), else None."""
  import re
  code = re.search(r"os_error_code='?(\d+)", str(error))
  return int(code.group(1)) if code else None


def contents(folder: str) -> str:
  """What a folder holds, in a few words for an error message: "3 entries (a, b, c)"."""
  entries = sorted(os.listdir(folder))
  shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
  return f"{len(entries)} entries ({shown or 'none'})"


def read_json_object(path: str, max_bytes: int = 16 << 20) -> dict:
  """A small JSON object from a regular file. Raises OSError, or ValueError if the file is
  larger than `max_bytes`, not JSON, or not an object."""
  with open_regular(path) as f:
    text = f.read(max_bytes + 1)
  if len(text) > max_bytes:
    raise ValueError(f"larger than {max_bytes:,} bytes")
  value = json.loads(text)
  if not isinstance(value, dict):
    raise ValueError("not a JSON object")
  return value


def fsync_dir(path: str) -> None:
  """Makes a rename or creation inside folder `path` durable."""
  fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def fsync_tree(root: str) -> None:
  """fsyncs every file and folder under `root` (for trees written by other libraries)."""
  for folder, _, files in os.walk(root):
    for name in files:
      fd = os.open(os.path.join(folder, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    fsync_dir(folder)


def _temp_name(directory: str, prefix: str) -> str:
  return os.path.join(directory, prefix + secrets.token_hex(6))


def make_temp_dir(parent: str, prefix: str) -> str:
  """A new empty folder in `parent`, mode 0777 less the umask (mkdtemp would give 0700)."""
  for _ in range(100):
    path = _temp_name(parent, prefix)
    try:
      os.mkdir(path, 0o777)
      return path
    except FileExistsError:
      continue
  raise FileExistsError(errno.EEXIST, "no free temporary name", parent)


def write_atomic(path: str, data: bytes) -> None:
  """Writes `data` to `path` so that `path` is never seen half-written, even after a crash.

  The temporary file is created beside `path` (same filesystem, so the rename is atomic),
  mode 0666 less the umask; its content is fsync-ed before the rename and the folder after.
  """
  directory = os.path.dirname(os.path.abspath(path))
  flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
  for _ in range(100):
    tmp = _temp_name(directory, TMP_PREFIX)
    try:
      fd = os.open(tmp, flags, 0o666)
      break
    except FileExistsError:
      continue
  else:
    raise FileExistsError(errno.EEXIST, "no free temporary name", directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    raise
  fsync_dir(directory)


def path_component_problem(name: str) -> str | None:
  """Why `name` cannot be used as one file name inside a folder, or None if it can.

  Refused: empty, '.', '..', separators of any platform, NUL and other control characters,
  and more than 200 bytes (file systems allow 255; an extension is appended).
  """
  if not name:
    return "the name is empty"
  if name in (".", ".."):
    return f"the name {name!r} refers to a folder"
  bad = sorted({c for c in name if c in "/\\" or ord(c) < 32 or ord(c) == 127})
  if bad:
    return f"the name {name!r} contains {', '.join(repr(c) for c in bad)}"
  if len(name.encode("utf-8", "surrogateescape")) > 200:
    return f"the name is {len(name.encode('utf-8', 'surrogateescape'))} bytes long (200 at most)"
  return None


def is_inside(path: str, root: str) -> bool:
  """Whether `path` resolves (symlinks followed) to `root` or somewhere below it."""
  real, real_root = os.path.realpath(path), os.path.realpath(root)
  return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def make_dirs_inside(root: str, relative: str) -> str:
  """Creates the folders of `relative` under `root`, one at a time, and returns the last.

  Raises UnsafePathError if `relative` is absolute or climbs out, or if any folder on the
  way is (or resolves through a symlink to) a place outside `root`: each is checked before
  anything is created inside it, so nothing is ever made outside `root`.
  """
  parts = [p for p in relative.split(os.sep) if p]
  if os.path.isabs(relative) or any(path_component_problem(p) for p in parts):
    raise UnsafePathError(errno.EINVAL, "not a plain relative path", relative)
  current = root
  for part in parts:
    current = os.path.join(current, part)
    try:
      os.mkdir(current, 0o777)
    except FileExistsError:
      pass
    if not is_inside(current, root):
      raise UnsafePathError(errno.EXDEV, f"{current} leads outside {root} (a symlink?)", current)
    if not os.path.isdir(current):
      raise UnsafePathError(errno.ENOTDIR, f"{current} exists and is not a folder", current)
  return current
