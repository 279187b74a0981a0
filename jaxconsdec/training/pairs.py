"""Which pair of noise levels each training example uses: the grids, the curriculum and the
pair law (docs/training.md, section 2).

The decoder's time input is a learned 1024-row table, so consistency training runs on
sub-grids of it: `G_delta = {virtual level sigma = 0} + {delta, 2 delta, ..., <= 1008}`. The
virtual level is written as timestep -1 (`VIRTUAL_LEVEL`): where the lower level of a pair is
it, the teacher is the clean image. A pair (g_i, g_i+1) is drawn with iCT's discretised
lognormal: p(i) proportional to erf((ln sigma(g_i+1) - P_MEAN) / (sqrt 2 P_STD)) -
erf((ln sigma(g_i) - P_MEAN) / (sqrt 2 P_STD)), with ln 0 = -inf at the virtual level.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxconsdec.schedule import NUM_DISTILLED_STEPS, NUM_TRAIN_TIMESTEPS, TABLES

VIRTUAL_LEVEL = -1          # the timestep that stands for sigma = 0 (the clean image)
P_MEAN, P_STD = -1.1, 2.0   # iCT's lognormal over sigma
TOP_LEVEL = (NUM_TRAIN_TIMESTEPS // NUM_DISTILLED_STEPS) * (NUM_DISTILLED_STEPS - 1)  # 1008
RELEASED_DELTA = NUM_TRAIN_TIMESTEPS // NUM_DISTILLED_STEPS                           # 16
# From scratch: the level count doubles four times (iCT's curriculum, in table units).
SCRATCH_CURRICULUM = (64, 32, 16, 8, 4)
FINE_TUNE_CURRICULUM = (RELEASED_DELTA,)

# sigma(t) = sqrt(1 / alpha_bar(t) - 1) in float64 from the decoder's own alpha-bar table.
SIGMAS = np.sqrt(1.0 / TABLES.alphas_cumprod.astype(np.float64) - 1.0)


def sigma(t: int) -> float:
  """The noise level of timestep t; 0 for the virtual level."""
  return 0.0 if t == VIRTUAL_LEVEL else float(SIGMAS[t])


def check_delta(delta: int) -> int:
  if isinstance(delta, bool) or not isinstance(delta, (int, np.integer)) or not (
      1 <= delta <= TOP_LEVEL):
    raise ValueError(f"a grid spacing must be an integer in [1, {TOP_LEVEL}], got {delta!r}")
  return int(delta)


def grid(delta: int) -> np.ndarray:
  """The levels of G_delta as timesteps, the virtual level (-1) first. int32."""
  delta = check_delta(delta)
  return np.concatenate([[VIRTUAL_LEVEL], np.arange(delta, TOP_LEVEL + 1, delta)]).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _pair_probabilities(delta: int) -> np.ndarray:
  levels = grid(delta)
  cdf = np.array([-1.0 if t == VIRTUAL_LEVEL else
                  math.erf((math.log(SIGMAS[t]) - P_MEAN) / (math.sqrt(2.0) * P_STD))
                  for t in levels])
  mass = np.diff(cdf)
  return mass / mass.sum()


def pair_probabilities(delta: int) -> np.ndarray:
  """p(i) for the pairs (g_i, g_i+1) of G_delta, float64, summing to 1."""
  return _pair_probabilities(check_delta(delta)).copy()


def draw_pairs(keys: jax.Array, delta: int) -> tuple[jax.Array, jax.Array]:
  """One pair per key: (t_lo, t_hi), each int32 of shape keys.shape. t_lo is -1 (the virtual
  level) for a boundary pair. Example i's pair depends on its key alone."""
  return draw_from_table(keys, *pair_table(delta))


def pair_table(delta: int, pairs: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """G_delta's levels (int32) and the log-probabilities of its pairs (float32), padded to
  `pairs` pairs (impossible ones, log p = -inf): every grid of a curriculum then has arrays of
  one shape, and one compiled training step serves them all."""
  levels, law = grid(delta), pair_probabilities(delta)
  pairs = len(law) if pairs is None else pairs
  if pairs < len(law):
    raise ValueError(f"G_{delta} has {len(law)} pairs, more than {pairs}")
  with np.errstate(divide="ignore"):
    logits = np.log(np.pad(law, (0, pairs - len(law))))
  return (np.pad(levels, (0, pairs - len(law)), constant_values=levels[-1]),
          logits.astype(np.float32))


def pair_count(delta: int) -> int:
  return len(grid(delta)) - 1


def draw_from_table(keys: jax.Array, levels, logits) -> tuple[jax.Array, jax.Array]:
  """`draw_pairs` with the grid given as `pair_table`'s arrays (traceable)."""
  levels, logits = jnp.asarray(levels), jnp.asarray(logits)
  index = jax.vmap(lambda k: jax.random.categorical(k, logits))(keys.reshape(-1))
  return (levels[index].reshape(keys.shape), levels[index + 1].reshape(keys.shape))


def curriculum_delta(step: int, total_steps: int, curriculum: Sequence[int]) -> int:
  """The grid spacing at `step` of `total_steps`: the curriculum's stages take equal shares
  of the run (stage k from step k * total / len on)."""
  stages = len(curriculum)
  return int(curriculum[min(step * stages // max(total_steps, 1), stages - 1)])


def snap_to_table(log_sigma: jax.Array) -> jax.Array:
  """The timestep whose noise level is nearest to exp(log_sigma), nearest in log sigma
  (int32, in [0, 1023]); the table's sigmas increase strictly, so this is a search."""
  log_table = jnp.asarray(np.log(SIGMAS), jnp.float32)
  midpoints = (log_table[1:] + log_table[:-1]) / 2
  return jnp.searchsorted(midpoints, log_sigma).astype(jnp.int32)


def draw_levels(keys: jax.Array) -> jax.Array:
  """Denoising pre-training's levels: sigma from the lognormal (P_MEAN, P_STD), snapped to
  the table (docs/training.md, section 3, stage 1). One timestep per key."""
  log_sigma = jax.vmap(lambda k: P_MEAN + P_STD * jax.random.normal(k))(keys.reshape(-1))
  return snap_to_table(log_sigma).reshape(keys.shape)
