"""Parity of each building block against its diffusers twin (bound: 1e-5 relative)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
pytest.importorskip("torch")  # compares against PyTorch; skipped without it
import torch
from diffusers.models.resnet import ResnetBlock2D

import jaxconsdec as jcd
from jaxconsdec.models.layers import ResnetBlock, UpsampledConv
from reference import diffusers_unet, flax_params_of, nchw, nhwc, randomize_, rel_err

BLOCK_TOL = 1e-5


def _run_resblock(c_in, c_out, resample, seed, hw=16, groups=8, temb_dim=64):
  cfg = jcd.UNetConfig(block_out_channels=(c_out,), norm_num_groups=groups, layers_per_block=1)
  block = randomize_(ResnetBlock2D(
      in_channels=c_in, out_channels=c_out, temb_channels=temb_dim, groups=groups, eps=1e-5,
      time_embedding_norm="scale_shift", up=resample == "up", down=resample == "down"), seed)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, hw, hw, c_in)).astype(np.float32)
  temb = rng.standard_normal((2, temb_dim)).astype(np.float32)
  with torch.no_grad():
    want = block(nchw(x), torch.from_numpy(temb))
  got = ResnetBlock(cfg, c_out, resample).apply({"params": flax_params_of(block)}, x, temb)
  return got, nhwc(want), block


@pytest.mark.parametrize("c_in,c_out,resample,has_shortcut", [
    (32, 32, None, False),     # plain ResBlock, identity shortcut
    (48, 32, None, True),      # width change: 1x1 conv shortcut
    (32, 32, "down", False),   # downsamplers_0
    (32, 32, "up", False),     # upsamplers_0
])
def test_resblock_matches_diffusers(c_in, c_out, resample, has_shortcut):
  got, want, block = _run_resblock(c_in, c_out, resample, seed=c_in + c_out + len(str(resample)))
  assert (block.conv_shortcut is not None) == has_shortcut
  scale = {"down": 0.5, "up": 2, None: 1}[resample]
  assert got.shape == (2, int(16 * scale), int(16 * scale), c_out)
  err = rel_err(got, want)
  assert err <= BLOCK_TOL, f"relative error {err:.2e}"


def test_upsampled_conv_is_conv_of_nearest_upsampled_input():
  """The four-phase form against torch's conv2d(interpolate(x, x2 nearest)): odd, non-square
  sizes (every border case), a width change, a bias; and it must spend < half the FLOPs."""
  rng = np.random.default_rng(7)
  x = rng.standard_normal((2, 5, 7, 12)).astype(np.float32)
  kernel = rng.standard_normal((3, 3, 12, 9)).astype(np.float32)
  bias = rng.standard_normal(9).astype(np.float32)
  with torch.no_grad():
    up = torch.nn.functional.interpolate(nchw(x), scale_factor=2.0, mode="nearest")
    want = torch.nn.functional.conv2d(up, torch.from_numpy(kernel).permute(3, 2, 0, 1),
                                      torch.from_numpy(bias), padding=1)
  module = UpsampledConv(9, jnp.float32, jnp.float32, jax.lax.Precision.HIGHEST)
  variables = {"params": {"kernel": kernel, "bias": bias}}
  got = module.apply(variables, x)
  assert got.shape == (2, 10, 14, 9)
  assert rel_err(got, nhwc(want)) <= BLOCK_TOL

  def naive(x):
    return jax.lax.conv_general_dilated(
        jnp.repeat(jnp.repeat(x, 2, 1), 2, 2), kernel, (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  flops = lambda f: jax.jit(f).lower(x).compile().cost_analysis()["flops"]
  assert flops(lambda x: module.apply(variables, x)) < 0.5 * flops(naive)


def _tiny_unet_with_intermediates(seed, hw=32):
  cfg = jcd.TINY
  ref = diffusers_unet(cfg, seed)
  params = jcd.params_from_torch({k: v.numpy() for k, v in ref.state_dict().items()}, cfg)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, hw, hw, cfg.in_channels)).astype(np.float32)
  t = np.array([1008, 512], np.int32)
  out, state = jcd.UNet(cfg).apply({"params": params}, x, t, mutable=["intermediates"])
  inter = {k: v[0] for k, v in state["intermediates"].items()}
  return cfg, ref, x, t, out, inter


def test_time_embedding_matches_diffusers():
  _, ref, _, t, _, inter = _tiny_unet_with_intermediates(seed=11)
  with torch.no_grad():
    want = ref.time_embedding(ref.time_proj(torch.from_numpy(t).long()))
  err = rel_err(inter["time_embedding_output"], want)
  assert err <= BLOCK_TOL, f"relative error {err:.2e}"


def test_output_head_matches_diffusers():
  # The head alone: JAX's own input to it (the last up block's output) through torch's head.
  _, ref, _, _, out, inter = _tiny_unet_with_intermediates(seed=12)
  with torch.no_grad():
    h = nchw(inter["up_blocks_3_output"])
    want = ref.conv_out(ref.conv_act(ref.conv_norm_out(h)))
  err = rel_err(out, nhwc(want))
  assert err <= BLOCK_TOL, f"relative error {err:.2e}"


def test_group_norm_statistics_stay_float32_in_bf16():
  # precision.py relies on Flax computing GroupNorm mean/variance in float32 whatever the
  # module dtype. Input: a mean 1000x its spread, where bf16 statistics (spacing 4 at 1000)
  # would be off by whole standard deviations.
  from jaxconsdec.models.layers import group_norm as _group_norm
  x = (1000.0 + np.random.default_rng(0).standard_normal((1, 8, 8, 32))).astype(np.float32)
  outs = {}
  for dtype in ("float32", "bfloat16"):
    norm = _group_norm("n", jcd.TINY.replace(dtype=dtype))
    outs[dtype] = norm.apply(norm.init(jax.random.key(0), x), x)
  assert outs["bfloat16"].dtype == jnp.bfloat16
  diff = jnp.abs(outs["bfloat16"].astype(jnp.float32) - outs["float32"])
  assert float(diff.max()) < 0.05  # bf16 rounding of O(1) outputs only
