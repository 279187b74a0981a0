"""The batch job in one process: equal to `decode`, resumable, and honest about bad inputs."""

import json
import os

import jax
import numpy as np
import pytest

import jaxconsdec as jcd
from jaxconsdec import cli
from jaxconsdec.jobs import decode_job, engine
from jaxconsdec.config import SD_SCALING_FACTOR as LATENT_SCALE
from jaxconsdec.sharded import ShardedDecoder
from job_keys import documented_key

CFG = jcd.TINY


@pytest.fixture(scope="module")
def params():
  return jcd.random_params(CFG, seed=0)


def _latents(seed, *shape):
  return (np.random.default_rng(seed).standard_normal(shape) / LATENT_SCALE).astype(np.float32)


def _settings(**kw):
  return decode_job.JobSettings(**{"weights": "test", "seed": 5, "schedule": (1.0, 0.5),
                              "scaled_latents": False, "format": "npy", **kw})


def _run(decoder, inputs, out, settings, **kwargs):
  job = decode_job.DecodeJob(decoder, settings)
  return engine.run_job(job, inputs, str(out), progress=False, **kwargs)


def _outputs(folder):
  return sorted(os.path.relpath(os.path.join(r, f), folder)
                for r, _, fs in os.walk(folder) for f in fs)


def test_job_outputs_equal_decode_with_the_name_keyed_noise(tmp_path, params):
  lat = _latents(1, 5, 4, 4, 4)
  np.save(tmp_path / "b.npy", lat)
  np.save(tmp_path / "one.npy", _latents(2, 4, 2, 6))  # another size: its own group
  decoder = ShardedDecoder(params, config=CFG)
  report = _run(decoder, [str(tmp_path / "b.npy"), str(tmp_path / "one.npy")],
                tmp_path / "out", _settings(), batch_size=2)
  assert (report.total, report.written, report.failures) == (6, 6, [])
  for i in range(5):
    want = np.asarray(jcd.decode(params, lat[i:i + 1], documented_key(5, f"b-{i}")[None],
                                 config=CFG))[0]
    got = np.load(tmp_path / "out" / f"b-{i}.npy")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  assert np.load(tmp_path / "out" / "one.npy").shape == (3, 16, 48)
  # A re-run finds everything done and decodes nothing.
  again = _run(decoder, [str(tmp_path / "b.npy"), str(tmp_path / "one.npy")],
               tmp_path / "out", _settings(), batch_size=2)
  assert (again.done_before, again.written) == (6, 0)


def test_scaled_latents_flag_divides_by_the_sd_factor(tmp_path, params):
  raw = _latents(3, 2, 4, 4, 4)
  np.save(tmp_path / "raw.npy", raw)
  (tmp_path / "scaled").mkdir()
  np.save(tmp_path / "scaled" / "raw.npy", raw * LATENT_SCALE)
  decoder = ShardedDecoder(params, config=CFG)
  _run(decoder, [str(tmp_path / "raw.npy")], tmp_path / "a", _settings())
  _run(decoder, [str(tmp_path / "scaled")], tmp_path / "b", _settings(scaled_latents=True))
  for i in range(2):
    np.testing.assert_allclose(np.load(tmp_path / "b" / f"raw-{i}.npy"),
                               np.load(tmp_path / "a" / f"raw-{i}.npy"), atol=1e-5)


def test_settings_mismatch_is_refused(tmp_path, params):
  np.save(tmp_path / "x.npy", _latents(4, 4, 2, 2))
  decoder = ShardedDecoder(params, config=CFG)
  _run(decoder, [str(tmp_path / "x.npy")], tmp_path / "o", _settings())
  with pytest.raises(engine.JobMismatchError, match="seed: 5 there, 6 now"):
    _run(decoder, [str(tmp_path / "x.npy")], tmp_path / "o", _settings(seed=6))


def _corpus(d):
  """Good latents next to every kind of bad one."""
  d.mkdir()
  np.save(d / "good.npy", _latents(5, 3, 4, 2, 2))
  nan = _latents(6, 4, 2, 2)
  nan[0, 0, 0] = np.nan
  np.save(d / "nan.npy", nan)
  inf = _latents(7, 2, 4, 2, 2)
  inf[1, 2, 1, 1] = np.inf
  np.save(d / "inf.npy", inf)  # row 0 is fine, row 1 is not
  np.save(d / "rank5.npy", _latents(8, 1, 1, 4, 2, 2))
  np.save(d / "rgb.npy", _latents(9, 3, 2, 2))
  (d / "empty.npy").write_bytes(b"")
  (d / "corrupt.npz").write_bytes(b"PK\x03\x04 this zip is cut short")
  (d / "nothing").mkdir()
  return [str(d), str(d / "nothing")]


def test_bad_input_corpus_through_the_cli(tmp_path, capsys):
  inputs = _corpus(tmp_path / "in")
  out = tmp_path / "out"
  common = ["--random-weights", "tiny", "--format", "npy", "--no-compile-cache", "--no-progress"]
  assert cli.main(["decode", *inputs, "-o", str(out), *common]) == 1
  err = capsys.readouterr().err
  assert "RANDOMLY INITIALISED" in err and "FAILED" in err
  failures = json.load(open(out / "failures.json"))
  reasons = {os.path.relpath(f["input"], tmp_path / "in"): f["reason"]
             for f in failures["failures"]}
  assert set(reasons) == {"nan.npy", "inf.npy[1]", "rank5.npy", "rgb.npy", "empty.npy",
                          "corrupt.npz", "nothing"}, reasons
  assert "NaN or inf" in reasons["nan.npy"] and "NaN or inf" in reasons["inf.npy[1]"]
  assert "rank 5" in reasons["rank5.npy"] and "3 channels" in reasons["rgb.npy"]
  assert reasons["empty.npy"] == "empty file" and "unreadable" in reasons["corrupt.npz"]
  assert "holds no" in reasons["nothing"]
  assert _outputs(out) == ["failures.json", "good-0.npy", "good-1.npy", "good-2.npy",
                           "inf-0.npy", "jaxconsdec-job.json"]
  # --strict stops before any work when listing already found a bad input.
  strict_out = tmp_path / "strict"
  assert cli.main(["decode", *inputs, "-o", str(strict_out), "--strict", *common]) == 1
  assert "stopped at the first bad input" in capsys.readouterr().err
  assert not strict_out.exists()


def test_strict_stops_at_a_nan_found_while_decoding(tmp_path, capsys):
  d = tmp_path / "in"
  d.mkdir()
  lat = _latents(10, 6, 4, 2, 2)
  lat[2, 0, 0, 0] = np.nan
  np.save(d / "a.npy", lat)
  common = ["--random-weights", "tiny", "--no-compile-cache", "--no-progress",
            "--batch-size", "2"]
  assert cli.main(["decode", str(d), "-o", str(tmp_path / "o"), "--strict", *common]) == 1
  # Batches of 2: [0, 1] are written, [2, 3] holds the NaN, and nothing after it is decoded.
  assert _outputs(tmp_path / "o") == ["a-0.png", "a-1.png", "a-3.png", "failures.json",
                                      "jaxconsdec-job.json"]
  capsys.readouterr()


def test_weights_problems_fail_before_any_work(tmp_path, capsys):
  np.save(tmp_path / "x.npy", _latents(11, 4, 2, 2))
  out = tmp_path / "out"
  bad_file = tmp_path / "weights.safetensors"
  bad_file.write_bytes(b"\x00" * 100)
  for weights in ([], ["--weights", str(tmp_path / "missing")], ["--weights", str(bad_file)],
                  ["--weights", str(tmp_path)]):
    assert cli.main(["decode", str(tmp_path / "x.npy"), "-o", str(out), *weights,
                     "--no-compile-cache"]) == 2
  err = capsys.readouterr().err
  assert "no weights: pass --weights" in err
  assert "no such file or folder" in err
  assert "neither a TorchScript archive" in err
  assert "not a jaxconsdec checkpoint" in err
  assert not out.exists()


# The demo model decodes the held-out photos at 23.3-28.0 dB in 1 or 2 steps
# (samples/demo/results/report.md); the previous demo reached 19.3-22.6 dB and an untrained
# model 8-13 dB. The floor sits above both and leaves room for the job's name-keyed noise.
DEMO_PSNR_FLOOR = 22.5


def test_readme_first_command_decodes_the_held_out_photos_with_the_demo_model(tmp_path, capsys):
  """The README's first command: the shipped latents (held-out photos through the demo
  model's encoder) decode, with the demo model, into pictures close to those photos."""
  import sys
  from PIL import Image
  from jaxconsdec.metrics import psnr
  root = os.path.join(os.path.dirname(__file__), "..", "samples")
  sys.path.insert(0, os.path.join(root, "demo"))
  from photos import HELD_OUT, crop_to_multiple_of_8, pixels
  out = tmp_path / "decoded"
  assert cli.main(["decode", os.path.join(root, "latents"), "-o", str(out), "--weights",
                   os.path.join(root, "demo", "model"), "--no-compile-cache"]) == 0
  assert "RANDOMLY" not in capsys.readouterr().err
  assert _outputs(out) == sorted([f"{n}.png" for n in HELD_OUT] + ["jaxconsdec-job.json"])
  for name in HELD_OUT:
    decoded = np.asarray(Image.open(out / f"{name}.png"))
    score = float(psnr(crop_to_multiple_of_8(pixels(name)), decoded))
    print(name, score)
    assert score > DEMO_PSNR_FLOOR, (name, score)


def test_the_sample_latents_decode_with_random_weights_too(tmp_path, capsys):
  samples = os.path.join(os.path.dirname(__file__), "..", "samples", "latents")
  assert cli.main(["decode", samples, "-o", str(tmp_path / "decoded"), "--random-weights",
                   "tiny", "--no-compile-cache"]) == 0
  assert "RANDOMLY INITIALISED" in capsys.readouterr().err
  assert len(_outputs(tmp_path / "decoded")) == 4