"""jaxconsdec checkpoints: an Orbax param tree plus the UNetConfig and provenance as JSON.

    OUT_DIR/
      jaxconsdec.json   {"format_version", "config", "provenance"}
      params/           Orbax StandardCheckpointer: the UNet param tree
      extras/           Orbax, optional: tensors the file carried beside the UNet (SD encoder)

A checkpoint is written into a temporary folder beside OUT_DIR and renamed into place only
when complete, so after any failure or Ctrl-C there is nothing at OUT_DIR.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxconsdec.config import CONSISTENCY_DECODER, UNetConfig
from jaxconsdec.weights import abstract_params, check_params, params_from_torch

FORMAT_VERSION = 1
META = "jaxconsdec.json"


class CheckpointError(ValueError):
  """A checkpoint folder is missing, foreign, truncated or does not match its config."""


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
  with ocp.Checkpointer(handler) as ckpt:
    ckpt.save(path, args=ocp.args.PyTreeSave(tree))


def save(out_dir: str, params, config: UNetConfig, provenance: dict,
         extras: Optional[dict] = None, force: bool = False) -> None:
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not force:
    raise FileExistsError(f"{out_dir} exists; pass --force (force=True) to replace it")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    _save_tree(os.path.join(tmp, "params"), params)
    if extras:
      _save_tree(os.path.join(tmp, "extras"), extras)
    with open(os.path.join(tmp, META), "w") as f:
      json.dump({"format_version": FORMAT_VERSION, "config": json.loads(config.to_json()),
                 "provenance": provenance}, f, indent=2, sort_keys=True)
    if os.path.exists(out_dir):  # --force: swap the old one out only now
      old = tmp + ".old"
      os.rename(out_dir, old)
      os.rename(tmp, out_dir)
      shutil.rmtree(old)
    else:
      os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def read_meta(path: str) -> dict:
  meta_path = os.path.join(path, META)
  if not os.path.isfile(meta_path):
    raise CheckpointError(f"{path}: not a jaxconsdec checkpoint (no {META}). Convert the weights"
                          " first: jaxconsdec convert SRC -o OUT_DIR")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    UNetConfig.from_json(json.dumps(meta["config"]))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{meta_path}: corrupt checkpoint metadata ({e})")
  if meta.get("format_version") != FORMAT_VERSION:
    raise CheckpointError(f"{path}: checkpoint format {meta.get('format_version')!r}, this"
                          f" version of jaxconsdec reads {FORMAT_VERSION}")
  return meta


def load(path: str | Sequence[str], *, dtype=None, sharding=None,
         config: UNetConfig = CONSISTENCY_DECODER, embedding: Optional[str] = None):
  """-> (params, config) from a jaxconsdec checkpoint folder, or any PyTorch weight file the
  converter reads (converted in memory; `config` and `embedding` apply only to those).

  dtype: cast every param to this dtype on restore (default: as stored).
  sharding: a `jax.sharding.Sharding` the params are restored directly onto.
  """
  paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
  if len(paths) == 1 and os.path.isdir(paths[0]):
    return _load_checkpoint(os.fspath(paths[0]), dtype, sharding)
  from jaxconsdec.convert import read_weights
  weights = read_weights(paths, config, embedding)
  params = params_from_torch(weights.unet, config)
  if dtype is not None or sharding is not None:
    params = jax.tree.map(lambda x: jax.device_put(x.astype(dtype or x.dtype), sharding)
                          if sharding is not None else x.astype(dtype or x.dtype), params)
  return params, config


def _load_checkpoint(path: str, dtype, sharding):
  meta = read_meta(path)
  config = UNetConfig.from_json(json.dumps(meta["config"]))
  stored = _stored_dtypes(path)
  target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype) if dtype else a.dtype,
                                     sharding=sharding), stored)
  try:
    params = _checkpointer().restore(os.path.join(path, "params"), target)
  except Exception as e:
    raise CheckpointError(f"{path}: the params could not be restored; the checkpoint is"
                          f" truncated or corrupt ({type(e).__name__}: {str(e)[:300]})")
  try:
    check_params(params, config)
  except ValueError as e:
    raise CheckpointError(f"{path}: params do not match the checkpoint's own config:\n{e}")
  return params, config


def _stored_dtypes(path: str):
  """Shapes/dtypes as stored, from Orbax metadata (no data read)."""
  try:
    meta = _checkpointer().metadata(os.path.join(path, "params"))
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)
  except Exception as e:
    raise CheckpointError(f"{path}: the params' metadata is unreadable; the checkpoint is"
                          f" truncated or corrupt ({type(e).__name__}: {str(e)[:300]})")
