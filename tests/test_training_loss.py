"""The consistency loss against an independent PyTorch implementation written here from
TRAINING.md section 2 on diffusers' UNet2DModel (same weights, same inputs); its gradients
against torch autograd; the structural zeros; shared dropout; the pair law against the erf
formula and a chi-squared test of draws."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from diffusers.schedulers.scheduling_consistency_decoder import (ConsistencyDecoderScheduler,
                                                                 betas_for_alpha_bar)
from scipy import stats

import jaxconsdec as jcd
from jaxconsdec.training import pairs
from reference import diffusers_unet, flax_params_of, nchw, rel_err
from small_models import SMALLEST

CFG = SMALLEST  # every kind of block once: the loss does not depend on the depth
# SPEC section 2: the released decoder normalises scaled SD latents with these.
SD_SCALE = 0.18215
SD_MEAN = torch.tensor([0.38862467, 0.02253063, 0.07381133, -0.0171294])[None, :, None, None]
SD_STD = torch.tensor([0.9654121, 1.0440036, 0.76147926, 0.77022034])[None, :, None, None]


def _sigmas() -> np.ndarray:
  """sigma_t = sqrt(1 / alpha_bar_t - 1), float64, from the scheduler's own alpha-bar (which
  it does not keep: rebuilt as its __init__ does)."""
  acp = torch.cumprod(1.0 - betas_for_alpha_bar(1024), dim=0)
  return np.sqrt(1.0 / acp.double().numpy() - 1.0)


class TorchLoss:
  """TRAINING.md section 2, steps 3-7, in torch, per example."""

  def __init__(self, unet):
    self.unet = unet
    s = ConsistencyDecoderScheduler()
    self.s = s
    self.sigma = _sigmas()

  def D(self, x_t, t, z):
    s = self.s
    out = self.unet(torch.cat([s.c_in[t] * x_t, z], dim=1), torch.tensor([t])).sample
    return s.c_skip[t] * x_t + s.c_out[t] * out[:, :3]

  def __call__(self, x0, raw_latent, t_lo, t_hi, eps, weighting="ict"):
    """x0 (1, 3, H, W), raw_latent (1, 4, h, w), eps like x0: one example's loss."""
    s = self.s
    z = (SD_SCALE * raw_latent - SD_MEAN) / SD_STD
    z = z.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    x_hi = s.sqrt_alphas_cumprod[t_hi] * x0 + s.sqrt_one_minus_alphas_cumprod[t_hi] * eps
    student = self.D(x_hi, t_hi, z)
    if t_lo == -1:
      teacher, sigma_lo = x0, 0.0
    else:
      with torch.no_grad():
        x_lo = s.sqrt_alphas_cumprod[t_lo] * x0 + s.sqrt_one_minus_alphas_cumprod[t_lo] * eps
        teacher = self.D(x_lo, t_lo, z)
      sigma_lo = float(self.sigma[t_lo])
    weight = 1.0 / (float(self.sigma[t_hi]) - sigma_lo) if weighting == "ict" else 1.0
    c = 0.00054 * math.sqrt(3 * x0.shape[2] * x0.shape[3])
    # The last step in float64: in float32, sqrt(n + c^2) - c cancels where n << c^2.
    return weight * (torch.sqrt(((student - teacher) ** 2).sum().double() + c * c) - c)


def _inputs(seed, batch, size, noise_scale=1.0, image_scale=1.0):
  rng = np.random.default_rng(seed)
  x0 = np.clip(rng.standard_normal((batch, size, size, 3)) * 0.5, -1, 1) * image_scale
  lat = rng.standard_normal((batch, size // 8, size // 8, 4)) * 4.0
  eps = rng.standard_normal((batch, size, size, 3)) * noise_scale
  return [a.astype(np.float32) for a in (x0, lat, eps)]


def _torch_losses(ref, x0, lat, eps, t_lo, t_hi, weighting="ict"):
  return torch.stack([ref(nchw(x0[i:i + 1]), nchw(lat[i:i + 1]), int(t_lo[i]), int(t_hi[i]),
                          nchw(eps[i:i + 1]), weighting) for i in range(len(x0))])


@pytest.fixture(scope="module")
def model():
  unet = diffusers_unet(CFG, seed=3)
  return unet, flax_params_of(unet)


# A boundary pair, neighbours at the low and high ends of the released grid, and a wide pair.
T_LO = np.array([-1, 16, 992, 128])
T_HI = np.array([16, 32, 1008, 512])


@pytest.mark.parametrize("weighting", ["ict", "uniform"])
def test_loss_matches_an_independent_torch_loss(model, weighting):
  unet, params = model
  x0, lat, eps = _inputs(0, 4, 32)
  got = jcd.consistency_loss(params, x0, lat, T_LO, T_HI, eps, config=CFG, weighting=weighting)
  want = _torch_losses(TorchLoss(unet), x0, lat, eps, T_LO, T_HI, weighting)
  assert got.dtype == jnp.float32 and got.shape == (4,)
  err = rel_err(got, want)
  print("loss", np.asarray(got), "rel err", err)
  assert err < 1e-5


def test_loss_is_the_pseudo_huber_of_the_whole_norm_far_above_and_below_c(model):
  """With conv_out scaled down, D is nearly c_skip x_t; tiny images and noise give error
  norms far below c = 0.0299 (32x32), ordinary ones far above. An elementwise pseudo-Huber,
  or sqrt(n + c^2) - c in float32, would miss the reference here."""
  unet, _ = model
  quiet = diffusers_unet(CFG, seed=3)
  with torch.no_grad():
    quiet.conv_out.weight.mul_(1e-4)
    quiet.conv_out.bias.mul_(1e-4)
  params = flax_params_of(quiet)
  x_big, lat, eps_big = _inputs(1, 2, 32)
  x_small, _, eps_small = _inputs(2, 2, 32, noise_scale=1e-6, image_scale=1e-6)
  x0 = np.concatenate([x_big, x_small])
  eps = np.concatenate([eps_big, eps_small])
  lat = np.concatenate([lat, lat])
  t_lo, t_hi = np.array([16, 256, 16, -1]), np.array([32, 272, 32, 16])
  got = np.asarray(jcd.consistency_loss(params, x0, lat, t_lo, t_hi, eps, config=CFG))
  want = _torch_losses(TorchLoss(quiet), x0, lat, eps, t_lo, t_hi).detach().double().numpy()
  print("losses", got, want)
  c = 0.00054 * math.sqrt(3 * 32 * 32)
  huber = got * np.array([pairs.sigma(hi) - pairs.sigma(lo) for lo, hi in zip(t_lo, t_hi)])
  assert min(huber[:2]) > 20 * c and max(huber[2:]) < c / 100  # both regimes are present
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_gradients_match_torch_autograd_and_the_structural_zeros(model):
  unet, params = model
  x0, lat, eps = _inputs(4, 4, 32)
  mean_loss = lambda p: jnp.mean(jcd.consistency_loss(p, x0, lat, T_LO, T_HI, eps, config=CFG))
  grads = jax.grad(mean_loss)(params)

  unet.zero_grad()
  _torch_losses(TorchLoss(unet), x0, lat, eps, T_LO, T_HI).mean().backward()
  pairs_to_check = [
      (grads["conv_in"]["kernel"], unet.conv_in.weight.grad.numpy().transpose(2, 3, 1, 0)),
      (grads["time_proj"]["embedding"], unet.time_proj.weight.grad.numpy()),
      (grads["down_blocks_1"]["resnets_0"]["conv2"]["kernel"],
       unet.down_blocks[1].resnets[0].conv2.weight.grad.numpy().transpose(2, 3, 1, 0)),
      (grads["conv_out"]["kernel"], unet.conv_out.weight.grad.numpy().transpose(2, 3, 1, 0)),
  ]
  for got, want in pairs_to_check:
    err = rel_err(got, want)
    print("grad rel err", err)
    assert err < 1e-4

  # Only channels 0..2 of the output enter the denoiser.
  out = grads["conv_out"]
  assert np.all(np.asarray(out["kernel"])[..., 3:] == 0) and np.all(np.asarray(out["bias"])[3:] == 0)
  assert np.any(np.asarray(out["kernel"])[..., :3] != 0)
  # The time table learns only on the student's rows: t_hi, never the teacher's t_lo.
  table = np.asarray(grads["time_proj"]["embedding"])
  nonzero_rows = set(np.flatnonzero(np.any(table != 0, axis=1)).tolist())
  assert nonzero_rows == set(T_HI.tolist())


def test_dropout_is_shared_between_student_and_teacher():
  """t_lo = t_hi with dropout on: the student and the teacher are the same computation, so the
  loss is exactly zero. Masks drawn separately would differ."""
  cfg = CFG.replace(dropout=0.3)
  params = jcd.random_params(CFG, 0)
  x0, lat, eps = _inputs(5, 3, 32)
  t = np.array([16, 400, 1008])
  key = jax.random.key(9)
  same = jcd.consistency_loss(params, x0, lat, t, t, eps, config=cfg, dropout_key=key)
  np.testing.assert_array_equal(np.asarray(same), 0.0)
  # ...and dropout is really on: other keys change the loss of a real pair.
  lo = np.array([-1, 384, 992])
  a = jcd.consistency_loss(params, x0, lat, lo, t, eps, config=cfg, dropout_key=key)
  b = jcd.consistency_loss(params, x0, lat, lo, t, eps, config=cfg, dropout_key=jax.random.key(10))
  assert np.all(np.asarray(a) != np.asarray(b))
  # Per-example keys: an example's loss does not depend on the batch around it.
  keys = jax.random.split(key, 3)
  whole = jcd.consistency_loss(params, x0, lat, lo, t, eps, config=cfg, dropout_key=keys)
  one = jcd.consistency_loss(params, x0[1:2], lat[1:2], lo[1:2], t[1:2], eps[1:2], config=cfg,
                             dropout_key=keys[1:2])
  np.testing.assert_allclose(np.asarray(whole)[1], np.asarray(one)[0], rtol=1e-6)


def test_denoising_loss_matches_torch(model):
  """Stage 1: EDM's weight (sigma^2 + 0.25) / (0.25 sigma^2) times the mean squared error of
  D(x_t, t; z) against the clean image, written here in torch."""
  unet, params = model
  x0, lat, eps = _inputs(6, 3, 32)
  t = np.array([0, 300, 1023])
  got = np.asarray(jcd.denoising_loss(params, x0, lat, t, eps, config=CFG))
  ref, sigma = TorchLoss(unet), _sigmas()
  want = []
  for i in range(3):
    s = ref.s
    x_t = s.sqrt_alphas_cumprod[t[i]] * nchw(x0[i:i + 1]) + s.sqrt_one_minus_alphas_cumprod[
        t[i]] * nchw(eps[i:i + 1])
    z = (SD_SCALE * nchw(lat[i:i + 1]) - SD_MEAN) / SD_STD
    z = z.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    mse = ((ref.D(x_t, int(t[i]), z) - nchw(x0[i:i + 1])) ** 2).mean().double().item()
    want.append((sigma[t[i]] ** 2 + 0.25) / (0.25 * sigma[t[i]] ** 2) * mse)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_denoising_levels_snap_to_the_nearest_table_level():
  sigma = _sigmas()
  wanted = np.exp(np.linspace(-8, 12, 401))
  got = np.asarray(pairs.snap_to_table(jnp.log(jnp.asarray(wanted, jnp.float32))))
  nearest = np.argmin(np.abs(np.log(sigma)[None, :] - np.log(wanted)[:, None]), axis=1)
  assert np.mean(got == nearest) > 0.99  # float32 ties at midpoints aside
  assert np.all(np.abs(got - nearest) <= 1)
  t = np.asarray(pairs.draw_levels(jax.random.split(jax.random.key(0), 20_000)))
  median = np.median(np.log(sigma[t]))
  assert abs(median - pairs.P_MEAN) < 0.1 and t.min() >= 0 and t.max() <= 1023


def test_denoising_levels_on_a_grid_take_their_band_of_the_law():
  sigma = _sigmas()
  levels, _ = pairs.pair_table(16, pairs.pair_count(4))  # padded, as the step passes them
  wanted = np.exp(np.linspace(-8, 12, 401))
  got = np.asarray(pairs.snap_to_levels(jnp.log(jnp.asarray(wanted, jnp.float32)), levels))
  grid = np.arange(16, 1009, 16)
  nearest = grid[np.argmin(np.abs(np.log(sigma[grid])[None, :] - np.log(wanted)[:, None]), 1)]
  assert np.mean(got == nearest) > 0.99 and set(got) <= set(grid)
  # The sampler's rows take the whole band of the law nearest to them.
  n, law = 40_000, (1.0, 2.0)
  t = np.asarray(pairs.draw_levels(jax.random.split(jax.random.key(1), n), law, levels))
  assert set(t) <= set(grid)
  top_band = 1.0 - stats.norm.cdf((np.log(sigma[992] * sigma[1008]) / 2 - 1.0) / 2.0)
  assert abs(np.mean(t == 1008) - top_band) < 4 * math.sqrt(top_band / n)
  assert top_band > 0.1  # over 100 times the whole table's row 1008 under iCT's law


@pytest.mark.parametrize("law", [(0.0, 0.0), (1.0, -2.0), (float("nan"), 1.0), (1.0,)])
def test_a_broken_noise_law_is_refused(law):
  with pytest.raises(ValueError):
    pairs.pair_probabilities(16, law)


def _erf_law(delta, mean=-1.1, std=2.0):
  """The pair law, from TRAINING.md's formula and diffusers' own alpha-bar table."""
  sigma = _sigmas()
  levels = list(range(delta, 1009, delta))
  cdf = [-1.0] + [math.erf((math.log(sigma[t]) - mean) / (math.sqrt(2.0) * std))
                  for t in levels]
  mass = np.diff(cdf)
  return [-1] + levels, mass / mass.sum()


@pytest.mark.parametrize("delta, boundary", [(64, 0.305), (32, 0.203), (16, 0.135), (8, 0.091),
                                             (4, 0.064)])
def test_pair_law_is_the_discretised_lognormal(delta, boundary):
  levels, law = _erf_law(delta)
  np.testing.assert_array_equal(pairs.grid(delta), levels)
  np.testing.assert_allclose(pairs.pair_probabilities(delta), law, rtol=1e-9)
  assert round(float(law[0]), 3) == boundary  # TRAINING.md's computed values
  levels, law = _erf_law(delta, 1.0, 1.5)
  np.testing.assert_allclose(pairs.pair_probabilities(delta, (1.0, 1.5)), law, rtol=1e-9)


def test_drawn_pairs_follow_the_law():
  delta, n = 16, 40_000
  keys = jax.random.split(jax.random.key(0), n)
  t_lo, t_hi = map(np.asarray, pairs.draw_pairs(keys, delta))
  levels, law = _erf_law(delta)
  assert np.all(t_hi - np.where(t_lo == -1, 0, t_lo) == delta)
  index = np.searchsorted(np.array(levels), t_lo)
  counts = np.bincount(index, minlength=len(law))
  # Pool the rare pairs so that every cell expects at least 5 draws.
  expected = law * n
  order = np.argsort(expected)
  rare = order[np.cumsum(expected[order]) < 50]
  keep = np.setdiff1d(np.arange(len(law)), rare)
  obs, exp = counts[keep], expected[keep]
  if len(rare):
    obs, exp = np.append(obs, counts[rare].sum()), np.append(exp, expected[rare].sum())
  p = stats.chisquare(obs, exp).pvalue
  print("chi-squared p", p)
  assert p > 1e-3
  # The same key draws the same pair whatever batch it is in.
  lo_one, hi_one = pairs.draw_pairs(keys[123:124], delta)
  assert (int(lo_one[0]), int(hi_one[0])) == (t_lo[123], t_hi[123])


def test_curriculum_stages_take_equal_shares():
  stages = [pairs.curriculum_delta(s, 100, pairs.SCRATCH_CURRICULUM) for s in range(100)]
  assert stages[:20] == [64] * 20 and stages[20:40] == [32] * 20 and stages[80:] == [4] * 20
  assert pairs.curriculum_delta(500, 100, (16,)) == 16


def test_anchored_examples_take_the_clean_image_as_teacher():
  keys = jax.random.split(jax.random.key(2), 20_000)
  t_lo, _ = pairs.draw_pairs(keys, 16)
  assert np.array_equal(pairs.anchor(keys, t_lo, 0.0), t_lo)
  assert np.all(np.asarray(pairs.anchor(keys, t_lo, 1.0)) == pairs.VIRTUAL_LEVEL)
  half = np.asarray(pairs.anchor(keys, t_lo, 0.5))
  moved = (half == pairs.VIRTUAL_LEVEL) & (np.asarray(t_lo) != pairs.VIRTUAL_LEVEL)
  assert abs(moved.mean() - 0.5 * np.mean(np.asarray(t_lo) != pairs.VIRTUAL_LEVEL)) < 0.015
  assert np.all((half == np.asarray(t_lo)) | (half == pairs.VIRTUAL_LEVEL))
  # An example's choice is its key's alone, whatever batch it is in.
  assert int(pairs.anchor(keys[7:8], t_lo[7:8], 0.5)[0]) == half[7]
  with pytest.raises(ValueError):
    pairs.anchor(keys, t_lo, 1.5)
