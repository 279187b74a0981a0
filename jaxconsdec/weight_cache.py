"""The weights cache: a name (`named_weights`) is fetched and converted once; every later use
loads the converted checkpoint, without the network and without reading the source again.

    CACHE/weights/            CACHE: $JAXCONSDEC_CACHE, else $XDG_CACHE_HOME/jaxconsdec,
                              else ~/.cache/jaxconsdec
      entries/KEY/            a jaxconsdec checkpoint. KEY: a hash of the source files'
                              SHA-256 and the converter's version, so one conversion serves
                              every name of the same bytes, and a new converter converts anew
      names/H.json            a name (H: a hash of its canonical spelling) -> its entry
      downloads/H/            a CDN file while it downloads (FILE.part: resumed by the next
                              run); removed once its entry exists
      locks/H                 held while a name is fetched and converted

A name is resolved once: a branch (`@main`, the default) is not looked up again. To take a
newer revision, `jaxconsdec cache clear NAME`, or name the revision.

Two processes resolving the same name at once: the first takes the name's lock, the other
waits for it and then finds the entry; an entry is written by `checkpoint.save` (a temporary
folder renamed into place) and a name file by `write_atomic`, so neither is ever seen half
made. Processes of a multi-host job may share the cache on one file system, or have one
cache per host; the lock (`flock`) serves both. Hub files stay in huggingface_hub's own cache
(HF_HOME), which this module never deletes from except to drop a file that failed its hash.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
from typing import Callable, Optional

from jaxconsdec import checkpoint
from jaxconsdec.config import UNetConfig, VAEConfig
from jaxconsdec.conversion import CONVERTER_VERSION, convert_files
from jaxconsdec.files import read_json_object, write_atomic
from jaxconsdec.named_weights import Name, fetch, parse

_KEY = re.compile(r"^[0-9a-f]{32}$")


def cache_root() -> str:
  """Where jaxconsdec keeps what it caches (the weights here, the CLI's compiled programs)."""
  return (os.environ.get("JAXCONSDEC_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxconsdec"))


def _folder(*parts: str) -> str:
  return os.path.join(cache_root(), "weights", *parts)


def _hash(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()[:32]


def _settings(config, vae_config) -> str:
  """The architectures given for a name's files, as text ("" for the files' own)."""
  given = {k: v.to_json() for k, v in (("config", config), ("vae_config", vae_config))
           if v is not None}
  return json.dumps(given, sort_keys=True) if given else ""


def _record_path(name: Name, settings: str) -> str:
  return _folder("names", _hash(name.text + settings) + ".json")


def entry_key(sources: list[str], settings: str = "") -> str:
  """The cache key of what `sources` convert to: their bytes, the architectures given for
  them, and the converter's version."""
  from jaxconsdec.convert.formats import sha256_of
  return _hash(json.dumps({"converter": CONVERTER_VERSION, "settings": settings,
                           "sources": [sha256_of(s) for s in sources]}))


def resolve(text: str, *, config: Optional[UNetConfig] = None,
            vae_config: Optional[VAEConfig] = None, progress: bool = False,
            say: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> str:
  """The checkpoint folder the name `text` stands for: from the cache, or fetched,
  converted and cached now. config, vae_config: the architectures, for files that do not
  describe themselves (as `convert --config`). Raises named_weights.UnknownNameError (the
  name is wrong, or offline and not cached), downloads.DownloadError (the network), OSError
  (the disk)."""
  name = parse(text)
  if name is None:
    raise ValueError(f"{text} is not a weights name")
  settings = _settings(config, vae_config)
  found = _cached(name, settings)
  if found:
    return found
  os.makedirs(_folder("locks"), exist_ok=True)
  with open(_folder("locks", _hash(name.text)), "a") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      say(f"waiting for another process that is fetching {name.text}")
      fcntl.flock(lock, fcntl.LOCK_EX)
    found = _cached(name, settings)  # made by the process that held the lock
    return found or _fetch_and_convert(name, settings, config, vae_config, progress, say)


def _cached(name: Name, settings: str) -> Optional[str]:
  """The entry a name file points at, if both are whole; None for anything else (a missing,
  unreadable or foreign name file is a miss, and is rewritten on the next fetch)."""
  try:
    record = read_json_object(_record_path(name, settings))
  except (OSError, ValueError):
    return None
  key = record.get("entry")
  if (record.get("name"), record.get("settings")) != (name.text, settings) or (
      not isinstance(key, str) or not _KEY.match(key)):
    return None
  entry = _folder("entries", key)
  try:
    checkpoint.read_meta(entry)
  except (OSError, checkpoint.CheckpointError):
    return None
  return entry


def _fetch_and_convert(name: Name, settings: str, config, vae_config, progress: bool,
                       say) -> str:
  downloads = _folder("downloads", _hash(name.text))
  files = fetch(name, downloads, progress=progress, say=say)
  key = entry_key(files, settings)
  entry = _folder("entries", key)
  try:
    checkpoint.read_meta(entry)
    say(f"{name.text}: the same bytes as a cached entry, converted before")
  except (OSError, checkpoint.CheckpointError):
    say(f"converting {name.text} into the cache (once)")
    os.makedirs(_folder("entries"), exist_ok=True)
    convert_files(files, entry, config=config, vae_config=vae_config,
                  force=os.path.lexists(entry), say=say)
  from jaxconsdec.convert.formats import sha256_of
  record = {"name": name.text, "settings": settings, "entry": key,
            "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "sources": [{"file": os.path.basename(f), "sha256": sha256_of(f)} for f in files]}
  os.makedirs(_folder("names"), exist_ok=True)
  write_atomic(_record_path(name, settings), json.dumps(record, indent=2).encode())
  shutil.rmtree(downloads, ignore_errors=True)  # converted: the CDN file is not needed again
  return entry


@dataclasses.dataclass(frozen=True)
class Entry:
  """One thing in the cache, for `jaxconsdec cache list`."""
  kind: str            # "entry", "download" (a partial CDN file) or "unreadable"
  names: tuple         # the names that resolve to it
  path: str
  size: int


def entries() -> list[Entry]:
  """Everything the weights cache holds, with its size on disk."""
  by_key: dict[str, list[str]] = {}
  unreadable = []
  names_dir = _folder("names")
  for file in sorted(os.listdir(names_dir)) if os.path.isdir(names_dir) else ():
    path = os.path.join(names_dir, file)
    try:
      record = read_json_object(path)
      shown = str(record["name"]) + (" (with its own --config)" if record.get("settings")
                                     else "")
      by_key.setdefault(str(record["entry"]), []).append(shown)
    except (OSError, ValueError, KeyError):
      unreadable.append(Entry("unreadable", (), path, _size(path)))
  found = []
  entries_dir = _folder("entries")
  for key in sorted(os.listdir(entries_dir)) if os.path.isdir(entries_dir) else ():
    path = os.path.join(entries_dir, key)
    found.append(Entry("entry", tuple(by_key.get(key, ())), path, _size(path)))
  downloads_dir = _folder("downloads")
  for key in sorted(os.listdir(downloads_dir)) if os.path.isdir(downloads_dir) else ():
    path = os.path.join(downloads_dir, key)
    found.append(Entry("download", (), path, _size(path)))
  return found + unreadable


def clear(text: Optional[str] = None) -> list[Entry]:
  """Removes one name (every record of it, whatever --config it was used with) and the
  entries no other name needs, or everything in the weights cache; returns what went."""
  if text is None:
    removed = entries()
    shutil.rmtree(_folder(), ignore_errors=True)
    return removed
  name = parse(text)
  if name is None:
    raise ValueError(f"{text} is not a weights name")
  removed, keys, kept_keys = [], set(), set()
  names_dir = _folder("names")
  for file in sorted(os.listdir(names_dir)) if os.path.isdir(names_dir) else ():
    path = os.path.join(names_dir, file)
    try:
      record = read_json_object(path)
    except (OSError, ValueError):
      continue
    if record.get("name") == name.text:
      keys.add(record.get("entry"))
      os.remove(path)
    else:
      kept_keys.add(record.get("entry"))
  for e in entries():
    key = os.path.basename(e.path)
    if (e.kind == "entry" and key in keys and key not in kept_keys) or (
        e.kind == "download" and key == _hash(name.text)):
      removed.append(e)
      shutil.rmtree(e.path)
  return removed


def _size(path: str) -> int:
  if os.path.isfile(path) or os.path.islink(path):
    return os.lstat(path).st_size
  total = 0
  for folder, _, files in os.walk(path):
    for file in files:
      try:
        total += os.lstat(os.path.join(folder, file)).st_size
      except OSError as e:
        if e.errno != errno.ENOENT:
          raise
  return total
