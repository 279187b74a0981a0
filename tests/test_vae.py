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
