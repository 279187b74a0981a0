"""ShardedDecoder and the batch job tell the truth: NaN in, NaN out; any key implementation;
the last batch pads to the device count; the noise scheme is versioned; bf16 latent files."""

import json
import struct

import jax
import ml_dtypes
import numpy as np
import pytest

import jaxconsdec as jcd
from jaxconsdec import cli
from jaxconsdec.jobs import decode_job, engine
from jaxconsdec.config import SD_SCALING_FACTOR as LATENT_SCALE
from jaxconsdec.sharded import ShardedDecoder

CFG = jcd.TINY
COMMON = ["--random-weights", "tiny", "--no-compile-cache", "--no-progress"]


@pytest.fixture(scope="module")
def params():
  return jcd.random_params(CFG, seed=0)


def _latents(seed, *shape):
  return (np.random.default_rng(seed).standard_normal(shape) / LATENT_SCALE).astype(np.float32)


def test_a_nan_latent_gives_a_nan_image_as_decode_does(params):
  lat = _latents(1, 3, 4, 2, 2)
  lat[1, 2, 0, 1] = np.nan
  got = ShardedDecoder(params, config=CFG).decode(lat, 7)
  want = np.asarray(jcd.decode(params, lat, 7, config=CFG))
  assert np.isnan(want[1]).all() and np.isnan(got[1]).all()  # not the image of zeros
  np.testing.assert_allclose(got[[0, 2]], want[[0, 2]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg", "threefry2x32"])
def test_every_key_implementation_works_as_in_decode(params, impl):
  lat = _latents(2, 2, 4, 2, 2)
  key = jax.random.key(3, impl=impl)
  got = ShardedDecoder(params, config=CFG).decode(lat, key)
  np.testing.assert_allclose(got, jcd.decode(params, lat, key, config=CFG), rtol=0, atol=1e-6)


def test_the_last_batch_pads_to_the_device_count_not_the_batch_size(tmp_path, capsys):
  np.save(tmp_path / "x.npy", _latents(3, 9, 4, 2, 2))
  assert cli.main(["decode", str(tmp_path / "x.npy"), "-o", str(tmp_path / "out"),
                   "--batch-size", "8", *COMMON]) == 0
  # One device: 8 latents, then the ninth alone (it was padded to 8 before).
  assert "compiling 2 program(s) (batch x latent shape: 1 x 4x2x2, 8 x 4x2x2)" in (
      capsys.readouterr().err)


def test_a_job_of_another_noise_scheme_is_not_mixed(tmp_path, capsys):
  np.save(tmp_path / "x.npy", _latents(4, 4, 2, 2))
  out = tmp_path / "out"
  args = ["decode", str(tmp_path / "x.npy"), "-o", str(out), *COMMON]
  assert cli.main(args) == 0
  manifest = json.loads((out / engine.MANIFEST).read_text())
  assert manifest["noise_scheme"] == 2
  del manifest["noise_scheme"]  # as written by jaxconsdec before the scheme was versioned
  (out / engine.MANIFEST).write_text(json.dumps(manifest))
  assert cli.main(args) == cli.EXIT_USAGE
  assert "noise_scheme: None there, 2 now" in capsys.readouterr().err


def test_the_scale_warning_shows_without_a_progress_bar(tmp_path, capsys):
  np.save(tmp_path / "x.npy", _latents(5, 4, 8, 8) * LATENT_SCALE)  # pipeline-scaled
  assert cli.main(["decode", str(tmp_path / "x.npy"), "-o", str(tmp_path / "out"),
                   *COMMON]) == 0
  assert "pass --scaled-latents" in capsys.readouterr().err


def _safetensors(path, name, array, dtype_name):
  header = json.dumps({name: {"dtype": dtype_name, "shape": list(array.shape),
                              "data_offsets": [0, array.nbytes]}}).encode()
  path.parent.mkdir()
  path.write_bytes(struct.pack("<Q", len(header)) + header + array.tobytes())


def test_bfloat16_latents_in_safetensors_files_are_decoded(tmp_path, capsys):
  lat = _latents(6, 2, 4, 2, 2).astype(ml_dtypes.bfloat16)
  _safetensors(tmp_path / "bf16" / "l.safetensors", "x", lat, "BF16")
  _safetensors(tmp_path / "f32" / "l.safetensors", "x", lat.astype(np.float32), "F32")
  for kind in ("bf16", "f32"):  # the same values under the same names: the same images
    assert cli.main(["decode", str(tmp_path / kind), "-o", str(tmp_path / f"out-{kind}"),
                     "--format", "npy", *COMMON]) == 0, capsys.readouterr().err
  for i in range(2):
    np.testing.assert_array_equal(np.load(tmp_path / "out-bf16" / f"l-x-{i}.npy"),
                                  np.load(tmp_path / "out-f32" / f"l-x-{i}.npy"))
