"""A file over plain HTTP(S), streamed to disk, resumed after a cut, checked by SHA-256.

The bytes go to `DEST.part`, fsync-ed as they come. A cut connection leaves that file in
place, so the next call asks only for the rest (an HTTP range request); a server that
ignores the range sends the whole file again, which is taken from the start. The finished
file is renamed to DEST only once its SHA-256 is the one expected; a file whose hash differs
(corrupted in flight, or a server that sends something else) is removed and refused.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional

CHUNK = 1 << 20
TIMEOUT_S = 60  # a server silent this long is treated as a cut connection


class DownloadError(OSError):
  """The download did not complete: no network, a cut connection, a corrupted file. Trying
  again may work (exit status 3 in the command)."""


class NotOnServerError(ValueError):
  """The server has no such file (HTTP 404 or 410): the name is wrong (exit status 2)."""


def download(url: str, dest: str, sha256: str, *, progress: bool = False) -> str:
  """DEST, holding the file at `url` whose SHA-256 is `sha256` (hex)."""
  if os.path.isfile(dest) and _sha256_of(dest) == sha256:
    return dest
  part = dest + ".part"
  if os.path.islink(part) or (os.path.lexists(part) and not os.path.isfile(part)):
    os.remove(part)  # not what this function writes: never written through, never read
  done = os.path.getsize(part) if os.path.isfile(part) else 0
  host = urllib.parse.urlsplit(url).netloc
  request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
  try:
    response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
  except urllib.error.HTTPError as e:
    if e.code == 416 and done:  # the part already holds the whole file
      return _finish(part, dest, sha256, url)
    if e.code in (404, 410):
      raise NotOnServerError(f"{url}: the server has no such file (HTTP {e.code})") from None
    raise DownloadError(f"{url}: the server answered HTTP {e.code} {e.reason}; try again"
                        " later") from None
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, "reason", e)
    raise DownloadError(f"cannot reach {host} ({reason}). Check the network connection;"
                        " a name already in jaxconsdec's cache loads without one") from None
  with response:
    if response.status != 206:
      done = 0  # the whole file, from its first byte
    total = _total_size(response, done)
    mode = "ab" if done else "wb"
    with open(part, mode) as out:
      hasher = _hash_of_part(part, done) if done else hashlib.sha256()
      bar = _progress_bar(total, done, os.path.basename(dest)) if progress else None
      try:
        while True:
          chunk = response.read(CHUNK)
          if not chunk:
            break
          out.write(chunk)
          hasher.update(chunk)
          done += len(chunk)
          if bar is not None:
            bar.update(len(chunk))
      except (http.client.HTTPException, socket.timeout, ConnectionError):
        pass  # a cut connection: what came is kept, and the size check below tells
      finally:
        out.flush()
        os.fsync(out.fileno())
        if bar is not None:
          bar.close()
  if total is not None and done != total:  # without a length, the hash below decides
    raise DownloadError(f"the download of {url} was cut at {done:,} of {total:,} bytes. Run"
                        " the same command again: it resumes from there")
  return _finish(part, dest, sha256, url, hasher.hexdigest())


def _finish(part: str, dest: str, sha256: str, url: str,
            digest: Optional[str] = None) -> str:
  digest = digest or _sha256_of(part)
  if digest != sha256:
    os.remove(part)
    raise DownloadError(f"the file downloaded from {url} has SHA-256 {digest}, not the"
                        f" {sha256} it must have: it was corrupted on the way, or the server"
                        " sent another file. It was deleted; run the same command again to"
                        " download it afresh")
  os.replace(part, dest)
  return dest


def _total_size(response, start: int) -> Optional[int]:
  length = response.headers.get("Content-Length")
  return start + int(length) if length and length.isdigit() else None


def _hash_of_part(path: str, size: int):
  hasher = hashlib.sha256()
  with open(path, "rb") as f:
    left = size
    while left:
      chunk = f.read(min(CHUNK, left))
      if not chunk:
        break
      hasher.update(chunk)
      left -= len(chunk)
  return hasher


def _sha256_of(path: str) -> str:
  return _hash_of_part(path, os.path.getsize(path)).hexdigest()


def _progress_bar(total: Optional[int], done: int, name: str):
  from tqdm import tqdm
  return tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
              desc=name, file=sys.stderr)
