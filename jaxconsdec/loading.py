"""Weights as users name them: a checkpoint folder, a PyTorch weight file the converter
reads, a training run folder (which stands for the model it exported), or a name such as
`openai/consistency-decoder` (fetched and converted once into the weights cache).

The core (`checkpoint`) knows checkpoints and weight files; what a run folder holds is the
trainer's business (`training.run_files`); names are `weight_cache`'s. This module puts them
together for `load` and for the identity a job records.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from jaxconsdec import checkpoint, named_weights, weight_cache
from jaxconsdec.config import UNetConfig, VAEConfig
from jaxconsdec.training.run_files import exported_model


def is_name(path) -> bool:
  """Whether `path` is a weights name rather than a local path (see named_weights). A
  pathlib.Path is always a path."""
  return isinstance(path, str) and named_weights.parse(path) is not None


def local(path, *, config: Optional[UNetConfig] = None,
          vae_config: Optional[VAEConfig] = None):
  """For a name, its checkpoint in the weights cache (fetched and converted the first time,
  with these architectures where its files do not describe themselves); anything else as
  given."""
  if is_name(path):
    return weight_cache.resolve(path, config=config, vae_config=vae_config,
                                progress=sys.stderr.isatty())
  return path


def _resolved(path: str | Sequence[str]) -> list[str]:
  paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
  if len(paths) == 1 and os.path.isdir(paths[0]):
    return [exported_model(os.fspath(paths[0]))]
  return [os.fspath(p) for p in paths]


def load(path: str | Sequence[str], *, dtype=None, sharding=None,
         config: Optional[UNetConfig] = None, embedding: Optional[str] = None,
         vae_config: Optional[VAEConfig] = None) -> checkpoint.Loaded:
  """`checkpoint.load` (see there for every argument), where a training run folder
  (`jaxconsdec train --out RUN_DIR`) stands for its exported EMA model, and a name
  (`openai/consistency-decoder`, `hf://ORG/REPO[/FOLDER][@REVISION]`, `openai:decoder.pt`)
  for its converted checkpoint in the weights cache, fetched and converted the first time."""
  path = local(path, config=config, vae_config=vae_config)
  return checkpoint.load(_resolved(path), dtype=dtype, sharding=sharding, config=config,
                         embedding=embedding, vae_config=vae_config)


def identity(path: str | Sequence[str]) -> str:
  """`checkpoint.identity`, a run folder standing for its exported model and a name for its
  cached checkpoint."""
  return checkpoint.identity(_resolved(local(path)))
