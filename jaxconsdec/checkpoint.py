"""jaxconsdec checkpoints: the decoder UNet, the SD VAE, or both, with configs and provenance.

    OUT_DIR/
      jaxconsdec.json   {"format_version": 2, "decoder": {"config"}, "vae": {"config",
                         "halves"}, "provenance"}: the parts the checkpoint holds
      params/           Orbax: the decoder UNet's param tree (when it holds the decoder)
      vae/              Orbax: the VAE's param tree, or the half of it a file held (a
                        ConsistencyDecoderVAE file holds only the encoder)

Format 1 (before the VAE) had "config" for the decoder and `extras/` for the encoder's raw
tensors; it still loads, as a decoder.

Writing: into a temporary folder beside OUT_DIR (mode 0777 less the umask, like any folder
a tool makes), every file fsync-ed, then renamed into place, so after any failure, Ctrl-C or
crash there is either the complete checkpoint at OUT_DIR or nothing, and nothing beside it.
`force=True` replaces only what is recognisably a jaxconsdec checkpoint.

Reading: the stored shapes are checked against the checkpoint's own configs before any array
is read, and arrays are restored onto the current default device (or the sharding asked
for), never onto whatever device the checkpoint was saved from.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import threading
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxconsdec.config import UNetConfig, VAEConfig
from jaxconsdec.files import (contents, fsync_dir, fsync_tree, make_temp_dir, os_error_in,
                              read_json_object)
from jaxconsdec.models.vae import HALVES
from jaxconsdec.weights import check_params, param_count, params_from_torch

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
META = "jaxconsdec.json"
MAX_META_BYTES = 16 << 20


class CheckpointError(ValueError):
  """A checkpoint folder is missing, foreign, truncated or does not match its config."""


class NotACheckpointError(CheckpointError):
  """A path that `save(force=True)` would replace holds something else: refused."""


def _checkpointer():
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer()


# OCDBT, Orbax's aggregated store: a model is a few files (the demo model 30; the released
# decoder 132, where the plain store wrote 820). OCDBT buffers a data file's bytes until it
# is written, and by default a data file grows as large as the model, which held the model
# twice (4.65 GiB peak converting a 2.31 GiB file). With 16 MiB data files and at most 1 GB
# in flight the peak is 2.72 GiB (median of 8 runs, 2.71-2.87), at or below the plain
# store's 2.84-2.88 GiB (32 MiB files: 2.83-3.15, 64 MiB: 2.86-3.20;
# benchmarks/convert_memory.py, 2-core CPU).
OCDBT_DATA_FILE_BYTES = 16 << 20
SAVE_CONCURRENT_GB = 1


def _save_tree(path: str, tree) -> None:
  """Writes one tree of jax arrays, synchronously, as an OCDBT Orbax checkpoint.
  StandardCheckpointer restores it, and the plain stores earlier versions wrote. Numpy
  leaves are avoided: Orbax's numpy path copies them."""
  import orbax.checkpoint as ocp
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, save_concurrent_gb=SAVE_CONCURRENT_GB)
  save_args = ocp.args.PyTreeSave(tree, ocdbt_target_data_file_size=OCDBT_DATA_FILE_BYTES)
  try:
    with ocp.Checkpointer(handler) as ckpt:
      ckpt.save(path, args=save_args)
  except OSError:
    raise
  except Exception as e:
    # tensorstore reports a failed write (disk full, quota, permission) as a ValueError
    # carrying the OS error code; it is the machine's problem, not the model's.
    number = os_error_in(e)
    if number is None:
      raise
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
  raise NotACheckpointError(
      f"{out_dir} is not a jaxconsdec checkpoint ({reason}); it holds {contents(out_dir)}."
      " --force only replaces checkpoints, so nothing of yours is deleted: choose another"
      " -o, or remove it yourself.")
  return True


def save(out_dir: str, params=None, config: Optional[UNetConfig] = None,
         provenance: Optional[dict] = None, *, vae_params=None,
         vae_config: Optional[VAEConfig] = None, vae_halves: Sequence[str] = ("encoder", "decoder"),
         force: bool = False, should_stop: Callable[[], bool] = lambda: False) -> None:
  """Writes a checkpoint folder at `out_dir` (see the module docstring) holding the decoder
  (`params`, `config`), the VAE (`vae_params` of `vae_halves`, `vae_config`), or both.

  force: replace an existing *checkpoint* at `out_dir` (anything else is refused).
  should_stop: polled between the writing steps; when it returns True the partial
    checkpoint is removed and KeyboardInterrupt raised. Once the final rename has begun
    the checkpoint is completed regardless (the CLI maps Ctrl-C onto this).
  Raises FileExistsError, NotACheckpointError, or OSError (no space, permission, I/O).
  """
  if params is None and vae_params is None:
    raise ValueError("a checkpoint holds the decoder, the VAE, or both: got neither")
  out_dir = os.path.abspath(out_dir)
  if check_replaceable(out_dir) and not force:
    raise FileExistsError(errno.EEXIST, "exists; pass --force (force=True) to replace it",
                          out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  trees, meta = {}, {"format_version": FORMAT_VERSION, "provenance": provenance or {}}
  if params is not None:
    trees["params"] = params
    meta["decoder"] = {"config": json.loads(config.to_json())}
  if vae_params is not None:
    trees["vae"] = vae_params
    meta["vae"] = {"config": json.loads(vae_config.to_json()), "halves": list(vae_halves)}
  _check_free_space(parent, trees)
  tmp = make_temp_dir(parent, f".{os.path.basename(out_dir)}.tmp-")
  old = tmp + ".old"
  try:
    for name, tree in trees.items():
      if should_stop():
        raise KeyboardInterrupt
      _run_to_completion(lambda: _save_tree(os.path.join(tmp, name), tree))
    with open(os.path.join(tmp, META), "w") as f:
      f.write(json.dumps(meta, indent=2, sort_keys=True))
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
  """The checkpoint's metadata, in format 2's shape (a format-1 file is read as a decoder)."""
  meta_path = os.path.join(path, META)
  if not os.path.lexists(meta_path):
    raise CheckpointError(f"{path}: not a jaxconsdec checkpoint (no {META}). Convert the weights"
                          " first: jaxconsdec convert SRC -o OUT_DIR")
  try:
    meta = read_json_object(meta_path, MAX_META_BYTES)
    if meta.get("format_version") not in READABLE_FORMATS:
      raise CheckpointError(f"{path}: checkpoint format {meta.get('format_version')!r}, this"
                            f" version of jaxconsdec reads {READABLE_FORMATS}")
    if meta["format_version"] == 1:
      meta = {"format_version": 1, "decoder": {"config": meta["config"]},
              "provenance": meta.get("provenance", {})}
    if "decoder" not in meta and "vae" not in meta:
      raise ValueError("it names no part (decoder or vae)")
    if "decoder" in meta:
      UNetConfig.from_json(json.dumps(meta["decoder"]["config"]))
    if "vae" in meta:
      VAEConfig.from_json(json.dumps(meta["vae"]["config"]))
      if not set(meta["vae"]["halves"]) <= set(HALVES) or not meta["vae"]["halves"]:
        raise ValueError(f"VAE halves {meta['vae']['halves']!r}")
  except CheckpointError:
    raise
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{meta_path}: corrupt checkpoint metadata ({e})")
  return meta


def identity(path: str | Sequence[str]) -> str:
  """What the weights at `path` are, by content: for a checkpoint the SHA-256 of its
  metadata (which records the SHA-256 of every source file, the config and the dtype), for
  PyTorch files the SHA-256 of their bytes. Two different weights never share an identity,
  whatever their names and sizes."""
  from jaxconsdec.convert.formats import sha256_of
  paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
  if len(paths) == 1 and os.path.isdir(paths[0]):
    read_meta(os.fspath(paths[0]))  # a checkpoint, readable
    return "checkpoint-sha256:" + sha256_of(os.path.join(os.fspath(paths[0]), META))
  return "files-sha256:" + ",".join(sha256_of(os.fspath(p)) for p in paths)


@dataclasses.dataclass(frozen=True, repr=False)
class Loaded:
  """What a checkpoint or weight file holds: the decoder, the SD VAE (or a half of it), or
  both. `params, config = load(...)` unpacks the decoder, as it always has; the VAE is
  `.vae_params` / `.vae_config` / `.vae_halves`. Printing it says what is there."""
  params: Optional[dict] = None
  config: Optional[UNetConfig] = None
  vae_params: Optional[dict] = None
  vae_config: Optional[VAEConfig] = None
  vae_halves: tuple[str, ...] = ()
  source: str = ""

  def __iter__(self):
    if self.params is None:
      raise CheckpointError(f"{self.source} holds no Consistency Decoder, only"
                            f" {_describe_vae(self.vae_config, self.vae_halves)}; use its"
                            " .vae_params and .vae_config")
    return iter((self.params, self.config))

  def __repr__(self) -> str:
    return f"Loaded({self.source}: {_describe(self.config, self.vae_config, self.vae_halves)})"


def describe(path: str) -> str:
  """What a checkpoint holds, in words, from its metadata alone."""
  meta = read_meta(path)
  config = (UNetConfig.from_json(json.dumps(meta["decoder"]["config"]))
            if "decoder" in meta else None)
  vae = meta.get("vae")
  vae_config = VAEConfig.from_json(json.dumps(vae["config"])) if vae else None
  return _describe(config, vae_config, tuple(vae["halves"]) if vae else ())


def _describe(config, vae_config, vae_halves) -> str:
  decoder = "no decoder" if config is None else (
      f"the decoder ({param_count(config):,} params, widths {config.block_out_channels},"
      f" {config.latent_channels}-channel latents)")
  return f"{decoder}; {_describe_vae(vae_config, vae_halves)}"


def _describe_vae(vae_config, vae_halves) -> str:
  if vae_config is None:
    return "no VAE"
  part = "the whole SD VAE" if len(vae_halves) == 2 else f"the SD VAE's {vae_halves[0]}"
  return (f"{part} ({param_count(vae_config, vae_halves):,} params,"
          f" {vae_config.latent_channels}-channel latents)")


def load(path: str | Sequence[str], *, dtype=None, sharding=None,
         config: Optional[UNetConfig] = None, embedding: Optional[str] = None,
         vae_config: Optional[VAEConfig] = None) -> Loaded:
  """What a jaxconsdec checkpoint folder, or a PyTorch weight file the converter reads
  (converted in memory), holds. `params, config = load(path)` is the decoder.

  dtype: cast every param to this dtype on restore (default: as stored).
  sharding: a `jax.sharding.Sharding` the params are restored directly onto (default: the
    current default device, `jax.default_device` included).
  config, vae_config: the architectures of a PyTorch file. A diffusers file with a
    config.json beside it describes itself (a config given too must agree); other files
    default to the released decoder and the SD 1.x VAE. For a checkpoint folder the stored
    configs are used; one given must agree.
  embedding: the time-embedding table for the raw safetensors layout.
  """
  paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
  if len(paths) == 1 and os.path.isdir(paths[0]):
    loaded = _load_checkpoint(os.fspath(paths[0]), dtype, sharding)
    for stored, given in ((loaded.config, config), (loaded.vae_config, vae_config)):
      if stored is not None:
        _check_same_architecture(stored, given, os.fspath(paths[0]))
    return loaded
  from jaxconsdec.convert import PARTS, layout_of, read_vae_weights, read_weights
  parts = PARTS[layout_of(os.fspath(paths[0]))]
  put = lambda tree: tree if dtype is None and sharding is None else jax.tree.map(
      lambda x: jax.device_put(x.astype(dtype or x.dtype), sharding), tree)
  fields = {"source": os.fspath(paths[0])}
  if "decoder" in parts:
    weights = read_weights(paths, config, embedding)
    fields.update(params=put(params_from_torch(weights.unet, weights.config)),
                  config=weights.config)
  if "vae" in parts:
    vae = read_vae_weights(os.fspath(paths[0]), vae_config)
    if "decoder" not in parts or len(vae.tensors):
      fields.update(vae_params=put(params_from_torch(vae.tensors, vae.config, vae.halves)),
                    vae_config=vae.config, vae_halves=vae.halves)
  return Loaded(**fields)


def _check_same_architecture(stored, given, where: str):
  """A config given for a checkpoint must be the stored one, numerics aside."""
  if given is None:
    return
  diffs = [f"{name}: {mine!r} stored, {theirs!r} given"
           for name, mine, theirs in stored.architecture_differences(given)]
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


def _load_checkpoint(path: str, dtype, sharding) -> Loaded:
  meta = read_meta(path)
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(default_device())
  fields = {"source": path}
  if "decoder" in meta:
    config = UNetConfig.from_json(json.dumps(meta["decoder"]["config"]))
    fields.update(params=_restore(path, "params", config, None, dtype, sharding), config=config)
  if "vae" in meta:
    vae_config = VAEConfig.from_json(json.dumps(meta["vae"]["config"]))
    halves = tuple(meta["vae"]["halves"])
    fields.update(vae_params=_restore(path, "vae", vae_config, halves, dtype, sharding),
                  vae_config=vae_config, vae_halves=halves)
  return Loaded(**fields)


def _restore(path: str, name: str, config, halves, dtype, sharding):
  """One Orbax tree of the checkpoint, checked against its config before any array is read."""
  stored = _stored_specs(path, name)
  try:
    check_params(stored, config, halves)  # shapes only: nothing is read yet
  except ValueError as e:
    raise CheckpointError(f"{path}: {name} do not match the checkpoint's own config:\n{e}")
  _check_sharding(sharding, stored)
  target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype) if dtype else a.dtype,
                                     sharding=sharding), stored)
  try:
    return _checkpointer().restore(_orbax_path(path, name), target)
  except STORE_ERRORS as e:
    raise CheckpointError(f"{path}: the {name} could not be restored; the checkpoint is"
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


# What Orbax and tensorstore raise for a store that is cut short, altered or missing files
# (tensorstore's DATA_LOSS, NOT_FOUND, ... arrive as ValueError). Anything else, a device
# out of memory say, is not the checkpoint's fault and is not reported as such.
STORE_ERRORS = (OSError, ValueError, KeyError, EOFError)


def _orbax_path(path: str, name: str) -> str:
  # Absolute: Orbax reads an OCDBT store's metadata wrongly through a relative path.
  return os.path.abspath(os.path.join(path, name))


def _stored_specs(path: str, name: str):
  """Shapes/dtypes as stored, from Orbax metadata (no data read)."""
  try:
    meta = _checkpointer().metadata(_orbax_path(path, name))
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict):
      raise ValueError(f"a {type(tree).__name__} where the param tree should be")
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)
  except STORE_ERRORS as e:
    raise CheckpointError(f"{path}: the {name}' metadata is unreadable; the checkpoint is"
                          f" truncated or corrupt ({type(e).__name__}: {str(e)[:300]})")
