"""What the decode job promises beyond single files: flags checked before anything is written,
exit statuses that tell failures apart, weights identified by content, outputs as readable as
any tool's and durable across a crash, and cut-short outputs redone on resume."""

import json
import os
import stat
import sys
import textwrap

import numpy as np
import pytest

import jaxconsdec as jcd
from jaxconsdec import checkpoint, cli, files
from jaxconsdec.jobs import engine
from jaxconsdec.config import SD_SCALING_FACTOR as LATENT_SCALE
from hostile import leftovers, run_cli

COMMON = ["--random-weights", "tiny", "--no-compile-cache", "--no-progress"]


def _latent(*shape, seed=0):
  return (np.random.default_rng(seed).standard_normal(shape) / LATENT_SCALE).astype(np.float32)


def _decode(*args):
  return cli.main(["decode", *map(str, args)])


def _unet_file(path, seed):
  """A UNet2DModel safetensors file written by diffusers (the tests that need one need torch)."""
  pytest.importorskip("torch")
  import weight_files
  from reference import diffusers_unet
  weight_files.write_unet2d(str(path), diffusers_unet(jcd.TINY, seed=seed))
  return str(path)


@pytest.mark.parametrize("flags,message", [
    (["--seed", str(2**64)], "--seed must be in [0, 4294967295]"),
    (["--seed", "-1"], "--seed must be in"),
    (["--seed", str(2**32)], "--seed must be in"),  # would draw the same noise as seed 0
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--schedule", "1.0,nan"], "--schedule takes"),
    (["--schedule", "2"], "--schedule takes"),
    (["--max-pixels", "-5"], "--max-pixels must be positive"),
    (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--num-processes", "2", "--process-id", "2", "--coordinator", "h:1"], "--process-id"),
    (["--num-processes", "2"], "give all of --coordinator"),
])
def test_flags_are_checked_before_anything_is_written(tmp_path, flags, message, capsys):
  np.save(tmp_path / "x.npy", _latent(4, 2, 2))
  out = tmp_path / "out"
  assert _decode(tmp_path / "x.npy", "-o", out, *COMMON, *flags) == cli.EXIT_USAGE
  assert message in capsys.readouterr().err
  assert not out.exists()


def test_an_output_folder_that_is_a_file_is_a_usage_error(tmp_path, capsys):
  np.save(tmp_path / "x.npy", _latent(4, 2, 2))
  (tmp_path / "out").write_text("mine")
  assert _decode(tmp_path / "x.npy", "-o", tmp_path / "out", *COMMON) == cli.EXIT_USAGE
  assert "exists and is not a folder" in capsys.readouterr().err
  assert (tmp_path / "out").read_text() == "mine"


def test_full_disk_stops_the_job_with_exit_3_and_the_rerun_resumes(tmp_path):
  (tmp_path / "in").mkdir()
  np.save(tmp_path / "in" / "a.npy", _latent(3, 4, 2, 2))         # 16x16 PNGs: ~1 kB
  np.save(tmp_path / "in" / "b.npy", _latent(3, 4, 8, 8, seed=1))  # 64x64 noise: ~12 kB
  out = tmp_path / "out"
  # No file may grow past 4 kB: the small outputs fit, the first large one fails as it would
  # on a full disk.
  run = run_cli("decode", tmp_path / "in", "-o", out, *COMMON, file_size_limit=4000)
  assert run.code == cli.EXIT_ENVIRONMENT, run.err
  assert "error: the job stopped: cannot write" in run.err and "File too large" in run.err
  assert "Traceback" not in run.err
  assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == ["a-0.png", "a-1.png",
                                                                       "a-2.png"]
  assert leftovers(tmp_path) == []
  again = run_cli("decode", tmp_path / "in", "-o", out, *COMMON)
  assert again.code == cli.EXIT_OK, again.err
  assert "3 already done, 3 decoded now" in again.err


def test_an_internal_error_shows_its_traceback_with_exit_4(tmp_path, monkeypatch, capsys):
  np.save(tmp_path / "x.npy", _latent(4, 2, 2))

  def broken(*args, **kwargs):
    raise ValueError("a bug, not the user's fault")  # a ValueError must not read as exit 2
  monkeypatch.setattr(engine, "run_job", broken)
  assert _decode(tmp_path / "x.npy", "-o", tmp_path / "out", *COMMON) == cli.EXIT_INTERNAL
  err = capsys.readouterr().err
  assert "Traceback" in err and "a bug, not the user's fault" in err
  assert "internal error: this is a bug in jaxconsdec" in err


def test_weights_are_identified_by_content_not_name_and_size(tmp_path, capsys):
  a, b = tmp_path / "a" / "unet.safetensors", tmp_path / "b" / "unet.safetensors"
  for path, seed in ((a, 61), (b, 62)):
    path.parent.mkdir()
    _unet_file(path, seed)
  assert os.path.getsize(a) == os.path.getsize(b)
  (tmp_path / "in").mkdir()
  np.save(tmp_path / "in" / "x.npy", _latent(4, 2, 2))
  out = tmp_path / "out"
  job = ["decode", tmp_path / "in", "-o", out, "--config", "tiny", "--no-compile-cache",
         "--no-progress"]
  weights = tmp_path / "weights" / "unet.safetensors"
  weights.parent.mkdir()
  os.link(a, weights)
  assert cli.main([*map(str, job), "--weights", str(weights)]) == cli.EXIT_OK
  np.save(tmp_path / "in" / "y.npy", _latent(4, 2, 2, seed=3))  # more work for a re-run
  weights.unlink()
  os.link(b, weights)  # another model under the same name, of the same size
  assert cli.main([*map(str, job), "--weights", str(weights)]) == cli.EXIT_USAGE
  assert "holds outputs of a job with other settings (weights:" in capsys.readouterr().err
  assert not os.path.exists(out / "y.png")
  # Checkpoints: identified by their metadata, which records their sources' SHA-256.
  for name, src in (("ck-a", a), ("ck-b", b)):
    assert cli.main(["convert", str(src), "-o", str(tmp_path / name), "--config", "tiny"]) == 0
  assert checkpoint.identity(str(tmp_path / "ck-a")) != checkpoint.identity(str(tmp_path / "ck-b"))
  assert checkpoint.identity(str(a)) != checkpoint.identity(str(b))


def _modes(root):
  """{relative path: permission bits} of a folder and everything in it."""
  out = {".": stat.S_IMODE(os.stat(root).st_mode)}
  for folder, dirs, names in os.walk(root):
    for name in dirs + names:
      path = os.path.join(folder, name)
      out[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
  return out


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_and_checkpoints_get_the_modes_the_umask_gives(tmp_path, umask, capsys):
  src = _unet_file(tmp_path / "unet.safetensors", 63)
  (tmp_path / "in" / "sub").mkdir(parents=True)
  np.save(tmp_path / "in" / "sub" / "x.npy", _latent(2, 4, 2, 2))
  (tmp_path / "in" / "bad.npy").write_bytes(b"")  # so that failures.json is written
  old = os.umask(umask)
  try:
    for fmt in ("png", "npy"):
      assert _decode(tmp_path / "in", "-o", tmp_path / fmt, "--format", fmt, *COMMON) == 1
    assert cli.main(["convert", src, "-o", str(tmp_path / "ck"), "--config", "tiny"]) == 0
  finally:
    os.umask(old)
  capsys.readouterr()
  want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
  for root in ("png", "npy", "ck"):
    modes = _modes(tmp_path / root)
    assert len(modes) > 4
    for path, mode in modes.items():
      is_dir = os.path.isdir(tmp_path / root / path)
      assert mode == (want_dir if is_dir else want_file), (root, path, oct(mode))
  assert {"failures.json", "jaxconsdec-job.json", "sub"} <= set(os.listdir(tmp_path / "png"))


def test_cut_short_outputs_are_redone_on_resume(tmp_path, capsys):
  (tmp_path / "in").mkdir()
  np.save(tmp_path / "in" / "x.npy", _latent(5, 4, 2, 3))
  for fmt in ("png", "npy"):
    out = tmp_path / fmt
    assert _decode(tmp_path / "in", "-o", out, "--format", fmt, *COMMON) == cli.EXIT_OK
    good = {n: (out / n).read_bytes() for n in os.listdir(out) if n.endswith(fmt)}
    data = good[f"x-0.{fmt}"]
    (out / f"x-0.{fmt}").write_bytes(b"")                        # renamed, never flushed
    (out / f"x-1.{fmt}").write_bytes(data[:len(data) // 2])     # cut in the middle
    (out / f"x-2.{fmt}").write_bytes(data[:-4])                  # the last bytes missing
    (out / f"x-3.{fmt}").unlink()
    os.symlink(out / f"x-4.{fmt}", out / f"x-3.{fmt}")           # not a file of ours
    capsys.readouterr()
    assert _decode(tmp_path / "in", "-o", out, "--format", fmt, *COMMON) == cli.EXIT_OK
    assert "1 already done, 4 decoded now (4 found cut short were redone)" in (
        capsys.readouterr().err)
    assert {n: (out / n).read_bytes() for n in os.listdir(out) if n.endswith(fmt)} == good
    assert not os.path.islink(out / f"x-3.{fmt}")


def test_every_output_is_fsynced_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
  events = []
  real_fsync, real_replace = os.fsync, os.replace
  monkeypatch.setattr(os, "fsync", lambda fd: events.append(
      ("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")) or real_fsync(fd))
  monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", os.path.basename(b)))
                      or real_replace(a, b))
  np.save(tmp_path / "x.npy", _latent(2, 4, 2, 2))
  assert _decode(tmp_path / "x.npy", "-o", tmp_path / "out", *COMMON) == cli.EXIT_OK
  renames = [i for i, e in enumerate(events) if e[0] == "rename"]
  assert {events[i][1] for i in renames} == {"jaxconsdec-job.json", "x-0.png", "x-1.png"}
  for i in renames:
    assert events[i - 1] == "fsync-file" and events[i + 1] == "fsync-dir", events


def test_a_second_job_into_a_held_out_dir_is_refused_and_a_killed_ones_lock_is_not(tmp_path):
  import signal
  import subprocess
  import time
  from hostile import cli_command, run_cli
  np.save(tmp_path / "x.npy", np.zeros((4, 2, 2), np.float32))
  out = tmp_path / "out"
  # A job holding OUT_DIR: a process that took the job's lock and waits.
  holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
      import sys, time
      from jaxconsdec.jobs.engine import out_dir_lock
      with out_dir_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
  """), str(out)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    run = run_cli("decode", tmp_path / "x.npy", "-o", out, "--random-weights", "tiny",
                  "--no-compile-cache", "--no-progress")
    assert run.code == cli.EXIT_USAGE, run.err[-2000:]
    assert "another jaxconsdec job is writing into" in run.err and str(holder.pid) in run.err
    assert not os.path.exists(out / "x.png")
  finally:
    holder.send_signal(signal.SIGKILL)  # killed: its lock file stays, its flock does not
    holder.wait()
  assert [n for n in os.listdir(out) if n.startswith(".jaxconsdec-lock-")]
  run = run_cli("decode", tmp_path / "x.npy", "-o", out, "--random-weights", "tiny",
                "--no-compile-cache", "--no-progress")
  assert run.code == cli.EXIT_OK, run.err[-2000:]
  assert sorted(os.listdir(out)) == ["jaxconsdec-job.json", "x.png"]  # the lock file removed
