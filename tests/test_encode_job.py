"""`jaxconsdec encode`: images in, latent files out, equal to `encode`; sizes fitted only as
asked; bad images listed; resumable; and the latents go straight into `jaxconsdec decode`."""

import json
import os

import numpy as np
import pytest
import skimage.data
from PIL import Image

import jaxconsdec as jcd
from jaxconsdec import checkpoint, cli
from jaxconsdec.convert import safetensors_file
from job_keys import documented_key
from simulated_devices import run_on_simulated_devices

CFG = jcd.TINY_VAE
COMMON = ["--no-compile-cache", "--no-progress"]


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
  """A VAE checkpoint with random weights, and its params."""
  folder = str(tmp_path_factory.mktemp("vae") / "ck")
  params = jcd.random_params(CFG, 0)
  checkpoint.save(folder, vae_params=params, vae_config=CFG)
  return folder, params


def _photos(folder):
  """Crops of scikit-image's photos: one 8-aligned, one not (56 x 90), one grey."""
  os.makedirs(folder, exist_ok=True)
  Image.fromarray(skimage.data.astronaut()[100:164, 200:296]).save(f"{folder}/astro.png")
  Image.fromarray(skimage.data.chelsea()[50:106, 100:190]).save(f"{folder}/cat.png")
  Image.fromarray(skimage.data.camera()[:40, :48]).save(f"{folder}/camera.png")
  return folder


def _pixels(path):
  return np.asarray(Image.open(path).convert("RGB"))


def _encode(*args):
  return cli.main(["encode", *map(str, args), *COMMON])


def test_outputs_equal_encode_and_fit_only_as_asked(tmp_path, vae, capsys):
  folder, params = vae
  images = _photos(tmp_path / "in")
  out = tmp_path / "out"
  assert _encode(images, "-o", out, "--vae", folder) == cli.EXIT_INPUTS_FAILED
  failures = json.loads((out / "failures.json").read_text())["failures"]
  assert [os.path.basename(f["input"]) for f in failures] == ["cat.png"]
  assert "56x90 does not divide by 8: pass --fit crop" in failures[0]["reason"]
  for name in ("astro", "camera"):
    want = jcd.encode(params, _pixels(f"{images}/{name}.png")[None], config=CFG, layout="NHWC")
    np.testing.assert_allclose(np.load(out / f"{name}.npy"),
                               np.asarray(want)[0].transpose(2, 0, 1), rtol=0, atol=1e-5)
  cat = _pixels(f"{images}/cat.png")
  for fit, fitted in (("crop", cat[:, 1:89]),
                      ("pad", np.pad(cat, ((0, 0), (0, 6), (0, 0)), mode="edge"))):
    assert _encode(f"{images}/cat.png", "-o", tmp_path / fit, "--vae", folder, "--fit", fit) == 0
    want = jcd.encode(params, fitted[None], config=CFG, layout="NHWC")
    np.testing.assert_allclose(np.load(tmp_path / fit / "cat.npy"),
                               np.asarray(want)[0].transpose(2, 0, 1), rtol=0, atol=1e-5)
  capsys.readouterr()


def test_samples_follow_the_documented_noise_and_safetensors_carry_the_sizes(tmp_path, vae,
                                                                             capsys):
  folder, params = vae
  images = _photos(tmp_path / "in")
  out = tmp_path / "out"
  assert _encode(images, "-o", out, "--vae", folder, "--sample", "--seed", "7", "--fit", "pad",
                 "--format", "safetensors") == cli.EXIT_OK
  capsys.readouterr()
  with open(out / "astro.safetensors", "rb") as f:
    header = safetensors_file.read_header(f)
    latent = safetensors_file.read_tensor(f, header["latent"])
  want = jcd.encode(params, _pixels(f"{images}/astro.png")[None], documented_key(7, "astro")[None],
                    config=CFG, layout="NHWC")
  np.testing.assert_allclose(latent, np.asarray(want)[0].transpose(2, 0, 1), rtol=0, atol=1e-5)
  from safetensors import safe_open  # the files are ordinary safetensors files
  with safe_open(str(out / "cat.safetensors"), "numpy") as f:
    assert f.metadata() == {"image_size": "56x96", "original_size": "56x90", "fit": "pad",
                            "latents": "raw"}
    assert f.get_tensor("latent").shape == (4, 7, 12)


def test_bad_images_are_listed_and_the_job_goes_on(tmp_path, vae, capsys):
  folder, _ = vae
  d = tmp_path / "in"
  d.mkdir()
  Image.fromarray(skimage.data.astronaut()[:64, :64]).save(d / "good.png")
  Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 7).astype(np.uint16)).save(d / "deep.png")
  data = (d / "good.png").read_bytes()
  (d / "cut.png").write_bytes(data[:len(data) // 2])
  (d / "text.jpg").write_text("not a jpeg")
  os.mkfifo(d / "fifo.png")
  Image.fromarray(np.zeros((1024, 1024, 3), np.uint8)).save(d / "huge.png")
  out = tmp_path / "out"
  assert _encode(d, "-o", out, "--vae", folder, "--max-pixels", str(512 * 512)) == 1
  capsys.readouterr()
  reasons = {os.path.basename(f["input"]): f["reason"] for f in
             json.loads((out / "failures.json").read_text())["failures"]}
  assert set(reasons) == {"deep.png", "cut.png", "text.jpg", "fifo.png", "huge.png"}, reasons
  assert "16-bit or float" in reasons["deep.png"]
  assert "a FIFO" in reasons["fifo.png"] and "above the limit" in reasons["huge.png"]
  assert "unreadable" in reasons["cut.png"] and "unreadable" in reasons["text.jpg"]
  assert os.path.exists(out / "good.npy")


def test_resumes_and_its_latents_decode(tmp_path, vae, capsys):
  folder, _ = vae
  images = _photos(tmp_path / "in")
  latents = tmp_path / "latents"
  assert _encode(images, "-o", latents, "--vae", folder, "--fit", "crop") == 0
  first = {n: (latents / n).read_bytes() for n in os.listdir(latents) if n.endswith(".npy")}
  (latents / "astro.npy").write_bytes(first["astro.npy"][:100])  # cut short by a crash
  capsys.readouterr()
  assert _encode(images, "-o", latents, "--vae", folder, "--fit", "crop") == 0
  assert "2 already done, 1 encoded now (1 found cut short were redone)" in (
      capsys.readouterr().err)
  assert {n: (latents / n).read_bytes() for n in first} == first
  assert _encode(images, "-o", latents, "--vae", folder, "--fit", "pad") == cli.EXIT_USAGE
  assert "fit: 'crop' there, 'pad' now" in capsys.readouterr().err
  assert cli.main(["decode", str(latents), "-o", str(tmp_path / "images"), "--random-weights",
                   "tiny", *COMMON]) == 0
  capsys.readouterr()
  assert sorted(os.listdir(tmp_path / "images")) == [
      "astro.png", "camera.png", "cat.png", "jaxconsdec-job.json"]
  assert Image.open(tmp_path / "images" / "cat.png").size == (88, 56)


def test_vae_problems_fail_before_any_work(tmp_path, capsys):
  _photos(tmp_path / "in")
  decoder_only = tmp_path / "dec"
  checkpoint.save(str(decoder_only), jcd.random_params(jcd.TINY, 0), jcd.TINY)
  for vae, message in ((tmp_path / "missing", "no such file or folder"),
                       (decoder_only, "holds no SD VAE")):
    assert _encode(tmp_path / "in", "-o", tmp_path / "out", "--vae", vae) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "out")


SHARDED = """
import numpy as np, jax, jaxconsdec as jcd
from jaxconsdec.sharded import ShardedEncoder
assert jax.device_count() == 4
params = jcd.random_params(jcd.TINY_VAE, 0)
pixels = np.random.default_rng(0).integers(0, 256, (6, 16, 24, 3), np.uint8)
encoder = ShardedEncoder(params, config=jcd.TINY_VAE)
keys = jcd.example_keys(0, 8)
out, _, _ = encoder(np.concatenate([pixels, pixels[:2]]), keys, 8)
with jax.default_device(jax.devices()[0]):
  want = np.asarray(jcd.encode(params, pixels, config=jcd.TINY_VAE, layout="NHWC"))
np.testing.assert_allclose(out[:6], want.transpose(0, 3, 1, 2), rtol=0, atol=1e-5)
print("OK")
"""


def test_sharded_encoder_over_four_devices_equals_encode():
  run_on_simulated_devices(SHARDED, 4)


def _png_16bit_rgb(path, h=8, w=8):
  """A 16-bit RGB PNG, written by hand (Pillow opens such files as 8-bit RGB)."""
  import struct
  import zlib
  rows = b"".join(b"\0" + np.full((w, 3), 40000, ">u2").tobytes() for _ in range(h))
  chunk = lambda tag, data: (struct.pack(">I", len(data)) + tag + data
                             + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0,
                                                                    0, 0))
                   + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_only_png_and_jpeg_are_opened_and_refusals_cost_no_decoding(tmp_path, vae):
  from hostile import run_cli
  folder, _ = vae
  good = tmp_path / "good"
  good.mkdir()
  Image.fromarray(skimage.data.astronaut()[:64, :64]).save(good / "good.png")
  bad = tmp_path / "bad"
  bad.mkdir()
  Image.fromarray(skimage.data.astronaut()[:64, :64]).save(bad / "gif.png", format="GIF")
  Image.fromarray(skimage.data.astronaut()[:64, :64]).save(bad / "bmp.jpg", format="BMP")
  (bad / "text.jpg").write_text("not a jpeg")
  _png_16bit_rgb(bad / "deep.png")
  huge = Image.new("RGB", (12000, 12000))  # 432 MB of pixels, a few hundred KB as a PNG
  huge.save(bad / "huge0.png", compress_level=9)
  del huge
  for i in (1, 2):
    (bad / f"huge{i}.png").write_bytes((bad / "huge0.png").read_bytes())
  assert os.path.getsize(bad / "huge0.png") < 1 << 20
  Image.fromarray(skimage.data.astronaut()[:64, :64]).save(bad / "good.png")
  alone = run_cli("encode", good, "-o", tmp_path / "out-alone", "--vae", folder, *COMMON)
  assert alone.code == 0, alone.err
  run = run_cli("encode", bad, "-o", tmp_path / "out", "--vae", folder, *COMMON)
  assert run.code == 1, run.err
  reasons = {os.path.basename(f["input"]): f["reason"] for f in
             json.loads((tmp_path / "out" / "failures.json").read_text())["failures"]}
  assert set(reasons) == {"gif.png", "bmp.jpg", "text.jpg", "deep.png", "huge0.png",
                          "huge1.png", "huge2.png"}, reasons
  for name in ("gif.png", "bmp.jpg", "text.jpg"):
    assert "not a PNG or JPEG image" in reasons[name] and "BufferedReader" not in reasons[name]
  assert "16-bit" in reasons["deep.png"]
  assert all("above the limit" in reasons[f"huge{i}.png"] for i in range(3))
  # The huge images are refused from their headers: the job costs what the good image does
  # (decoding one would cost ~450 MB).
  assert run.peak_rss < alone.peak_rss + (100 << 20), (run.peak_rss >> 20, alone.peak_rss >> 20)
