"""The SD VAE against diffusers' AutoencoderKL on the same fresh random weights: the
encoder's posterior (mean, logvar, a sample with injected noise) and the GAN decoder, at tiny
and SD widths, for 4- and 16-channel latents, on odd multiple-of-8 sizes (the asymmetric
downsampling pad shows there)."""

import numpy as np
import pytest

pytest.importorskip("torch")  # compares against PyTorch; skipped without it
import torch

import jax
import jaxconsdec as jcd
from jaxconsdec.config import SD3_VAE, SD_VAE, TINY_VAE
from jaxconsdec.models.vae import VAE, posterior
from jaxconsdec.weights import param_count
from reference import diffusers_autoencoder, nchw, nhwc, rel_err, state_dict_numpy

VAE_TOL = 1e-5


def check_vae(cfg, seed, h, w, batch=2):
  ref = diffusers_autoencoder(cfg, seed)
  params = jcd.params_from_torch(state_dict_numpy(ref), cfg)
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (batch, h, w, 3)).astype(np.float32)
  eps = rng.standard_normal((batch, h // 8, w // 8, cfg.latent_channels)).astype(np.float32)
  with torch.no_grad():
    dist = ref.encode(nchw(x)).latent_dist
    sample = dist.mean + dist.std * nchw(eps)
    decoded = ref.decode(sample).sample
  model = VAE(cfg)
  moments = model.apply({"params": params}, x, method=VAE.encode_moments)
  mean, std = posterior(moments, cfg.latent_channels)
  logvar = moments[..., cfg.latent_channels:]
  ours = mean + std * eps
  errors = {"mean": rel_err(mean, nhwc(dist.mean)), "logvar": rel_err(logvar, nhwc(dist.logvar)),
            "sample": rel_err(ours, nhwc(sample)),
            "decoded": rel_err(model.apply({"params": params}, ours, method=VAE.decode),
                               nhwc(decoded))}
  print(f"\nVAE {cfg.block_out_channels} C={cfg.latent_channels} at {h}x{w}: "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
  assert max(errors.values()) <= VAE_TOL, errors
  return errors


@pytest.mark.parametrize("cfg", [TINY_VAE, TINY_VAE.replace(
    latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)], ids=["4ch", "16ch"])
def test_tiny_vae_matches_diffusers(cfg):
  check_vae(cfg, seed=80, h=40, w=24)  # 5 x 3 latents: odd, so the right/bottom pad matters


@pytest.mark.released
@pytest.mark.parametrize("cfg", [SD_VAE, SD3_VAE], ids=["sd", "sd3"])
def test_sd_widths_vae_matches_diffusers(cfg):
  check_vae(cfg, seed=81, h=264, w=248, batch=1)  # 256-ish, odd latent sizes 33 x 31


def test_parameter_counts():
  assert param_count(SD_VAE, halves=("encoder",)) == 34_163_664  # TRAINING.md section 3
  assert param_count(SD_VAE) == 83_653_863                       # diffusers' AutoencoderKL


def _tiny_pair(seed):
  ref = diffusers_autoencoder(TINY_VAE, seed)
  return ref, jcd.params_from_torch(state_dict_numpy(ref), TINY_VAE)


def test_encode_and_vae_decode_are_diffusers_encode_and_decode():
  ref, params = _tiny_pair(82)
  rng = np.random.default_rng(82)
  x = rng.uniform(-1, 1, (3, 3, 24, 40)).astype(np.float32)  # NCHW, as diffusers takes
  with torch.no_grad():
    dist = ref.encode(torch.from_numpy(x)).latent_dist
  mean = jcd.encode(params, x, config=TINY_VAE)
  assert rel_err(mean, dist.mean) <= VAE_TOL
  # A sample: example i draws normal(k_i) with k_i = fold_in(key, i) (decode's rule).
  key = jax.random.key(4)
  sample = jcd.encode(params, x, key, config=TINY_VAE)
  eps = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), (3, 5, 4)))
                  for i in range(3)]).transpose(0, 3, 1, 2)  # NHWC draws, as documented
  want = dist.mean + dist.std * torch.from_numpy(eps)
  assert rel_err(sample, want) <= VAE_TOL
  alone = jcd.encode(params, x[1:2], jcd.example_keys(key, 3)[1:2], config=TINY_VAE)
  np.testing.assert_allclose(alone[0], sample[1], rtol=1e-6, atol=1e-6)
  with torch.no_grad():
    decoded = ref.decode(dist.mean).sample
  ours = jcd.vae_decode(params, mean, config=TINY_VAE, clamp=False)
  assert rel_err(ours, decoded) <= VAE_TOL
  clamped = jcd.vae_decode(params, mean, config=TINY_VAE)
  np.testing.assert_array_equal(clamped, np.clip(ours, -1, 1))
  # NHWC, uint8 pixels (x / 127.5 - 1), and inside a caller's jit.
  pixels = rng.integers(0, 256, (1, 24, 40, 3), dtype=np.uint8)
  np.testing.assert_allclose(
      jcd.encode(params, pixels, config=TINY_VAE, layout="NHWC"),
      jcd.encode(params, pixels.astype(np.float32) / 127.5 - 1, config=TINY_VAE, layout="NHWC"),
      rtol=0, atol=1e-5)  # the division rounds differently on the host and in XLA
  inside = jax.jit(lambda p, x: jcd.encode(p, x, config=TINY_VAE))(params, x)
  # Inside a caller's jit XLA:CPU keeps its YNNPACK convolutions (xla_options): other sums.
  np.testing.assert_allclose(inside, mean, rtol=0, atol=1e-5)


@pytest.mark.parametrize("call,error,message", [
    (lambda p: jcd.encode(p, np.full((1, 3, 16, 16), 1.5, np.float32), config=TINY_VAE),
     ValueError, "must lie in \\[-1, 1\\]"),
    (lambda p: jcd.encode(p, np.full((1, 3, 16, 16), np.nan, np.float32), config=TINY_VAE),
     ValueError, "must lie in"),
    (lambda p: jcd.encode(p, np.zeros((1, 3, 20, 16), np.float32), config=TINY_VAE),
     ValueError, "does not divide"),
    (lambda p: jcd.encode(p, np.zeros((1, 16, 16, 3), np.float32), config=TINY_VAE),
     ValueError, "channels"),
    (lambda p: jcd.encode(p, np.zeros((1, 3, 16, 16), np.int32), config=TINY_VAE),
     TypeError, "uint8"),
    (lambda p: jcd.encode(p, np.zeros((3, 16, 16), np.float32), config=TINY_VAE),
     ValueError, "expected a batch"),
    (lambda p: jcd.vae_decode(p, np.zeros((1, 16, 2, 2), np.float32), config=TINY_VAE),
     ValueError, "this VAE takes 4"),
    (lambda p: jcd.vae_decode({"encoder": p["encoder"], "quant_conv": p["quant_conv"]},
                              np.zeros((1, 4, 2, 2), np.float32), config=TINY_VAE),
     ValueError, "hold no decoder"),
    (lambda p: jcd.encode(p, np.zeros((1, 3, 16, 16), np.float32), config=SD_VAE),
     jcd.ParamsMismatchError, "do not match"),
])
def test_bad_inputs_to_encode_and_vae_decode(call, error, message):
  params = jcd.random_params(TINY_VAE, 0)
  with pytest.raises(error, match=message):
    call(params)


def test_attention_in_query_chunks_is_the_same_attention(monkeypatch):
  """Past ATTENTION_CHUNK positions the mid block's attention runs a chunk of queries at a
  time (large images); with a chunk of 24 over 5 x 7 = 35 positions (a padded last chunk) the
  VAE still matches diffusers."""
  from jaxconsdec.models import vae as vae_module
  monkeypatch.setattr(vae_module, "ATTENTION_CHUNK", 24)
  check_vae(TINY_VAE, seed=83, h=40, w=56, batch=1)
