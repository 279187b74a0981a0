"""Every published layout, converted without torch, loaded, and decoded like the model that
wrote it (same injected noise, the core issue's 1e-4 bound)."""

import json
import os

import numpy as np
import pytest
pytest.importorskip("torch")  # compares against PyTorch; skipped without it
import torch

import jaxconsdec as jcd
from reference import diffusers_unet, diffusers_vae, original_decode, rel_err
import weight_files
from weight_files import convert_without_torch

DECODE_TOL = 1e-4

def _decode_parity(out_dir, unet, cfg, seed):
  params, loaded_cfg = jcd.load(out_dir)
  assert loaded_cfg == cfg
  rng = np.random.default_rng(seed)
  latents = (rng.standard_normal((1, 4, 4, 4)) / 0.18215).astype(np.float32)
  noises = [rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(2)]
  want = original_decode(unet.float(), torch.from_numpy(latents), (1.0, 0.5),
                         [torch.from_numpy(n) for n in noises])
  got = jcd.decode(params, latents, 0, config=cfg, noise=noises)
  err = rel_err(got, want)
  assert err <= DECODE_TOL, err
  return err


@pytest.mark.parametrize("cfg,table_as", [
    (jcd.TINY, "parameter"), (jcd.TINY, "constant"),
    pytest.param(jcd.CONSISTENCY_DECODER, "constant", marks=pytest.mark.released,
                 id="released-widths-constant")])
def test_torchscript_archive(tmp_path, cfg, table_as):
  unet = diffusers_unet(cfg, seed=41)
  src = str(tmp_path / "decoder.pt")
  weight_files.write_torchscript(src, unet, cfg, table_as)
  from jaxconsdec.convert.torchscript import TorchScriptArchive
  archive = TorchScriptArchive(src)
  table_shape = (cfg.num_train_timesteps, cfg.block_out_channels[0])
  in_params = [k for k, r in archive.tensors.items() if r.shape == table_shape]
  in_constants = [r for r in archive.constants if r.shape == table_shape]
  assert (len(in_params), len(in_constants)) == ((1, 0) if table_as == "parameter" else (0, 1))
  del archive
  config_arg = "tiny" if cfg == jcd.TINY else "released"
  proc = convert_without_torch(src, "-o", str(tmp_path / "ck"), "--config", config_arg)
  assert proc.returncode == 0, proc.stderr
  assert "format torchscript" in proc.stdout and "wrote" in proc.stdout
  os.remove(src)  # 2.5 GB at released widths
  _decode_parity(str(tmp_path / "ck"), unet, cfg, seed=41)


def test_torchscript_tensors_without_a_diffusers_name_are_reported_as_unexpected(tmp_path):
  cfg = jcd.TINY
  unet = diffusers_unet(cfg, seed=46)
  src = str(tmp_path / "decoder.pt")
  weight_files.write_torchscript(src, unet, cfg, "parameter",
                                 extra={"blocks.mid_0.attn.q.w": torch.zeros(8, 8)})
  proc = convert_without_torch(src, "-o", str(tmp_path / "ck"), "--config", "tiny")
  assert proc.returncode == 2, proc.stderr
  assert "1 unexpected (in the weights, not in the model)" in proc.stderr
  assert "blocks.mid_0.attn.q.w" in proc.stderr
  assert not os.path.exists(tmp_path / "ck")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_diffusers_consistency_decoder_vae(tmp_path, dtype):
  cfg = jcd.TINY
  vae = diffusers_vae(cfg, seed=42)
  src = weight_files.write_diffusers(str(tmp_path / "hub"), vae, dtype)
  proc = convert_without_torch(src, "-o", str(tmp_path / "ck"), "--config", "tiny")
  assert proc.returncode == 0, proc.stderr
  assert "format diffusers" in proc.stdout
  meta = json.load(open(tmp_path / "ck" / "jaxconsdec.json"))
  assert meta["provenance"]["sources"][0]["dtypes"] == [str(dtype).split(".")[1]]
  loaded = jcd.load(str(tmp_path / "ck"))  # the SD encoder is kept, as the VAE's encoder half
  assert loaded.vae_halves == ("encoder",) and "the SD VAE's encoder" in repr(loaded)
  # The model that wrote the file, at the file's precision, then in fp32 for the reference.
  unet = vae.decoder_unet.to(dtype).float()
  _decode_parity(str(tmp_path / "ck"), unet, cfg, seed=42)


def test_unprefixed_unet2d(tmp_path):
  cfg = jcd.TINY
  unet = diffusers_unet(cfg, seed=43)
  weight_files.write_unet2d(str(tmp_path / "unet.safetensors"), unet)
  proc = convert_without_torch(str(tmp_path / "unet.safetensors"), "-o", str(tmp_path / "ck"),
                               "--config", "tiny")
  assert proc.returncode == 0, proc.stderr
  assert "format unet2d" in proc.stdout
  _decode_parity(str(tmp_path / "ck"), unet, cfg, seed=43)


def test_raw_names_plus_embedding_file(tmp_path):
  cfg = jcd.TINY
  unet = diffusers_unet(cfg, seed=44)
  raw, emb = str(tmp_path / "consistency_decoder.safetensors"), str(tmp_path / "embedding.safetensors")
  weight_files.write_raw(raw, emb, unet, cfg)
  proc = convert_without_torch(raw, "-o", str(tmp_path / "nope"), "--config", "tiny")
  assert proc.returncode == 2 and "--embedding" in proc.stderr
  assert not os.path.exists(tmp_path / "nope")
  proc = convert_without_torch(raw, emb, "-o", str(tmp_path / "ck"), "--config", "tiny")
  assert proc.returncode == 0, proc.stderr
  assert "format raw" in proc.stdout and "format embedding" in proc.stdout
  _decode_parity(str(tmp_path / "ck"), unet, cfg, seed=44)
  # jaxconsdec.load reads the PyTorch files directly too, converting in memory.
  direct, _ = jcd.load(raw, config=cfg, embedding=emb)
  stored, _ = jcd.load(str(tmp_path / "ck"))
  for a, b in zip(jax_leaves(direct), jax_leaves(stored)):
    np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def test_never_overwrites_without_force(tmp_path):
  cfg = jcd.TINY
  unet = diffusers_unet(cfg, seed=45)
  src = str(tmp_path / "unet.safetensors")
  weight_files.write_unet2d(src, unet)
  out = tmp_path / "ck"
  proc = convert_without_torch(src, "-o", str(out), "--config", "tiny")
  assert proc.returncode == 0, proc.stderr
  proc = convert_without_torch(src, "-o", str(out), "--config", "tiny")
  assert proc.returncode == 2 and "--force" in proc.stderr
  proc = convert_without_torch(src, "-o", str(out), "--config", "tiny", "--force",
                               "--dtype", "bfloat16")
  assert proc.returncode == 0, proc.stderr
  params, _ = jcd.load(str(out))
  assert str(jax_leaves(params)[0].dtype) == "bfloat16"
  assert sorted(os.listdir(tmp_path)) == ["ck", "unet.safetensors"]  # no temp dirs left
