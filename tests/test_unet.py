"""The whole UNet against diffusers' UNet2DModel on the same weights (bound: 1e-5 relative)."""

import numpy as np
import pytest
pytest.importorskip("torch")  # compares against PyTorch; skipped without it
import torch

import jaxconsdec as jcd
from reference import diffusers_unet, nchw, nhwc, rel_err, state_dict_numpy

UNET_TOL = 1e-5


def _torch_block_outputs(ref, x, t):
  """Each top-level block's output in torch, named as the JAX intermediates."""
  outs = {}
  hooks = [getattr(ref, name).register_forward_hook(
      lambda m, i, o, name=name: outs.__setitem__(name, o[0] if isinstance(o, tuple) else o))
      for name in ("mid_block",)]
  hooks += [b.register_forward_hook(lambda m, i, o, name=f"down_blocks_{k}": outs.__setitem__(
      name, o[0])) for k, b in enumerate(ref.down_blocks)]
  hooks += [b.register_forward_hook(lambda m, i, o, name=f"up_blocks_{k}": outs.__setitem__(
      name, o)) for k, b in enumerate(ref.up_blocks)]
  with torch.no_grad():
    out = ref(nchw(x), torch.from_numpy(t).long()).sample
  for h in hooks:
    h.remove()
  return out, outs


def check_unet(cfg, seed, hw, batch=2):
  ref = diffusers_unet(cfg, seed)
  params = jcd.params_from_torch(state_dict_numpy(ref), cfg)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, hw, hw, cfg.in_channels)).astype(np.float32)
  t = rng.integers(0, cfg.num_train_timesteps, batch).astype(np.int32)
  got, state = jcd.UNet(cfg).apply({"params": params}, x, t, mutable=["intermediates"])
  want, torch_blocks = _torch_block_outputs(ref, x, t)
  err = rel_err(got, nhwc(want))
  # On failure, say which block first departs from the reference.
  per_block = {name: rel_err(state["intermediates"][f"{name}_output"][0], nhwc(out))
               for name, out in torch_blocks.items()}
  print(f"\nUNet {cfg.block_out_channels} x{cfg.layers_per_block} at {hw}x{hw}: rel err {err:.3e}")
  assert err <= UNET_TOL, f"relative error {err:.2e}; per block: {per_block}"
  return err


def test_tiny_unet_matches_diffusers():
  check_unet(jcd.TINY, seed=1, hw=32)


def test_other_family_member_matches_diffusers():
  # Three levels, four layers per block, 4 groups, 12 output channels: UNetConfig is general.
  cfg = jcd.UNetConfig(block_out_channels=(16, 32, 48), layers_per_block=3, norm_num_groups=4,
                       out_channels=12, in_channels=7)
  check_unet(cfg, seed=2, hw=16, batch=3)


@pytest.mark.released
def test_released_widths_unet_matches_diffusers():
  check_unet(jcd.CONSISTENCY_DECODER, seed=3, hw=64, batch=1)
