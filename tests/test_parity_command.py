"""`jaxconsdec parity` on random weights written in the published layouts: within the parity
suite's bounds, and able to fail, naming the block where jaxconsdec stops matching.

At the released widths the command is run by `benchmarks/parity_weights.py` and `jaxconsdec
parity` (docs/parity.md, benchmarks/results/parity_cpu_released.*), not here: the released
UNet's parity is tests/test_unet.py's, and the command adds nothing width-dependent."""

import json
import os

import pytest

torch = pytest.importorskip("torch")  # the command runs diffusers beside jaxconsdec

import jaxconsdec as jcd
from jaxconsdec import cli
from reference import diffusers_vae
from weight_files import write_diffusers, write_torchscript

BLOCKS = ["time_embedding"] + [f"down_blocks_{i}" for i in range(4)] + ["mid_block"] + [
    f"up_blocks_{i}" for i in range(4)] + ["unet"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny")
  write_diffusers(str(folder), diffusers_vae(jcd.TINY, seed=3), torch.float32)
  return str(folder)


def _parity(tmp_path, *args):
  out = str(tmp_path / "report")
  code = cli.main(["parity", *args, "--repeats", "0", "--out", out])
  with open(out + ".json") as f:
    report = json.load(f)
  assert os.path.isfile(out + ".md")
  return code, {(r["dtype"], r["part"]): r for r in report["rows"]}, report


def test_tiny_widths_within_the_bounds_in_fp32_and_bf16(tiny_folder, tmp_path):
  code, rows, report = _parity(tmp_path, tiny_folder, "--size", "32", "--batch", "1",
                               "--dtype", "float32,bfloat16")
  assert code == 0
  assert report["torch_weights"].startswith("diffusers' ConsistencyDecoderVAE.from_pretrained")
  for part in BLOCKS:
    assert rows["float32", part]["jaxconsdec"] <= 1e-5, rows["float32", part]
    assert rows["bfloat16", part]["diffusers"] is not None
  assert rows["float32", "decode"]["jaxconsdec"] <= 1e-4
  assert rows["bfloat16", "decode"]["jaxconsdec"] <= 3e-2
  # bf16 is a real loss of precision, on both sides: not fp32 by another name.
  assert rows["bfloat16", "decode"]["jaxconsdec"] > 1e-4
  assert rows["bfloat16", "decode"]["diffusers"] > 1e-4
  assert report["latent_shape"] == [1, 4, 4, 4]


def test_a_wrong_block_fails_and_is_named(tiny_folder, tmp_path, monkeypatch, capsys):
  """A conversion that flips one conv kernel of up_blocks_1: the blocks before it stay
  within the bound, it and every block after it do not, and the command exits 1."""
  from jaxconsdec import checkpoint
  convert = checkpoint.params_from_torch

  def flipped(state_dict, config, *args):
    params = convert(state_dict, config, *args)
    if isinstance(config, jcd.UNetConfig):  # not the SD VAE the folder holds too
      conv = params["up_blocks_1"]["resnets_0"]["conv1"]
      conv["kernel"] = conv["kernel"][::-1]  # upside down
    return params
  monkeypatch.setattr(checkpoint, "params_from_torch", flipped)
  code, rows, _ = _parity(tmp_path, tiny_folder, "--size", "32", "--dtype", "float32")
  assert code == 1
  for part in BLOCKS[:7]:  # time embedding .. up_blocks_0
    assert rows["float32", part]["within"], rows["float32", part]
  for part in BLOCKS[7:] + ["decode"]:
    assert not rows["float32", part]["within"], rows["float32", part]
  assert "above the bound: float32 up_blocks_1" in capsys.readouterr().err


def test_openai_torchscript_file(tmp_path):
  """A layout without a diffusers loader: diffusers' model gets the file's tensors."""
  vae = diffusers_vae(jcd.TINY, seed=4)
  path = str(tmp_path / "decoder.pt")
  write_torchscript(path, vae.decoder_unet, jcd.TINY, "constant")
  code, rows, report = _parity(tmp_path, path, "--config", "tiny", "--size", "32",
                               "--dtype", "float32")
  assert code == 0
  assert report["torch_weights"].startswith("jaxconsdec's reader")
  assert max(r["jaxconsdec"] for k, r in rows.items() if k[1] != "decode") <= 1e-5
  assert rows["float32", "decode"]["jaxconsdec"] <= 1e-4


def test_what_cannot_be_compared_is_refused(tiny_folder, tmp_path, capsys):
  ckpt = str(tmp_path / "ckpt")
  assert cli.main(["convert", os.path.join(tiny_folder, "diffusion_pytorch_model.safetensors"),
                   "-o", ckpt]) == 0
  capsys.readouterr()
  cases = [([ckpt], "a jaxconsdec checkpoint has no PyTorch side"),
           ([tiny_folder, "--dtype", "float64"], "--dtype float64"),
           ([tiny_folder, "--size", "30"], "multiple of 8"),
           ([str(tmp_path / "missing.pt")], "no such file or folder"),
           ([tiny_folder, "--out", str(tmp_path / "no" / "r")], "does not exist")]
  for args, message in cases:
    assert cli.main(["parity", *args]) == 2, args
    assert message in capsys.readouterr().err, args
  assert not os.path.exists(str(tmp_path / "no"))
