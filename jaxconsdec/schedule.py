"""The consistency schedule: coefficient tables and the schedule -> timestep mapping.

Everything here is float32 numpy, computed once at import exactly as the reference does
(docs/model.md; diffusers `ConsistencyDecoderScheduler.__init__`): betas from the cosine
alpha-bar in float64, then every later operation in float32, in the reference's order, so
the tables agree with diffusers' to the last ulp. They never change with the compute dtype.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Sequence

import numpy as np

NUM_TRAIN_TIMESTEPS = 1024
NUM_DISTILLED_STEPS = 64  # the decoder was distilled to 64 timesteps: 16, 32, ..., 1008
SIGMA_DATA = 0.5
MAX_BETA = 0.999


class ScheduleTables(NamedTuple):
  """Per-timestep float32 coefficients, each of shape (NUM_TRAIN_TIMESTEPS,)."""
  betas: np.ndarray
  alphas_cumprod: np.ndarray
  sqrt_alphas_cumprod: np.ndarray
  sqrt_one_minus_alphas_cumprod: np.ndarray
  c_skip: np.ndarray
  c_out: np.ndarray
  c_in: np.ndarray


def _alpha_bar(t: float) -> float:
  return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def compute_tables(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                   sigma_data: float = SIGMA_DATA) -> ScheduleTables:
  n = num_train_timesteps
  betas = np.array(
      [min(1 - _alpha_bar((i + 1) / n) / _alpha_bar(i / n), MAX_BETA) for i in range(n)],
      dtype=np.float32)
  alphas = np.float32(1.0) - betas
  # torch.cumprod on CPU accumulates float32 inputs in float64 (its acc_type) and rounds each
  # running product to float32 once; a float32 running product drifts by several ulps.
  acp = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
  sigmas = np.sqrt(np.float32(1.0) / acp - np.float32(1.0))
  sqrt_recip_acp = np.sqrt(np.float32(1.0) / acp)
  sd2 = np.float32(sigma_data ** 2)
  denom = sigmas ** 2 + sd2
  return ScheduleTables(
      betas=betas,
      alphas_cumprod=acp,
      sqrt_alphas_cumprod=np.sqrt(acp),
      sqrt_one_minus_alphas_cumprod=np.sqrt(np.float32(1.0) - acp),
      c_skip=sqrt_recip_acp * sd2 / denom,
      c_out=sigmas * np.float32(sigma_data) / np.sqrt(denom),
      c_in=sqrt_recip_acp / np.sqrt(denom),
  )


TABLES = compute_tables()


def round_timestep(t: int) -> int:
  """The original's `_round_timesteps(truncate_start=False)` for one timestep."""
  space = NUM_TRAIN_TIMESTEPS // NUM_DISTILLED_STEPS
  rounded = (t // space + 1) * space
  if rounded == NUM_TRAIN_TIMESTEPS:
    rounded -= space
  if rounded == 0:  # cannot happen for t >= 0; kept to mirror the reference exactly
    rounded += space
  return rounded


def timesteps_for(schedule: Sequence[float]) -> tuple[int, ...]:
  """Maps schedule values in [0, 1] to the timesteps the original samples at.

  `s -> round_timestep(int((1024 - 1) * s))`; Python's `int` truncates. The default
  (1.0, 0.5) gives (1008, 512).
  """
  if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence):
    raise TypeError(f"schedule must be a sequence of numbers in [0, 1], such as (1.0, 0.5);"
                    f" got {schedule!r}")
  if len(schedule) == 0:
    raise ValueError("schedule is empty: give at least one value in [0, 1], e.g. (1.0,) for"
                     " one step or (1.0, 0.5) for the default two steps")
  timesteps = []
  for s in schedule:
    if isinstance(s, bool) or not isinstance(s, numbers.Real):
      raise TypeError(f"schedule values must be numbers in [0, 1]; got {s!r} in {schedule!r}")
    if not 0.0 <= float(s) <= 1.0:  # also refuses NaN
      raise ValueError(f"schedule value {s!r} is outside [0, 1] (in {tuple(schedule)!r}); each"
                       " value is a fraction of the 1024 training timesteps")
    timesteps.append(round_timestep(int((NUM_TRAIN_TIMESTEPS - 1) * float(s))))
  return tuple(timesteps)
