"""Which pair of noise levels each training example uses: the grids, the curriculum and the
pair law (docs/training.md, section 2).

The decoder's time input is a learned 1024-row table, so consistency training runs on
sub-grids of it: `G_delta = {virtual level sigma = 0} + {delta, 2 delta, ..., <= 1008}`. The
virtual level is written as timestep -1 (`VIRTUAL_LEVEL`): where the lower level of a pair is
it, the teacher is the clean image. A pair (g_i, g_i+1) is drawn with iCT's discretised
lognormal: p(i) proportional to erf((ln sigma(g_i+1) - P_MEAN) / (sqrt 2 P_STD)) -
erf((ln sigma(g_i) - P_MEAN) / (sqrt 2 P_STD)), with ln 0 = -inf at the virtual level.
(P_MEAN, P_STD) is iCT's by default and a training setting (`noise_law`): a decoder samples
at the top of the table, which iCT's law, made for many-step generation, seldom visits.
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
NoiseLaw = tuple[float, float]  # (mean, std) of ln sigma
ICT_LAW: NoiseLaw = (P_MEAN, P_STD)
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


def check_law(law) -> NoiseLaw:
  mean, std = (float(v) for v in law)
  if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
    raise ValueError(f"a noise law is a finite mean and a positive std of ln sigma, got {law!r}")
  return mean, std


@functools.lru_cache(maxsize=None)
def _pair_probabilities(delta: int, law: NoiseLaw) -> np.ndarray:
  mean, std = law
  levels = grid(delta)
  cdf = np.array([-1.0 if t == VIRTUAL_LEVEL else
                  math.erf((math.log(SIGMAS[t]) - mean) / (math.sqrt(2.0) * std))
                  for t in levels])
  mass = np.diff(cdf)
  if not mass.sum() > 0:
    raise ValueError(f"the noise law {law} puts no mass on G_{delta}")
  return mass / mass.sum()


def pair_probabilities(delta: int, law: NoiseLaw = ICT_LAW) -> np.ndarray:
  """p(i) for the pairs (g_i, g_i+1) of G_delta, float64, summing to 1."""
  return _pair_probabilities(check_delta(delta), check_law(law)).copy()


def draw_pairs(keys: jax.Array, delta: int,
               law: NoiseLaw = ICT_LAW) -> tuple[jax.Array, jax.Array]:
  """One pair per key: (t_lo, t_hi), each int32 of shape keys.shape. t_lo is -1 (the virtual
  level) for a boundary pair. Example i's pair depends on its key alone."""
  return draw_from_table(keys, *pair_table(delta, law=law))


def pair_table(delta: int, pairs: int | None = None,
               law: NoiseLaw = ICT_LAW) -> tuple[np.ndarray, np.ndarray]:
  """G_delta's levels (int32) and the log-probabilities of its pairs (float32), padded to
  `pairs` pairs (impossible ones, log p = -inf): every grid of a curriculum then has arrays of
  one shape, and one compiled training step serves them all."""
  levels, law = grid(delta), pair_probabilities(delta, law)
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


def check_anchor_share(share: float) -> float:
  if not 0.0 <= share <= 1.0:
    raise ValueError(f"the anchor share must be in [0, 1], got {share}")
  return float(share)


def anchor(keys: jax.Array, t_lo: jax.Array, share: float) -> jax.Array:
  """t_lo with the clean image (the virtual level) as the teacher for a `share` of examples,
  each chosen by its own key: ECT's first regime, the clean image as every level's target,
  kept for part of the batch. Without it, short consistency runs from a denoiser drift to
  self-consistent grey pictures at the top levels, which only a long chain of pairs ties to
  the boundary (docs/training.md, the demo's ablations)."""
  if check_anchor_share(share) == 0.0:
    return t_lo
  chosen = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 1), share))(
      keys.reshape(-1)).reshape(t_lo.shape)
  return jnp.where(chosen, VIRTUAL_LEVEL, t_lo)


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


def snap_to_levels(log_sigma: jax.Array, levels) -> jax.Array:
  """The level of `levels` (timesteps; the virtual level -1 is never chosen) whose noise level
  is nearest to exp(log_sigma) in log sigma. int32, log_sigma's shape."""
  levels = jnp.asarray(levels, jnp.int32)
  log_levels = jnp.where(levels >= 0, jnp.asarray(np.log(SIGMAS), jnp.float32)[levels],
                         jnp.inf)
  index = jnp.argmin(jnp.abs(log_sigma[..., None] - log_levels), axis=-1)
  return levels[index]


def draw_levels(keys: jax.Array, law: NoiseLaw = ICT_LAW, levels=None) -> jax.Array:
  """Denoising pre-training's levels: ln sigma from the lognormal `law` (mean, std), snapped
  to the nearest of `levels` (a grid's timesteps, as `pair_table` gives them; default the
  whole table). One timestep per key (docs/training.md, section 3, stage 1).

  Why a grid: t indexes a learned embedding table, and only the rows a model is trained on
  mean anything. The sampler's rows (1008 and 512 for 1 and 2 steps) are each drawn for under
  0.1% of examples when the whole table shares the law; snapped to G_16 they take the mass
  of their whole band."""
  mean, std = check_law(law)
  log_sigma = jax.vmap(lambda k: mean + std * jax.random.normal(k))(keys.reshape(-1))
  t = snap_to_table(log_sigma) if levels is None else snap_to_levels(log_sigma, levels)
  return t.reshape(keys.shape)
