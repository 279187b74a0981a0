"""`jaxconsdec eval` on real photos (scikit-image's), with small random weights: the report's
numbers are those of the pictures it shows, and the pictures are the decoders' outputs."""

import json
import os

import numpy as np
import pytest
import skimage.data
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import jaxconsdec as jcd
from jaxconsdec import checkpoint, cli
from jaxconsdec.metrics import blur_baseline, colour_psnr, detail_ratio
from job_keys import documented_key

HEADER, GAP = 18, 8  # the grid's layout (images.side_by_side)


def _setup(tmp_path):
  d = tmp_path / "photos"
  d.mkdir()
  Image.fromarray(skimage.data.astronaut()[100:164, 150:246]).save(d / "astronaut.png")
  Image.fromarray(skimage.data.coffee()[100:164, 200:264]).save(d / "coffee.png")
  Image.fromarray(skimage.data.chelsea()[40:100, 100:190]).save(d / "chelsea.png")  # 60 x 90
  vae, cd = jcd.random_params(jcd.TINY_VAE, 1), jcd.random_params(jcd.TINY, 2)
  checkpoint.save(str(tmp_path / "vae"), vae_params=vae, vae_config=jcd.TINY_VAE)
  checkpoint.save(str(tmp_path / "cd"), cd, jcd.TINY)
  return d, vae, cd


def _panels(grid: np.ndarray, width: int, count: int) -> list[np.ndarray]:
  return [grid[HEADER:, i * (width + GAP):i * (width + GAP) + width] for i in range(count)]


def test_eval_reports_what_its_grids_show(tmp_path, capsys):
  photos, vae, cd = _setup(tmp_path)
  report_dir = tmp_path / "report"
  assert cli.main(["eval", str(photos), "--weights", str(tmp_path / "cd"), "--vae",
                   str(tmp_path / "vae"), "-o", str(report_dir), "--fit", "pad"]) == 0
  out = capsys.readouterr().out
  assert "| **mean** |" in out
  report = json.loads((report_dir / "report.json").read_text())
  names = ["SD VAE decoder", "Consistency Decoder, 1 step", "Consistency Decoder, 2 steps"]
  assert report["decoders"] == names
  assert [r["name"] for r in report["images"]] == ["astronaut", "chelsea", "coffee"]
  assert (report_dir / "report.md").read_text().count("\n| ") >= 4
  for row in report["images"]:
    grid = np.asarray(Image.open(report_dir / row["grid"]))
    h, w = row["size"]
    oh, ow = row["original_size"]
    original, *decoded = _panels(grid, w, 4)
    np.testing.assert_array_equal(original[:oh, :ow], np.asarray(
        Image.open(photos / f"{row['name']}.png").convert("RGB")))
    for name, image in zip(names, decoded):
      a, b = original[:oh, :ow], image[:oh, :ow]  # a padded image is compared on its own part
      assert abs(row["psnr"][name] - peak_signal_noise_ratio(a, b, data_range=255)) <= 1e-3
      assert abs(row["ssim"][name] - structural_similarity(
          a, b, channel_axis=-1, data_range=255)) <= 1e-4
      assert row["colour_psnr"][name] == pytest.approx(colour_psnr(a, b), rel=1e-9)
      assert row["detail_ratio"][name] == pytest.approx(detail_ratio(a, b), rel=1e-9)
      assert row["seconds"][name] > 0
    # The blur baseline is scored on the image's own part, pooled from the (padded) picture.
    padded = np.pad(original[:oh, :ow], ((0, h - oh), (0, w - ow), (0, 0)), mode="edge")
    blur = blur_baseline(padded)[:oh, :ow]
    assert abs(row["psnr"][report["baseline"]] - peak_signal_noise_ratio(
        original[:oh, :ow], blur, data_range=255)) <= 1e-3
    # The 2-step panel is the Consistency Decoder's decode of the encoded image, with the
    # documented per-name noise.
    latents = jcd.encode(vae, original[None], config=jcd.TINY_VAE, layout="NHWC")
    want = jcd.decode(cd, latents, documented_key(0, row["name"])[None], config=jcd.TINY,
                      layout="NHWC")
    diff = np.abs(decoded[2].astype(int) - np.asarray(jcd.to_uint8(want))[0].astype(int))
    assert diff.max() <= 1, diff.max()  # one 8-bit level: XLA's sums differ per program
  for metric in ("psnr", "ssim"):
    for name in names:
      assert abs(report["mean"][metric][name] - np.mean(
          [r[metric][name] for r in report["images"]])) < 1e-9


def test_eval_without_a_gan_decoder_and_with_bad_images(tmp_path, capsys):
  photos, vae, _ = _setup(tmp_path)
  encoder_only = {k: vae[k] for k in ("encoder", "quant_conv")}
  checkpoint.save(str(tmp_path / "both"), jcd.random_params(jcd.TINY, 2), jcd.TINY,
                  vae_params=encoder_only, vae_config=jcd.TINY_VAE, vae_halves=("encoder",))
  # The decoder's checkpoint carries the encoder, as a converted ConsistencyDecoderVAE does.
  assert cli.main(["eval", str(photos), "--weights", str(tmp_path / "both"), "-o",
                   str(tmp_path / "report"), "--schedules", "1.0"]) == cli.EXIT_INPUTS_FAILED
  capsys.readouterr()
  report = json.loads((tmp_path / "report" / "report.json").read_text())
  assert report["decoders"] == ["Consistency Decoder, 1 step"]
  assert [os.path.basename(f["input"]) for f in report["failures"]] == ["chelsea.png"]
  assert "does not divide by 8" in report["failures"][0]["reason"]


def test_eval_refuses_a_folder_of_the_users_and_updates_its_own_report(tmp_path, capsys):
  from hostile import leftovers, snapshot
  photos, _, _ = _setup(tmp_path)
  mine = tmp_path / "mine"
  (mine / "grids").mkdir(parents=True)
  (mine / "report.md").write_text("my notes")
  (mine / "report.json").write_text('{"mine": true}')
  Image.new("RGB", (8, 8)).save(mine / "grids" / "img0.png")
  before = snapshot(tmp_path)
  args = ["--weights", str(tmp_path / "cd"), "--vae", str(tmp_path / "vae"), "--fit", "pad"]
  assert cli.main(["eval", str(photos), "-o", str(mine), *args]) == cli.EXIT_USAGE
  err = capsys.readouterr().err
  assert "folder of something else" in err and "Nothing was changed" in err, err
  assert snapshot(tmp_path) == before and leftovers(tmp_path) == []
  # Its own report folder, run again, is updated.
  report = tmp_path / "report"
  assert cli.main(["eval", str(photos / "coffee.png"), "-o", str(report), *args]) == 0
  assert cli.main(["eval", str(photos), "-o", str(report), *args]) == 0
  assert len(json.loads((report / "report.json").read_text())["images"]) == 3
