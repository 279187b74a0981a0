"""uint8 conversion, the PNG writer, and the `jaxconsdec sample` command."""

import io
import os

import numpy as np
from PIL import Image

import jaxconsdec as jcd
from jaxconsdec import cli
from jaxconsdec.images import encode_png


def test_to_uint8_is_the_original_formula():
  x = np.linspace(-1.2, 1.2, 1001, dtype=np.float32).reshape(1, 1, 1, -1)
  want = ((x + 1) * 127.5).clip(0, 255).astype(np.uint8)  # openai/consistencydecoder README
  assert np.array_equal(np.asarray(jcd.to_uint8(x)), want)


def test_png_round_trips_through_pillow():
  pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  back = np.asarray(Image.open(io.BytesIO(encode_png(pixels))))
  assert np.array_equal(back, pixels)


def test_sample_command_writes_a_png_and_says_weights_are_random(tmp_path, capsys):
  out = tmp_path / "s.png"
  assert cli.main(["sample", "--model", "tiny", "--size", "32", "-o", str(out)]) == 0
  said = capsys.readouterr().out
  assert "RANDOMLY INITIALISED" in said
  img = np.asarray(Image.open(out))
  assert img.shape == (32, 32, 3)
  assert os.listdir(tmp_path) == ["s.png"]  # no temporary file left behind


def test_sample_command_refuses_bad_flags(tmp_path, capsys):
  assert cli.main(["sample", "--size", "30", "-o", str(tmp_path / "a.png")]) == 2
  assert cli.main(["sample", "--schedule", "1.0,2", "-o", str(tmp_path / "a.png")]) == 2
  assert cli.main(["sample", "-o", str(tmp_path / "nope" / "a.png")]) == 2
  err = capsys.readouterr().err
  assert "multiple of 8" in err and "outside [0, 1]" in err and "does not exist" in err
  assert os.listdir(tmp_path) == []
