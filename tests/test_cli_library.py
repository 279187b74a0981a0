"""`jaxconsdec.cli.main` as a library call (tests, notebooks): whatever a command changes for
its run is what it was afterwards, whether the command succeeds or fails. And the command
starts without JAX: `--version` and `--help` import neither JAX nor Flax."""

import logging
import os
import signal
import subprocess
import sys
import warnings

import jax
import pytest

from jaxconsdec import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGGERS = ("absl", "asyncio")


def _state():
  return {"signals": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)},
          "unraisablehook": sys.unraisablehook,
          "warnings": list(warnings.filters),
          "loggers": {name: logging.getLogger(name).level for name in LOGGERS},
          "compile cache": jax.config.jax_compilation_cache_dir,
          "compile cache threshold": jax.config.jax_persistent_cache_min_compile_time_secs}


@pytest.fixture
def own_settings():
  """This process's own settings, set to values a command would not choose."""
  handler = lambda signum, frame: None
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  levels = {name: logging.getLogger(name).level for name in LOGGERS}
  cache = jax.config.jax_compilation_cache_dir
  threshold = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 7.0)
  signal.signal(signal.SIGTERM, handler)
  signal.signal(signal.SIGINT, handler)
  logging.getLogger("absl").setLevel(logging.INFO)
  with warnings.catch_warnings():
    warnings.simplefilter("always", UserWarning)
    yield
  for s, h in before.items():
    signal.signal(s, h)
  for name, level in levels.items():
    logging.getLogger(name).setLevel(level)
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)


def test_a_failing_and_a_succeeding_command_leave_the_process_as_it_was(own_settings,
                                                                        tmp_path):
  before = _state()
  # Fails (no usable images) after the trainer has put in its SIGINT/SIGTERM stop handler,
  # quieted the libraries and set the compilation cache.
  (tmp_path / "empty").mkdir()
  code = cli.main(["train", str(tmp_path / "empty"), "--out", str(tmp_path / "run"),
                   "--steps", "1", "--config", "tiny", "--random-vae", "tiny", "--resolution",
                   "32", "--compile-cache", str(tmp_path / "xla"), "--no-progress"])
  assert code == cli.EXIT_USAGE
  assert _state() == before
  # Succeeds: decodes the sample latents with the demo model.
  code = cli.main(["decode", os.path.join(ROOT, "samples", "latents"), "-o",
                   str(tmp_path / "out"), "--weights",
                   os.path.join(ROOT, "samples", "demo", "model"), "--no-progress",
                   "--compile-cache", str(tmp_path / "xla")])
  assert code == cli.EXIT_OK and len(os.listdir(tmp_path / "out")) == 4
  assert _state() == before


def test_a_command_that_sets_its_ctrl_c_handler_and_succeeds_puts_it_back(own_settings,
                                                                          tmp_path):
  pytest.importorskip("torch")
  import jaxconsdec as jcd
  import weight_files
  from reference import diffusers_unet
  weight_files.write_unet2d(str(tmp_path / "w.safetensors"), diffusers_unet(jcd.TINY, seed=0))
  before = _state()
  code = cli.main(["convert", str(tmp_path / "w.safetensors"), "-o", str(tmp_path / "ck"),
                   "--config", "tiny"])
  assert code == cli.EXIT_OK
  assert _state() == before


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_start_without_jax(flag):
  code = (f"import sys\nfrom jaxconsdec import cli\ntry:\n  cli.main([{flag!r}])\n"
          "except SystemExit as e:\n  assert e.code == 0\n"
          "print(sorted(m for m in ('jax', 'flax', 'orbax', 'optax') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_converter_does_not_pull_in_flax():
  code = ("import sys, jaxconsdec.convert\n"
          "print(sorted(m for m in ('flax', 'orbax', 'optax') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
