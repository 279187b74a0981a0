"""Every member of the family: a diffusers folder describes its own architecture, the latent
space is part of the model (SDXL, SD3/FLUX), and checkpoints written before keep loading."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")  # compares against PyTorch; skipped without it
import torch

import jaxconsdec as jcd
from jaxconsdec import cli
from jaxconsdec.convert import read_config
from job_keys import documented_key
from reference import (diffusers_unet, diffusers_vae, diffusers_vae_decode, original_decode,
                       rel_err)
import weight_files

DECODE_TOL = 1e-4
# The example: widths a user picks, which no preset or default describes.
WIDE = jcd.UNetConfig(block_out_channels=(32, 64, 64, 96), layers_per_block=2,
                      norm_num_groups=8)
# A decoder for SD3 latents: 16 channels, SD3's VAE factors, its own statistics.
rng = np.random.default_rng(70)
SD3 = jcd.TINY.replace(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                       latent_mean=tuple(rng.normal(0, 0.3, 16).round(4)),
                       latent_std=tuple(rng.uniform(0.6, 1.4, 16).round(4)))


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory):
  """ConsistencyDecoderVAE(decoder_block_out_channels=(32, 64, 64, 96), ...).save_pretrained."""
  vae = diffusers_vae(WIDE, seed=71)
  folder = tmp_path_factory.mktemp("hub")
  return vae, weight_files.write_diffusers(str(folder), vae, torch.float32)


def _decode_like_diffusers(vae, params, cfg, monkeypatch):
  rng = np.random.default_rng(72)
  latents = (rng.standard_normal((1, 4, 4, 6)) / 0.18215).astype(np.float32)
  noises = [rng.standard_normal((1, 3, 32, 48)).astype(np.float32) for _ in range(2)]
  want = diffusers_vae_decode(vae, latents, noises, monkeypatch)
  got = jcd.decode(params, latents, 0, config=cfg, clamp=False, noise=noises)
  return rel_err(got, want)


def test_a_diffusers_folder_converts_and_decodes_with_no_config(tmp_path, wide_folder,
                                                                monkeypatch, capsys):
  vae, src = wide_folder
  assert cli.main(["convert", src, "-o", str(tmp_path / "ck")]) == cli.EXIT_OK
  assert "widths (32, 64, 64, 96), 2 layers per block" in capsys.readouterr().out
  params, cfg = jcd.load(str(tmp_path / "ck"))
  assert cfg == WIDE
  err = _decode_like_diffusers(vae, params, cfg, monkeypatch)
  print(f"\nself-described diffusers folder vs diffusers decode: rel err {err:.3e}")
  assert err <= DECODE_TOL
  direct, direct_cfg = jcd.load(src)  # the file itself, converted in memory
  assert direct_cfg == WIDE
  np.save(tmp_path / "x.npy", np.zeros((4, 2, 2), np.float32))
  assert cli.main(["decode", str(tmp_path / "x.npy"), "-o", str(tmp_path / "out"),
                   "--weights", src, "--no-compile-cache", "--no-progress"]) == cli.EXIT_OK


def test_config_takes_a_diffusers_config_json_of_either_class(tmp_path, wide_folder):
  vae, src = wide_folder
  assert read_config(os.path.join(os.path.dirname(src), "config.json")) == WIDE
  vae.decoder_unet.save_pretrained(str(tmp_path / "unet"))
  assert read_config(str(tmp_path / "unet" / "config.json")) == WIDE
  # ... and the williamberman layout, unet/config.json beside its weights, describes itself.
  weights = str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
  assert cli.main(["convert", weights, "-o", str(tmp_path / "ck")]) == cli.EXIT_OK
  assert jcd.load(str(tmp_path / "ck")).config == WIDE


def test_an_explicit_config_that_disagrees_with_the_folder_is_refused(tmp_path, wide_folder,
                                                                      capsys):
  _, src = wide_folder
  assert cli.main(["convert", src, "-o", str(tmp_path / "ck"), "--config", "tiny"]) == 2
  err = capsys.readouterr().err
  assert ("--config disagrees with" in err and "block_out_channels: (32, 64, 64, 96) in"
          " config.json, (32, 64, 64, 64) in --config" in err), err
  assert not os.path.exists(tmp_path / "ck")
  mine = tmp_path / "wide.json"
  mine.write_text(WIDE.to_json())
  assert cli.main(["convert", src, "-o", str(tmp_path / "ck"), "--config", str(mine)]) == 0


def test_a_config_json_outside_the_family_is_refused_naming_each_field(tmp_path, capsys):
  unet = diffusers_unet(jcd.TINY, seed=73)
  unet.save_pretrained(str(tmp_path / "unet"))
  path = tmp_path / "unet" / "config.json"
  value = json.loads(path.read_text())
  value.update(add_attention=True, time_embedding_type="positional",
               up_block_types=["UpBlock2D"] * 4)
  path.write_text(json.dumps(value))
  assert cli.main(["convert", str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"),
                   "-o", str(tmp_path / "ck")]) == 2
  err = capsys.readouterr().err
  for field in ("add_attention=True", "time_embedding_type='positional'", "up_block_types="):
    assert field in err, err


def test_a_16_channel_member_decodes_like_its_pytorch_reference():
  ref = diffusers_unet(SD3, seed=74)
  assert ref.config.in_channels == 19 and SD3.in_channels == 19
  params = jcd.params_from_torch({k: v.numpy() for k, v in ref.state_dict().items()}, SD3)
  rng = np.random.default_rng(75)
  latents = rng.normal(0.1, 1.2, (2, 16, 4, 6)).astype(np.float32)
  noises = [rng.standard_normal((2, 3, 32, 48)).astype(np.float32) for _ in range(2)]
  want = original_decode(ref, torch.from_numpy(latents), (1.0, 0.5),
                         [torch.from_numpy(n) for n in noises], scaling=SD3.scaling_factor,
                         shift=SD3.shift_factor, means=SD3.latent_mean, stds=SD3.latent_std)
  got = jcd.decode(params, latents, 0, config=SD3, noise=noises)
  err = rel_err(got, want)
  print(f"\n16-channel member vs the original loop: rel err {err:.3e}")
  assert err <= DECODE_TOL
  with pytest.raises(ValueError, match="this decoder takes 16"):
    jcd.decode(params, latents[:, :4], 0, config=SD3)


def test_a_16_channel_decoder_end_to_end_through_convert_and_the_job(tmp_path, capsys):
  ref = diffusers_unet(SD3, seed=76)
  ref.save_pretrained(str(tmp_path / "unet"))
  src = str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
  # Its config.json says 19 input channels but cannot say the latent statistics.
  assert cli.main(["convert", src, "-o", str(tmp_path / "ck")]) == 2
  assert "latent_mean" in capsys.readouterr().err
  config_file = tmp_path / "sd3.json"
  config_file.write_text(SD3.to_json())
  assert cli.main(["convert", src, "-o", str(tmp_path / "ck"), "--config",
                   str(config_file)]) == 0
  params, cfg = jcd.load(str(tmp_path / "ck"))
  assert cfg == SD3
  latents = np.random.default_rng(77).normal(0, 1, (2, 16, 2, 2)).astype(np.float32)
  np.save(tmp_path / "sd3.npy", latents)
  np.save(tmp_path / "sd1.npy", latents[:, :4])
  assert cli.main(["decode", str(tmp_path / "sd3.npy"), str(tmp_path / "sd1.npy"), "-o",
                   str(tmp_path / "out"), "--weights", str(tmp_path / "ck"), "--format", "npy",
                   "--seed", "3", "--no-compile-cache", "--no-progress"]) == 1
  failures = json.loads((tmp_path / "out" / "failures.json").read_text())["failures"]
  assert [f["input"] for f in failures] == [str(tmp_path / "sd1.npy")]
  assert "this decoder takes 16" in failures[0]["reason"]
  for i in range(2):
    want = jcd.decode(params, latents[i:i + 1], documented_key(3, f"sd3-{i}")[None], config=cfg)
    np.testing.assert_allclose(np.load(tmp_path / "out" / f"sd3-{i}.npy"), np.asarray(want)[0],
                               rtol=0, atol=1e-5)
  capsys.readouterr()


def test_checkpoints_written_before_the_latent_space_was_stored_still_load(tmp_path, capsys):
  src = str(tmp_path / "unet.safetensors")
  weight_files.write_unet2d(src, diffusers_unet(jcd.TINY, seed=78))
  assert cli.main(["convert", src, "-o", str(tmp_path / "ck"), "--config", "tiny"]) == 0
  capsys.readouterr()
  meta_path = tmp_path / "ck" / "jaxconsdec.json"
  meta = json.loads(meta_path.read_text())
  old_fields = ("block_out_channels", "layers_per_block", "norm_num_groups", "norm_eps",
                "in_channels", "out_channels", "num_train_timesteps", "dtype", "param_dtype")
  # What the previous versions wrote: format 1, the decoder's config at the top, without
  # latent fields (the params tree is the same).
  old = {"format_version": 1, "provenance": meta["provenance"],
         "config": {k: meta["decoder"]["config"][k] for k in old_fields}}
  assert old["config"]["in_channels"] == 7
  meta_path.write_text(json.dumps(old))
  _, cfg = jcd.load(str(tmp_path / "ck"))
  assert cfg == jcd.TINY
