"""jaxconsdec checkpoints: an Orbax param tree plus the UNetConfig and provenance as JSON.

    OUT_DIR/
      jaxconsdec.json   {"format_version", "config", "provenance"}
      params/           Orbax StandardCheckpointer: the UNet param tree
      extras/           Orbax, optional: tensors the file carried beside the UNet (SD encoder)

Writing: into a temporary folder beside OUT_DIR (mode 0777 less the umask, like any folder
a tool makes), every file fsync-ed, then renamed into place, so after any failure, Ctrl-C or
crash there is either the complete checkpoint at OUT_DIR or nothing, and nothing beside it.
`force=True` replaces only what is recognisably a jaxconsdec checkpoint.

Reading: the stored shapes are checked against the checkpoint's own config before any array
is read, and arrays are restored onto the current default device (or the sharding asked
for), never onto whatever device the checkpoint was saved from.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import threading
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxconsdec.config import CONSISTENCY_DECODER, UNetConfig
from jaxconsdec.files import fsync_dir, fsync_tree, make_temp_dir, read_json_object
from jaxconsdec.weights import abstract_params, check_params, params_from_torch

FORMAT_VERSION = 1
META = "jaxconsdec.json"
MAX_META_BYTES = 16 << 20


class CheckpointError(ValueError):
  """A checkpoint folder is missing, foreign, truncated or does not match its config."""


class NotACheckpointError(CheckpointError):
  """A path that `save(force=True)` would replace holds something else: refused."""


def _checkpointer():
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer()


def _save_tree(path: str, tree) -> None:
  """Writes one tree of jax arrays, synchronously, as a plain (non-OCDBT) Orbax checkpoint.

  OCDBT, Orbax's default, buffers every array's encoded bytes until it commits, which holds
  the whole model a second time (measured: 1.98x the file size at peak instead of 1.07x,
  benchmarks/convert_memory.py). Plain zarr writes chunk by chunk; StandardCheckpointer
  restores either format. Numpy leaves are avoided: Orbax's numpy path copies them too.
  """
  import orbax.checkpoint as ocp
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False)
  try:
    with ocp.Checkpointer(handler) as ckpt:
      ckpt.save(path, args=ocp.args.PyTreeSave(tree))
  except OSError:
    raise
  except Exception as e:
    # tensorstore reports a failed write (disk full, quota, permission) as a ValueError
    # carrying the OS error code; it is the machine's problem, not the model's.
    code = re.search(r"os_error_code='?(\d+)", str(e))
    if code is None:
      raise
    number = int(code.group(1))
    folder = os.path.dirname(os.path.dirname(path))  # where the checkpoint was going
    raise OSError(number, f"{os.strerror(number)} (while writing a checkpoint)", folder) from e


def _run_to_completion(work: Callable[[], None]) -> None:
  """Runs `work` in a thread and waits for it, even through Ctrl-C.

  Orbax writes with background threads; a KeyboardInterrupt in the middle of its calls
  leaves writers running, which then recreate files in a folder already removed and print
  tracebacks. Waiting for the writer to finish first, then raising, leaves nothing behind.
  """
  failure: list[BaseException] = []

  def run():
    try:
      work()
    except BaseException as e:  # handed to the waiting thread
      failure.append(e)

  thread = threading.Thread(target=run, name="jaxconsdec-checkpoint-writer")
  thread.start()
  interrupted = False
  while thread.is_alive():
    try:
      thread.join()
    except KeyboardInterrupt:
      interrupted = True
  if failure:
    raise failure[0]
  if interrupted:
    raise KeyboardInterrupt


def check_replaceable(out_dir: str) -> bool:
  """Whether `out_dir` exists; raises NotACheckpointError unless it is a jaxconsdec
  checkpoint (a folder whose jaxconsdec.json is present and readable), the only thing
  `save(force=True)` replaces."""
  if not os.path.lexists(out_dir):
    return False
  if os.path.islink(out_dir) or not os.path.isdir(out_dir):
    what = "a symlink" if os.path.islink(out_dir) else "a file"
    raise NotACheckpointError(f"{out_dir} is {what}, not a jaxconsdec checkpoint folder;"
                              " --force only replaces checkpoints. Choose another -o.")
  if not os.path.lexists(os.path.join(out_dir, META)):
    reason = f"no {META}"
  else:
    try:
      read_meta(out_dir)
      return True
    except CheckpointError as e:
      reason = f"its {META} is unreadable: {e}"
  entries = sorted(os.listdir(out_dir))
  shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
  raise NotACheckpointError(
      f"{out_dir} is not a jaxconsdec checkpoint ({reason}); it holds {len(entries)}"
      f" entries ({shown or 'none'}). --force only replaces checkpoints, so nothing of yours"
      " is deleted: choose another -o, or remove it yourself.")
  return True


def save(out_dir: str, params, config: UNetConfig, provenance: dict,
         extras: Optional[dict] = None, force: bool = False,
         should_stop: Callable[[], bool] = lambda: False) -> None:
  """Writes a checkpoint folder at `out_dir` (see the module docstring).

  force: replace an existing *checkpoint* at `out_dir` (anything else is refused).
  should_stop: polled between the writing steps; when it returns True the partial
    checkpoint is removed and KeyboardInterrupt raised. Once the final rename has begun
    the checkpoint is completed regardless (the CLI maps Ctrl-C onto this).
  Raises FileExistsError, NotACheckpointError, or OSError (no space, permission, I/O).
  """
  out_dir = os.path.abspath(out_dir)
  if check_replaceable(out_dir) and not force:
    raise FileExistsError(errno.EEXIST, "exists; pass --force (force=True) to replace it",
                          out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  trees = {"params": params, **({"extras": extras} if extras else {})}
  _check_free_space(parent, trees)
  tmp = make_temp_dir(parent, f".{os.path.basename(out_dir)}.tmp-")
  old = tmp + ".old"
  try:
    for name, tree in trees.items():
      if should_stop():
        raise KeyboardInterrupt
      _run_to_completion(lambda: _save_tree(os.path.join(tmp, name), tree))
    meta = json.dumps({"format_version": FORMAT_VERSION, "config": json.loads(config.to_json()),
                       "provenance": provenance}, indent=2, sort_keys=True)
    with open(os.path.join(tmp, META), "w") as f:
      f.write(meta)
    fsync_tree(tmp)
    if should_stop():
      raise KeyboardInterrupt
    if os.path.exists(out_dir):  # force: swap the old checkpoint out only now
      os.rename(out_dir, old)
    os.rename(tmp, out_dir)
  except BaseException:
    if os.path.exists(old) and not os.path.exists(out_dir):
      os.rename(old, out_dir)  # interrupted between the two renames: put the old one back
    _remove_tree(tmp)
    raise
  try:
    fsync_dir(parent)
  finally:
    _remove_tree(old)


def _remove_tree(path: str) -> None:
  """Removes a folder of ours completely, even if Ctrl-C comes in the middle."""
  interrupted = False
  while os.path.lexists(path):
    try:
      shutil.rmtree(path, ignore_errors=True)
      break
    except KeyboardInterrupt:
      interrupted = True
  if interrupted:
    raise KeyboardInterrupt


def _check_free_space(folder: str, trees: dict) -> None:
  need = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for tree in trees.values() for x in jax.tree.leaves(tree))
  free = shutil.disk_usage(folder).free
  if free < need + (16 << 20):
    raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {folder} has {free:,} bytes"
                                f" free, the checkpoint needs about {need:,}")


def read_meta(path: str) -> dict:
  meta_path = os.path.join(path, META)
  if not os.path.lexists(meta_path):
    raise CheckpointError(f"{path}: not a jaxconsdec checkpoint (no {META}). Convert the weights"
                          " first: jaxconsdec convert SRC -o OUT_DIR")
  try:
    meta = read_json_object(meta_path, MAX_META_BYTES)
    UNetConfig.from_json(json.dumps(meta["config"]))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{meta_path}: corrupt checkpoint metadata ({e})")
  if meta.get("format_version") != FORMAT_VERSION:
    raise CheckpointError(f"{path}: checkpoint format {meta.get('format_version')!r}, this"
                          f" version of jaxconsdec reads {FORMAT_VERSION}")
  return meta


def identity(path: str | Sequence[str]) -> str:
  """What the weights at `path` are, by content: for a checkpoint the SHA-256 of its
  metadata (which records the SHA-256 of every source file, the config and the dtype), for
  PyTorch files the SHA-256 of their bytes. Two different weights never share an identity,
  whatever their names and sizes."""
  from jaxconsdec.convert.formats import sha256_of
  paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
  if len(paths) == 1 and os.path.isdir(paths[0]):
    meta = json.dumps(read_meta(os.fspath(paths[0])), sort_keys=True).encode()
    return "checkpoint-sha256:" + hashlib.sha256(meta).hexdigest()
  return "files-sha256:" + ",".join(sha256_of(os.fspath(p)) for p in paths)


def load(path: str | Sequence[str], *, dtype=None, sharding=None,
         config: Optional[UNetConfig] = None, embedding: Optional[str] = None):
  """-> (params, config) from a jaxconsdec checkpoint folder, or any PyTorch weight file the
  converter reads (converted in memory).

  dtype: cast every param to this dtype on restore (default: as stored).
  sharding: a `jax.sharding.Sharding` the params are restored directly onto (default: the
    current default device, `jax.default_device` included).
  config: the architecture of a PyTorch file. A diffusers file with a config.json beside it
    describes itself (a config given too must agree); other files default to the released
    decoder. For a checkpoint folder the stored config is used; one given must agree.
  embedding: the time-embedding table for the raw safetensors layout.
  """
  paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
  if len(paths) == 1 and os.path.isdir(paths[0]):
    params, stored = _load_checkpoint(os.fspath(paths[0]), dtype, sharding)
    _check_same_architecture(stored, config, os.fspath(paths[0]))
    return params, stored
  from jaxconsdec.convert import read_weights
  weights = read_weights(paths, config, embedding)
  params = params_from_torch(weights.unet, weights.config)
  if dtype is not None or sharding is not None:
    params = jax.tree.map(lambda x: jax.device_put(x.astype(dtype or x.dtype), sharding)
                          if sharding is not None else x.astype(dtype or x.dtype), params)
  return params, weights.config


def _check_same_architecture(stored: UNetConfig, given: Optional[UNetConfig], where: str):
  from jaxconsdec.convert.diffusers_config import ARCHITECTURE
  if given is None:
    return
  diffs = [f"{name}: {getattr(stored, name)!r} stored, {getattr(given, name)!r} given"
           for name in ARCHITECTURE if getattr(stored, name) != getattr(given, name)]
  if diffs:
    raise CheckpointError(f"{where} holds another architecture than the config given: "
                     + "; ".join(diffs) + ". A checkpoint knows its config: pass none.")


def default_device() -> jax.Device:
  """The device JAX puts new arrays on here: `jax.default_device(...)` if set, else the
  first local device."""
  device = jax.config.jax_default_device
  if isinstance(device, str):  # a platform name
    return jax.local_devices(backend=device)[0]
  return device if device is not None else jax.local_devices()[0]


def _load_checkpoint(path: str, dtype, sharding):
  meta = read_meta(path)
  config = UNetConfig.from_json(json.dumps(meta["config"]))
  stored = _stored_specs(path)
  try:
    check_params(stored, config)  # shapes only: nothing is read yet
  except ValueError as e:
    raise CheckpointError(f"{path}: params do not match the checkpoint's own config:\n{e}")
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(default_device())
  _check_sharding(sharding, stored)
  target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype) if dtype else a.dtype,
                                     sharding=sharding), stored)
  try:
    return _checkpointer().restore(os.path.join(path, "params"), target), config
  except Exception as e:
    raise CheckpointError(f"{path}: the params could not be restored; the checkpoint is"
                          f" truncated or corrupt ({type(e).__name__}: {str(e)[:300]})")


def _check_sharding(sharding, stored) -> None:
  """A sharding that cannot hold the params is the caller's error, said as such (rather than
  surfacing from Orbax as if the checkpoint were corrupt)."""
  if not isinstance(sharding, jax.sharding.Sharding):
    raise TypeError(f"sharding must be a jax.sharding.Sharding, got {type(sharding).__name__}")
  for leaf in jax.tree.leaves(stored):
    try:
      sharding.shard_shape(leaf.shape)
    except Exception as e:
      raise ValueError(f"the sharding {sharding} cannot hold a param of shape {leaf.shape}"
                       f" ({e})") from None


def _stored_specs(path: str):
  """Shapes/dtypes as stored, from Orbax metadata (no data read)."""
  try:
    meta = _checkpointer().metadata(os.path.join(path, "params"))
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict):
      raise ValueError(f"a {type(tree).__name__} where the param tree should be")
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)
  except Exception as e:
    raise CheckpointError(f"{path}: the params' metadata is unreadable; the checkpoint is"
                          f" truncated or corrupt ({type(e).__name__}: {str(e)[:300]})")
