"""Schedule tables against diffusers' ConsistencyDecoderScheduler and SPEC section 2."""

import numpy as np
import pytest
pytest.importorskip("torch")  # compares against PyTorch; skipped without it
import torch
from diffusers.schedulers.scheduling_consistency_decoder import ConsistencyDecoderScheduler

import jaxconsdec as jcd
from reference import original_timesteps

NAMES = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "c_skip", "c_out", "c_in")


def ulps(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def test_alphas_cumprod_equals_diffusers_bit_for_bit():
  from diffusers.schedulers.scheduling_consistency_decoder import betas_for_alpha_bar
  betas = betas_for_alpha_bar(1024)
  assert np.array_equal(jcd.TABLES.betas, betas.numpy())
  assert np.array_equal(jcd.TABLES.alphas_cumprod, torch.cumprod(1.0 - betas, 0).numpy())


def test_sqrt_tables_within_one_ulp_of_diffusers():
  sched = ConsistencyDecoderScheduler()
  for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
    assert ulps(getattr(jcd.TABLES, name), getattr(sched, name).numpy()).max() <= 1, name


def test_all_tables_within_one_ulp_of_the_reference_formula_with_ieee_sqrt():
  # torch's CPU float32 sqrt is faithful (<= 1 ulp) but not correctly rounded, and the
  # c_* tables compound up to 4 such ulps. Our tables use IEEE sqrt, as the original's CUDA
  # construction did. Replay diffusers' exact operation order in torch with a correctly
  # rounded sqrt (float64 sqrt of a float32, rounded once, is correctly rounded).
  from diffusers.schedulers.scheduling_consistency_decoder import betas_for_alpha_bar
  sqrt = lambda x: torch.sqrt(x.double()).float()
  acp = torch.cumprod(1.0 - betas_for_alpha_bar(1024), dim=0)
  sigmas = sqrt(1.0 / acp - 1)
  recip = sqrt(1.0 / acp)
  want = dict(
      sqrt_alphas_cumprod=sqrt(acp), sqrt_one_minus_alphas_cumprod=sqrt(1.0 - acp),
      c_skip=recip * 0.5 ** 2 / (sigmas ** 2 + 0.5 ** 2),
      c_out=sigmas * 0.5 / sqrt(sigmas ** 2 + 0.5 ** 2),
      c_in=recip / sqrt(sigmas ** 2 + 0.5 ** 2))
  sched = ConsistencyDecoderScheduler()
  for name in NAMES:
    assert ulps(getattr(jcd.TABLES, name), want[name].numpy()).max() <= 1, name
    # and against diffusers as it runs, torch's sqrt and all: a few ulps, no more.
    assert ulps(getattr(jcd.TABLES, name), getattr(sched, name).numpy()).max() <= 4, name


@pytest.mark.parametrize("t,values", [
    (1008, (0.022826891, 0.9997394, 0.005708954, 0.49996743, 1.0001954)),
    (512, (0.7016565, 0.71251535, 0.27810028, 0.4485725, 1.2591237)),
])
def test_tables_match_spec_values(t, values):
  for name, v in zip(NAMES, values):
    # SPEC prints 8 significant digits of the diffusers CPU values.
    np.testing.assert_allclose(getattr(jcd.TABLES, name)[t], v, rtol=2e-7, err_msg=name)


def test_tables_stay_float32():
  for name in NAMES:
    assert getattr(jcd.TABLES, name).dtype == np.float32


@pytest.mark.parametrize("schedule", [
    (1.0,), (1.0, 0.5), (1.0, 0.75, 0.5, 0.25), (0.0,), (0.3, 0.999, 0.0156, 0.016),
    tuple(np.linspace(0, 1, 97))])
def test_timesteps_match_the_original_rounding(schedule):
  assert jcd.timesteps_for(schedule) == tuple(original_timesteps(schedule))


def test_default_schedule_is_1008_then_512():
  assert jcd.timesteps_for((1.0, 0.5)) == (1008, 512)
