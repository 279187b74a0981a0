"""Weights by path, as users name them: a checkpoint folder, a PyTorch weight file the
converter reads, or a training run folder, which stands for the model it exported.

The core (`checkpoint`) knows checkpoints and weight files; what a run folder holds is the
trainer's business (`training.run_files`). This module puts the two together for `load` and
for the identity a job records.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from jaxconsdec import checkpoint
from jaxconsdec.config import UNetConfig, VAEConfig
from jaxconsdec.training.run_files import exported_model


def _resolved(path: str | Sequence[str]) -> list[str]:
  paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
  if len(paths) == 1 and os.path.isdir(paths[0]):
    return [exported_model(os.fspath(paths[0]))]
  return [os.fspath(p) for p in paths]


def load(path: str | Sequence[str], *, dtype=None, sharding=None,
         config: Optional[UNetConfig] = None, embedding: Optional[str] = None,
         vae_config: Optional[VAEConfig] = None) -> checkpoint.Loaded:
  """`checkpoint.load` (see there for every argument), where a training run folder
  (`jaxconsdec train --out RUN_DIR`) stands for its exported EMA model."""
  return checkpoint.load(_resolved(path), dtype=dtype, sharding=sharding, config=config,
                         embedding=embedding, vae_config=vae_config)


def identity(path: str | Sequence[str]) -> str:
  """`checkpoint.identity`, a run folder standing for its exported model."""
  return checkpoint.identity(_resolved(path))
