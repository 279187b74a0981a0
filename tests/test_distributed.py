"""Sharding, several processes and SIGKILL: each in subprocesses, as a user would run them."""

import filecmp
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np

from jaxconsdec.files import TMP_PREFIX
from jaxconsdec.config import SD_SCALING_FACTOR as LATENT_SCALE
from hostile import cli_command
from simulated_devices import run_on_simulated_devices

EIGHT_DEVICES = textwrap.dedent("""
    import jax, numpy as np, jaxconsdec as jcd
    from jaxconsdec.sharded import ShardedDecoder
    assert jax.device_count() == 8, jax.devices()
    cfg = jcd.TINY
    params = jcd.random_params(cfg, seed=0)
    lat = (np.random.default_rng(0).standard_normal((11, 4, 4, 4)) / 0.18215).astype(np.float32)
    decoder = ShardedDecoder(params, config=cfg)
    assert decoder.num_shards == 8 and decoder.global_batch(3) == 8
    got = decoder.decode(lat, 7, start=100, batch_size=8)   # 11 = 8 + 3 padded to 8
    assert got.shape == (11, 3, 32, 32), got.shape
    keys = jcd.example_keys(7, 11, start=100)
    single = jax.devices()[0]
    with jax.default_device(single):
      for i in range(11):
        want = np.asarray(jcd.decode(params, lat[i:i + 1], keys[i:i + 1], config=cfg))[0]
        np.testing.assert_array_equal(got[i], want, err_msg=f"example {i}")
    # Another batch size (global 16, two examples per device) gives the same images.
    other = decoder.decode(lat, 7, start=100, batch_size=16)
    np.testing.assert_allclose(other, got, rtol=0, atol=1e-5)
    print("OK", float(np.abs(other - got).max()))
""")


def test_sharded_over_eight_devices_equals_single_device_per_example():
  run_on_simulated_devices(EIGHT_DEVICES, 8)


def _write_inputs(folder, n=12):
  os.makedirs(folder)
  rng = np.random.default_rng(0)
  for i in range(n // 3):
    np.save(os.path.join(folder, f"f{i}.npy"),
            (rng.standard_normal((3, 4, 4, 4)) / LATENT_SCALE).astype(np.float32))
  return folder


def _decode_cmd(inputs, out, *extra):
  return [sys.executable, "-m", "jaxconsdec.cli", "decode", inputs, "-o", out,
          "--random-weights", "tiny", "--no-progress", *extra]


def _env(tmp_path):
  # One CPU device per process; a shared compile cache makes the many restarts cheaper.
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
              XDG_CACHE_HOME=str(tmp_path / "cache"))


def _same_files(a, b):
  names_a, names_b = sorted(os.listdir(a)), sorted(os.listdir(b))
  assert names_a == names_b
  _, mismatch, errors = filecmp.cmpfiles(a, b, names_a, shallow=False)
  assert mismatch == [] and errors == [], (mismatch, errors)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_on_localhost_equal_one_process_file_for_file(tmp_path):
  inputs = _write_inputs(str(tmp_path / "in"))
  env = _env(tmp_path)
  one = subprocess.run(_decode_cmd(inputs, str(tmp_path / "one"), "--batch-size", "1"),
                       env=env, capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  port = _free_port()
  # Batch 2 over 2 processes: one example per device, as in the 1-process run above.
  procs = [subprocess.Popen(
      _decode_cmd(inputs, str(tmp_path / "two"), "--batch-size", "2",
                  "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                  "--process-id", str(i)),
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "2 device(s) in 2 process(es)" in outs[0][1]
  assert "12 decoded now" in outs[0][1]
  _same_files(str(tmp_path / "one"), str(tmp_path / "two"))


def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_result(tmp_path):
  inputs = _write_inputs(str(tmp_path / "in"), n=15)
  env = _env(tmp_path)
  clean = subprocess.run(_decode_cmd(inputs, str(tmp_path / "clean"), "--batch-size", "1"),
                         env=env, capture_output=True, text=True, timeout=600)
  assert clean.returncode == 0, clean.stderr[-3000:]
  out = str(tmp_path / "killed")
  # Kill before anything is written, then after a few, then later: each re-run resumes.
  seen = []
  for kill_at in (0, 3, 8, 12):
    proc = subprocess.Popen(_decode_cmd(inputs, out, "--batch-size", "1"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      written = [f for f in os.listdir(out) if f.endswith(".png")] if os.path.isdir(out) else []
      if len(written) >= kill_at and (kill_at or os.path.isdir(out)):
        break
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    seen.append(len([f for f in os.listdir(out) if f.endswith(".png")]))
  assert seen[0] < 15 and seen[-1] < 15 and seen == sorted(seen), seen  # really cut short
  done = subprocess.run(_decode_cmd(inputs, out, "--batch-size", "1"), env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"{seen[-1]} already done, {15 - seen[-1]} decoded now" in done.stderr
  assert not [f for f in os.listdir(out) if f.startswith(TMP_PREFIX)]
  _same_files(str(tmp_path / "clean"), out)
  from PIL import Image
  for f in os.listdir(out):
    if f.endswith(".png"):
      Image.open(os.path.join(out, f)).load()  # every file is a complete, valid PNG


def _two_hosts(tmp_path, inputs, limits=(None, None), timeout=180):
  """Runs the job as two processes on localhost, each with its own OUT_DIR (out0, out1), as
  the README allows. -> [(exit status, stderr)] per process; fails if either hangs."""
  port = _free_port()
  procs = [subprocess.Popen(
      cli_command("decode", inputs, "-o", tmp_path / f"out{i}", "--random-weights", "tiny",
                  "--no-progress", "--batch-size", "2", "--coordinator", f"127.0.0.1:{port}",
                  "--num-processes", "2", "--process-id", i, file_size_limit=limits[i]),
      env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  results = []
  for p in procs:
    try:
      _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise AssertionError("a process hung: the other one stopped without it")
    results.append((p.returncode, err))
  return results


def test_a_conflicting_manifest_on_one_host_stops_both_processes(tmp_path):
  inputs = _write_inputs(str(tmp_path / "in"), n=3)
  # Host 1's OUT_DIR holds the outputs of a job run with another seed.
  other = subprocess.run(_decode_cmd(inputs, str(tmp_path / "out1"), "--seed", "9"),
                         env=_env(tmp_path), capture_output=True, text=True, timeout=300)
  assert other.returncode == 0, other.stderr[-3000:]
  start = time.monotonic()
  (code0, err0), (code1, err1) = _two_hosts(tmp_path, inputs)
  assert time.monotonic() - start < 180
  assert (code0, code1) == (2, 2), (err0[-2000:], err1[-2000:])
  assert "holds outputs of a job with other settings (seed: 9 there, 0 now" in err1
  assert "process 1 stopped the job" in err0 and "seed: 9 there" in err0
  # Refused before either process made or touched its OUT_DIR.
  assert not os.path.exists(tmp_path / "out0")


def test_a_write_error_on_one_host_stops_both_processes_with_exit_3(tmp_path):
  inputs = _write_inputs(str(tmp_path / "in"), n=6)
  # Process 1 cannot write a file past 2 kB (its 32x32 PNGs are ~3 kB): a full disk there.
  (code0, err0), (code1, err1) = _two_hosts(tmp_path, inputs, limits=(None, 2000))
  assert (code0, code1) == (3, 3), (err0[-2000:], err1[-2000:])
  assert "the job stopped: cannot write" in err0 and "File too large" in err0
  assert "Traceback" not in err0 + err1
  failures = json.load(open(tmp_path / "out0" / "failures.json"))
  assert "File too large" in failures["stopped_by"]
