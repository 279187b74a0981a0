"""Every published SD VAE layout, converted with torch unimportable, equal to the PyTorch
model that wrote it; and the round trip through a ConsistencyDecoderVAE equal to diffusers'."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")  # compares against PyTorch; skipped without it
import torch

import jaxconsdec as jcd
from jaxconsdec.config import TINY, TINY_VAE
from reference import (diffusers_autoencoder, diffusers_vae, diffusers_vae_decode, nchw,
                       rel_err)
import weight_files
from weight_files import convert_without_torch

VAE_TOL = 1e-5
ROUND_TRIP_TOL = 1e-4


def _check_against(ref, loaded, halves=("encoder", "decoder"), seed=90):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (2, 3, 24, 40)).astype(np.float32)
  assert loaded.vae_halves == halves and loaded.vae_config == TINY_VAE
  with torch.no_grad():
    mean = ref.encode(torch.from_numpy(x)).latent_dist.mean
  ours = jcd.encode(loaded.vae_params, x, config=loaded.vae_config)
  assert rel_err(ours, mean) <= VAE_TOL
  if "decoder" in halves:
    with torch.no_grad():
      decoded = ref.decode(mean).sample
    got = jcd.vae_decode(loaded.vae_params, ours, config=loaded.vae_config, clamp=False)
    assert rel_err(got, decoded) <= VAE_TOL


@pytest.mark.parametrize("layout", ["autoencoder", "legacy-attention", "ldm", "ldm-in-sd"])
def test_each_vae_layout_converts_without_torch_and_equals_its_model(tmp_path, layout, capsys):
  ref = diffusers_autoencoder(TINY_VAE, seed=91)
  levels = len(TINY_VAE.block_out_channels)
  config_args = ["--vae-config", "tiny"]
  if layout == "autoencoder":  # the folder describes itself
    ref.save_pretrained(str(tmp_path / "vae"))
    src, config_args = str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"), []
  elif layout == "legacy-attention":
    src = str(tmp_path / "old.safetensors")
    weight_files.write_legacy_autoencoder(src, ref)
  elif layout == "ldm":
    src = str(tmp_path / "vae-ft-mse.safetensors")
    weight_files.write_ldm_vae(src, ref, levels)
  else:  # a full SD checkpoint: its VAE under first_stage_model., the rest not ours
    src = str(tmp_path / "sd.safetensors")
    weight_files.write_ldm_vae(src, ref, levels, prefix="first_stage_model.", extra={
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        "cond_stage_model.transformer.embeddings.weight": torch.zeros(10, 8)})
  proc = convert_without_torch(src, "-o", str(tmp_path / "ck"), *config_args)
  assert proc.returncode == 0, proc.stderr
  assert "VAE (encoder and decoder)" in proc.stdout
  loaded = jcd.load(str(tmp_path / "ck"))
  assert loaded.params is None and "no decoder" in repr(loaded)
  _check_against(ref, loaded)
  _check_against(ref, jcd.load(src, vae_config=None if layout == "autoencoder" else TINY_VAE))


def test_a_wrong_ldm_file_is_refused_naming_each_tensor(tmp_path):
  ref = diffusers_autoencoder(TINY_VAE, seed=92)
  src = str(tmp_path / "vae.safetensors")
  weight_files.write_ldm_vae(src, ref, 4, extra={"encoder.mid.attn_1.extra.weight":
                                                 torch.zeros(3)})
  proc = convert_without_torch(src, "-o", str(tmp_path / "ck"))  # the SD widths: all wrong
  assert proc.returncode == 2
  assert "shape mismatch" in proc.stderr and "encoder.conv_in.weight: the weights declare" in (
      proc.stderr)
  assert "encoder.mid.attn_1.extra.weight" in proc.stderr  # unexpected, by its own name
  assert not os.path.exists(tmp_path / "ck")


def test_round_trip_through_a_consistency_decoder_vae_equals_diffusers(tmp_path, monkeypatch):
  """encode then decode on a ConsistencyDecoderVAE at small widths = diffusers'
  vae.encode(x).latent_dist.mean then its decode, with the same injected noise."""
  vae = diffusers_vae(TINY, seed=93)
  src = weight_files.write_diffusers(str(tmp_path / "hub"), vae, torch.float32)
  proc = convert_without_torch(src, "-o", str(tmp_path / "ck"))
  assert proc.returncode == 0, proc.stderr
  loaded = jcd.load(str(tmp_path / "ck"))
  params, cfg = loaded
  assert loaded.vae_halves == ("encoder",)
  rng = np.random.default_rng(93)
  x = rng.uniform(-1, 1, (2, 3, 32, 48)).astype(np.float32)
  noises = [rng.standard_normal((2, 3, 32, 48)).astype(np.float32) for _ in range(2)]
  with torch.no_grad():
    mean = vae.encode(torch.from_numpy(x)).latent_dist.mean
  want = diffusers_vae_decode(vae, mean.numpy(), noises, monkeypatch)
  latents = jcd.encode(loaded.vae_params, x, config=loaded.vae_config)
  assert rel_err(latents, mean) <= VAE_TOL
  got = jcd.decode(params, latents, 0, config=cfg, noise=noises, clamp=False)
  err = rel_err(got, want)
  print(f"\nround trip vs diffusers ConsistencyDecoderVAE: rel err {err:.3e}")
  assert err <= ROUND_TRIP_TOL
  with pytest.raises(ValueError, match="hold no decoder"):  # that file has no GAN decoder
    jcd.vae_decode(loaded.vae_params, latents, config=loaded.vae_config)
