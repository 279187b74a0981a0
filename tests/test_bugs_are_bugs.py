"""A programming error inside a reader, the output check or a checkpoint restore is a bug
(exit 4, with its traceback), not a user-facing cause: an "unreadable file", an output
"incomplete" and silently redone, or a "truncated or corrupt" checkpoint."""

import os

import numpy as np
import pytest
from PIL import Image

import jaxconsdec as jcd
from jaxconsdec import checkpoint, cli
from jaxconsdec.inputs import image_files
from jaxconsdec.jobs import decode_job, latent_files

COMMON = ["--no-compile-cache", "--no-progress"]


def _bug(*args, **kwargs):
  raise TypeError("a bug")


def test_a_bug_in_the_image_reader_is_exit_4(tmp_path, monkeypatch, capsys):
  Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
  checkpoint.save(str(tmp_path / "vae"), vae_params=jcd.random_params(jcd.TINY_VAE, 0),
                  vae_config=jcd.TINY_VAE)
  monkeypatch.setattr(image_files, "image_size", _bug)
  code = cli.main(["encode", str(tmp_path / "x.png"), "-o", str(tmp_path / "out"), "--vae",
                   str(tmp_path / "vae"), *COMMON])
  assert code == cli.EXIT_INTERNAL and "TypeError: a bug" in capsys.readouterr().err


def test_a_bug_in_the_latent_reader_is_exit_4(tmp_path, monkeypatch, capsys):
  np.save(tmp_path / "x.npy", np.zeros((4, 2, 2), np.float32))
  monkeypatch.setattr(latent_files.LatentReader, "read", _bug)
  code = cli.main(["decode", str(tmp_path / "x.npy"), "-o", str(tmp_path / "out"),
                   "--random-weights", "tiny", *COMMON])
  assert code == cli.EXIT_INTERNAL and "TypeError: a bug" in capsys.readouterr().err


def test_a_bug_in_the_output_check_is_exit_4_not_a_silent_redo(tmp_path, monkeypatch, capsys):
  np.save(tmp_path / "x.npy", np.zeros((4, 2, 2), np.float32))
  args = ["decode", str(tmp_path / "x.npy"), "-o", str(tmp_path / "out"), "--random-weights",
          "tiny", *COMMON]
  assert cli.main(args) == cli.EXIT_OK
  monkeypatch.setattr(decode_job.DecodeJob, "output_complete", _bug)
  assert cli.main(args) == cli.EXIT_INTERNAL
  assert "TypeError: a bug" in capsys.readouterr().err


def test_a_restore_that_fails_for_another_reason_is_not_called_corrupt(tmp_path, monkeypatch):
  checkpoint.save(str(tmp_path / "ck"), jcd.random_params(jcd.TINY, 0), jcd.TINY, {})

  class OutOfMemory:
    def restore(self, *args, **kwargs):
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1 GiB")

    def metadata(self, *args, **kwargs):
      return real().metadata(*args, **kwargs)

  real = checkpoint._checkpointer
  monkeypatch.setattr(checkpoint, "_checkpointer", OutOfMemory)
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
    jcd.load(str(tmp_path / "ck"))
