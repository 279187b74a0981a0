"""Results that must not move with the JAX version: decode, encode and a training step's loss
and gradients, and the quick start's PNGs.

CI runs this file in both legs (README "Tests"). The Python 3.11 leg (jax 0.10.2, with torch)
computes each result, checks decode and encode against PyTorch in the same test, and stores
inputs and results under $JAXCONSDEC_ACROSS_VERSIONS. The newest-JAX leg loads the same
inputs, computes again and compares, within the bounds below. Without the variable there is
nothing to compare with, and the comparisons skip (the checks against torch still run).

Bounds: both sides are float32 on XLA:CPU, whose convolution and reduction order may change
between releases; the parity suite measures ~1e-6 between jaxconsdec and torch, so 1e-5 leaves
room for reordering and nothing more. bf16 rounds differently wherever the order changes.
"""

import os

import numpy as np
import pytest
from flax import traverse_util

import jaxconsdec as jcd

ACROSS = os.environ.get("JAXCONSDEC_ACROSS_VERSIONS")
BOUND = {"float32": 1e-5, "bfloat16": 1e-2}
GRAD_BOUND = 1e-4  # gradients sum over every pixel: more terms to reorder
# Small, so that each leg compiles it quickly: one ResBlock per level.
SMALL = jcd.UNetConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                       norm_num_groups=8)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _torch():
  try:
    import torch
  except ImportError:
    return None
  return torch


def _stored(name: str):
  """The 3.11 leg's record of `name`, or None where this leg is the one that writes it."""
  if not ACROSS:
    return None
  path = os.path.join(ACROSS, name + ".npz")
  if _torch() is not None:  # the leg with torch writes
    return None
  if not os.path.exists(path):
    pytest.fail(f"{path} is missing: the Python 3.11 leg writes it (.ci/run runs it first)")
  with np.load(path) as f:
    return dict(f)


def _store(name: str, arrays: dict) -> None:
  if ACROSS and _torch() is not None:
    os.makedirs(ACROSS, exist_ok=True)
    np.savez(os.path.join(ACROSS, name + ".npz"), **arrays)


def _flat(params) -> dict:
  return {"param/" + "/".join(k): np.asarray(v)
          for k, v in traverse_util.flatten_dict(params).items()}


def _unflat(arrays) -> dict:
  return traverse_util.unflatten_dict({tuple(k.split("/")[1:]): v for k, v in arrays.items()
                                       if k.startswith("param/")})


def test_decode():
  stored = _stored("decode")
  if stored is None:
    torch = _torch()
    rng = np.random.default_rng(0)
    latents = (rng.standard_normal((2, 4, 4, 6)) / 0.18215).astype(np.float32)
    noise = rng.standard_normal((2, 2, 3, 32, 48)).astype(np.float32)
    if torch is not None:
      from reference import diffusers_vae, state_dict_numpy
      vae = diffusers_vae(SMALL, seed=11)
      params = jcd.params_from_torch(state_dict_numpy(vae.decoder_unet), SMALL)
    else:
      params = jcd.random_params(SMALL, seed=11)
    inputs = {"latents": latents, "noise": noise, **_flat(params)}
  else:
    inputs, params = stored, _unflat(stored)
  results = {}
  for dtype in BOUND:
    out = jcd.decode(params, inputs["latents"], 0, config=SMALL.replace(dtype=dtype),
                     noise=list(inputs["noise"]), clamp=False)
    results[dtype] = np.asarray(out, np.float32)
    assert np.isfinite(results[dtype]).all()
  if stored is None:
    if _torch() is not None:
      from reference import diffusers_vae_decode
      with pytest.MonkeyPatch.context() as mp:
        want = diffusers_vae_decode(vae, inputs["latents"], list(inputs["noise"]), mp)
      assert _rel(results["float32"], want.numpy()) <= 1e-4
    _store("decode", {**inputs, **{"out_" + k: v for k, v in results.items()}})
    if ACROSS is None:
      pytest.skip("JAXCONSDEC_ACROSS_VERSIONS is not set: nothing to compare across versions")
    return
  for dtype, bound in BOUND.items():
    assert _rel(results[dtype], stored["out_" + dtype]) <= bound, dtype


def test_encode():
  stored = _stored("encode")
  if stored is None:
    torch = _torch()
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (2, 3, 40, 24)).astype(np.float32)
    if torch is not None:
      from reference import diffusers_autoencoder, state_dict_numpy
      ae = diffusers_autoencoder(jcd.TINY_VAE, seed=12)
      params = jcd.params_from_torch(state_dict_numpy(ae), jcd.TINY_VAE)
    else:
      params = jcd.random_params(jcd.TINY_VAE, seed=12)
    inputs = {"images": images, **_flat(params)}
  else:
    inputs, params = stored, _unflat(stored)
  out = np.asarray(jcd.encode(params, inputs["images"], config=jcd.TINY_VAE), np.float32)
  if stored is None:
    if _torch() is not None:
      with torch.no_grad():
        want = ae.encode(torch.from_numpy(inputs["images"])).latent_dist.mean.numpy()
      assert _rel(out, want) <= 1e-5
    _store("encode", {**inputs, "out": out})
    if ACROSS is None:
      pytest.skip("JAXCONSDEC_ACROSS_VERSIONS is not set: nothing to compare across versions")
    return
  assert _rel(out, stored["out"]) <= BOUND["float32"]


def test_training_loss_and_gradients():
  """The loss is checked against an independent torch loss in test_training_loss.py, on
  the 3.11 leg; here, that a version change moves neither it nor its gradients."""
  import jax
  stored = _stored("train_step")
  if stored is None:
    rng = np.random.default_rng(2)
    inputs = {"images": rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32),
              "latents": (rng.standard_normal((2, 4, 4, 4)) / 0.18215).astype(np.float32),
              "noise": rng.standard_normal((2, 32, 32, 3)).astype(np.float32),
              "t_lo": np.array([-1, 300], np.int32), "t_hi": np.array([40, 700], np.int32),
              **_flat(jcd.random_params(SMALL, seed=13))}
    params = _unflat(inputs)
  else:
    inputs, params = stored, _unflat(stored)

  def loss(p):
    return jcd.consistency_loss(p, inputs["images"], inputs["latents"], inputs["t_lo"],
                                inputs["t_hi"], inputs["noise"], config=SMALL).mean()
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  grads = np.concatenate([np.ravel(v) for v in _flat(grads).values()])
  assert np.isfinite(value) and np.isfinite(grads).all() and np.abs(grads).max() > 0
  if stored is None:
    _store("train_step", {**inputs, "loss": np.asarray(value), "grads": grads})
    if ACROSS is None:
      pytest.skip("JAXCONSDEC_ACROSS_VERSIONS is not set: nothing to compare across versions")
    return
  assert _rel(value, stored["loss"]) <= BOUND["float32"]
  assert _rel(grads, stored["grads"]) <= GRAD_BOUND


def test_quick_start_pngs():
  """The README's quick start, run by each leg of .ci/run into ACROSS/<leg>/: the same
  pictures within one 8-bit level."""
  if not ACROSS or _torch() is not None:
    pytest.skip("compared in the newest-JAX leg, against the 3.11 leg's quick start")
  from PIL import Image
  for name in ("astronaut", "chelsea", "coffee"):
    old, new = (os.path.join(ACROSS, leg, name + ".png") for leg in ("py311", "newest"))
    a = np.asarray(Image.open(old), np.int16)
    b = np.asarray(Image.open(new), np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1, name
