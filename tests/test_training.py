"""`jaxconsdec train`: a run killed with SIGKILL and re-run ends bit for bit where an
uninterrupted run ends, and resumes on another device count; bad data and bad runs are
answered; one process's failure stops every process; the exported model decodes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import jaxconsdec as jcd
import small_models
from hostile import cli_command


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _photos(folder, names=("astronaut", "coffee", "chelsea")):
  import skimage.data
  os.makedirs(folder, exist_ok=True)
  for name in names:
    Image.fromarray(getattr(skimage.data, name)()).save(os.path.join(folder, f"{name}.png"))
  return folder


TRAIN = ["--steps", "6", "--batch-size", "2", "--resolution", "32", "--random-vae", "tiny",
         "--curriculum", "64,16", "--save-every", "2", "--keep", "2",
         "--eval-every", "3", "--log-every", "1", "--warmup", "2", "--lr", "1e-3",
         "--ema-decay", "0.9", "--no-progress"]
# The runs of this module train the smallest decoder and share an XLA cache (both set by the
# fixture below), so only the first compiles the step.
SHARED = []


@pytest.fixture(scope="module", autouse=True)
def shared_config_and_compile_cache(tmp_path_factory):
  folder = tmp_path_factory.mktemp("shared")
  SHARED[:] = ["--config", small_models.config_file(folder), "--compile-cache",
               str(folder / "xla-cache")]


def _command(images, run, *extra):
  return cli_command("train", images, "--out", run, *TRAIN, *SHARED, *extra)


def _train(images, run, *extra, timeout=600, **kw):
  return subprocess.run(_command(images, run, *extra), capture_output=True, text=True,
                        timeout=timeout, **kw)


def _exported(run):
  params, _ = jcd.load(run)
  import jax
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  return _photos(str(tmp_path_factory.mktemp("photos")))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, photos):
  run = str(tmp_path_factory.mktemp("runs") / "whole")
  proc = _train(photos, run)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return run


def test_a_run_writes_metrics_samples_and_a_model_that_decodes(uninterrupted, tmp_path):
  lines = [json.loads(l) for l in open(os.path.join(uninterrupted, "metrics.jsonl"))]
  train = [l for l in lines if l["kind"] == "train"]
  assert [l["step"] for l in train] == [1, 2, 3, 4, 5, 6]
  assert [l["delta"] for l in train] == [64, 64, 64, 16, 16, 16]  # the curriculum switches
  assert all(np.isfinite(l["loss"]) and l["grad_norm"] > 0 for l in train)
  assert [l["step"] for l in lines if l["kind"] == "eval"] == [0, 3, 6]
  evals = [l for l in lines if l["kind"] == "eval"]
  assert all({"psnr_1_step", "colour_psnr_2_steps", "detail_ratio_1_step",
              "psnr_blur_baseline"} <= set(l) for l in evals)
  assert sorted(os.listdir(os.path.join(uninterrupted, "samples"))) == [
      "step_0000000.png", "step_0000003.png", "step_0000006.png"]
  assert os.listdir(os.path.join(uninterrupted, "tensorboard"))
  loaded = jcd.load(uninterrupted)
  assert loaded.config.latent_channels == 4 and loaded.vae_halves == ("encoder",)
  run = json.load(open(os.path.join(uninterrupted, "run.json")))
  # From scratch the latent statistics are measured over the images, and stored.
  assert tuple(run["config"]["latent_std"]) == loaded.config.latent_std != (
      small_models.SMALLEST.latent_std)
  lat = np.asarray(jcd.encode(loaded.vae_params, np.zeros((1, 32, 32, 3), np.float32),
                              config=loaded.vae_config, layout="NHWC"))
  np.save(tmp_path / "one.npy", lat[0].transpose(2, 0, 1))
  out = subprocess.run(cli_command("decode", str(tmp_path / "one.npy"), "-o",
                                   str(tmp_path / "out"), "--weights", uninterrupted,
                                   "--no-progress"), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert os.path.exists(tmp_path / "out" / "one.png")


def _wait_for(path, proc, timeout=600):
  start = time.time()
  while not os.path.exists(path):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() - start < timeout
    time.sleep(0.05)


@pytest.mark.parametrize("kill_after", ["checkpoints/2", "checkpoints/4"])
def test_sigkill_and_rerun_ends_bit_for_bit_where_an_uninterrupted_run_ends(
    uninterrupted, photos, tmp_path, kill_after):
  """Killed once a checkpoint appears (before and after the curriculum switch at step 3),
  the same command resumes and exports exactly the uninterrupted run's EMA params."""
  run = str(tmp_path / "run")
  proc = subprocess.Popen(_command(photos, run),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for(os.path.join(run, kill_after), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(run, "model"))
  saved = [n for n in os.listdir(os.path.join(run, "checkpoints")) if n.isdigit()]
  assert all(int(n) % 2 == 0 for n in saved), saved  # every --save-every 2 steps only
  again = _train(photos, run)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resuming" in again.stderr
  got, want = _exported(run), _exported(uninterrupted)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  steps = [json.loads(l)["step"] for l in open(os.path.join(run, "metrics.jsonl"))
           if json.loads(l)["kind"] == "train"]
  assert steps == [1, 2, 3, 4, 5, 6]  # what the killed run logged past its checkpoint: once


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint(photos, tmp_path):
  run = str(tmp_path / "run")
  proc = subprocess.Popen(_command(photos, run),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for(os.path.join(run, "checkpoints", "2"), proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-2000:]
  assert "run the same command to resume" in err
  assert not os.path.exists(os.path.join(run, "model"))
  assert len(os.listdir(os.path.join(run, "checkpoints"))) >= 1


def test_bad_data_and_bad_runs_are_answered(photos, tmp_path):
  # An empty folder: nothing to train on, exit 2 before any work.
  empty = tmp_path / "empty"
  empty.mkdir()
  proc = _train(str(empty), str(tmp_path / "r0"))
  assert proc.returncode == 2 and "no usable training images" in proc.stderr, proc.stderr
  # Unreadable and too-small images are left out, listed, and the run goes on: exit 1.
  mixed = tmp_path / "mixed"
  _photos(str(mixed))  # the same three photos as the other runs: their programs are cached
  Image.new("RGB", (16, 40)).save(mixed / "small.png")
  (mixed / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  run = str(tmp_path / "r1")
  proc = _train(str(mixed), run, "--steps", "1", "--eval-every", "1")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "small.png" in proc.stderr and "smaller than the 32x32" in proc.stderr
  failures = json.load(open(os.path.join(run, "failures.json")))
  assert sorted(os.path.basename(f["input"]) for f in failures) == ["broken.png", "small.png"]
  # A VAE whose latents the decoder cannot take: 16 channels for a 4-channel decoder.
  proc = subprocess.run(cli_command("train", photos, "--out", str(tmp_path / "r2"), "--steps",
                                    "1", "--init", run, "--random-vae", "sd3", "--no-progress"),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "16 channels" in proc.stderr, proc.stderr[-2000:]
  # Another command on an existing run's folder is refused, naming what differs.
  proc = _train(str(mixed), run, "--steps", "1", "--eval-every", "1", "--seed", "5")
  assert proc.returncode == 2 and "holds another run" in proc.stderr and "settings" in (
      proc.stderr), proc.stderr[-2000:]
  # A second trainer on a run that is running (its lock held) is refused.
  import fcntl
  with open(os.path.join(run, ".lock"), "a") as held:
    fcntl.flock(held, fcntl.LOCK_EX)
    proc = _train(str(mixed), run, "--steps", "1", "--eval-every", "1")
  assert proc.returncode == 2 and "another `jaxconsdec train` is running" in proc.stderr, (
      proc.stderr[-2000:])
  # A folder of something else is not taken over.
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  proc = _train(photos, str(other))
  assert proc.returncode == 2 and "not empty" in proc.stderr
  assert os.listdir(other) == ["notes.txt"]


def test_a_decoder_for_16_channel_latents_trains_from_scratch(photos, tmp_path):
  """--config with another VAE's latent space, stage 1 (denoising pre-training): the
  decoder takes its 16 channels and stores their measured statistics; the exported model
  decodes that VAE's latents."""
  vae_config = tmp_path / "vae16.json"
  vae_config.write_text(jcd.TINY_VAE.replace(latent_channels=16, use_quant_conv=False,
                                             use_post_quant_conv=False, scaling_factor=0.3611,
                                             shift_factor=0.1159).to_json())
  run = str(tmp_path / "run")
  proc = _train(photos, run, "--random-vae", str(vae_config), "--steps", "2",
                "--eval-every", "2", "--objective", "denoising")
  assert proc.returncode == 0, proc.stderr[-3000:]
  loaded = jcd.load(run)
  assert loaded.config.latent_channels == 16 and loaded.config.in_channels == 19
  assert loaded.config.shift_factor == 0.1159 and len(loaded.config.latent_std) == 16
  assert loaded.params["conv_in"]["kernel"].shape[2] == 19
  lat = jcd.encode(loaded.vae_params, np.zeros((1, 32, 32, 3), np.float32),
                   config=loaded.vae_config, layout="NHWC")
  assert jcd.decode(loaded.params, lat, 0, config=loaded.config, layout="NHWC").shape == (
      1, 32, 32, 3)


def test_the_command_fits_its_steps_and_names_what_differs(uninterrupted, photos, tmp_path):
  # Every differing setting is named, with both values.
  proc = _train(photos, uninterrupted, "--seed", "5", "--lr", "2e-3")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "settings.seed: 0 in the run, 5 in this command" in proc.stderr, proc.stderr
  assert "settings.optimization.lr: 0.001 in the run, 0.002 in this command" in proc.stderr
  # A longer run is not made in place: the refusal gives the command that trains on.
  proc = _train(photos, uninterrupted, "--steps", "9")
  assert proc.returncode == 2 and f"--init {uninterrupted} --out NEW_RUN_DIR" in proc.stderr, (
      proc.stderr[-2000:])
  # --lr 0 is refused, not replaced by the default.
  proc = _train(photos, str(tmp_path / "zero"), "--lr", "0")
  assert proc.returncode == 2 and "lr" in proc.stderr and not os.path.exists(tmp_path / "zero")
  # Without --warmup, a short run warms up over its first tenth and trains at --lr after it;
  # the move to a finer grid is announced.
  flags = [f for i, f in enumerate(TRAIN) if "--warmup" not in (f, TRAIN[i - 1])]
  run = str(tmp_path / "short")
  proc = subprocess.run(cli_command("train", photos, "--out", run, *flags, *SHARED, "--steps",
                                    "20", "--save-every", "20", "--eval-every", "20"),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.load(open(os.path.join(run, "run.json")))["settings"]["optimization"][
      "warmup_steps"] == 2
  lrs = {l["step"]: l["lr"] for l in map(json.loads, open(os.path.join(run, "metrics.jsonl")))
         if l["kind"] == "train"}
  assert lrs[1] == pytest.approx(1e-3 / 2) and lrs[20] == pytest.approx(1e-3)
  assert "step 10: the curriculum moves from grid spacing 64 to 16" in proc.stderr


def _strict_json(line):
  def refuse(token):
    raise ValueError(f"{token} is not JSON")
  return json.loads(line, parse_constant=refuse)


def test_a_run_that_goes_nan_stops_keeps_finite_checkpoints_and_exports_nothing(photos,
                                                                              tmp_path):
  run = str(tmp_path / "nan")
  proc = _train(photos, run, "--lr", "1e6", "--save-every", "1")
  assert proc.returncode == 5, proc.stderr[-3000:]
  assert "diverged" in proc.stderr and "NaN or inf at step" in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(os.path.join(run, "model"))  # nothing exported
  lines = [_strict_json(l) for l in open(os.path.join(run, "metrics.jsonl"))]
  assert any(l["kind"] == "train" and l["loss"] is None for l in lines)
  # The checkpoints kept hold finite states only.
  import orbax.checkpoint as ocp
  steps = sorted(int(s) for s in os.listdir(os.path.join(run, "checkpoints")) if s.isdigit())
  assert steps, "the last good checkpoint is kept"
  for s in steps:
    state = ocp.PyTreeCheckpointer().restore(os.path.join(run, "checkpoints", str(s), "state"))
    import jax
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state)), s
  bad = [l["step"] for l in lines if l["kind"] == "train" and l["loss"] is None]
  assert max(steps) < min(bad)


def test_a_tampered_run_folder_is_answered_in_one_line(uninterrupted, photos, tmp_path):
  import shutil
  from hostile import snapshot
  cases = {
      "a FIFO for metrics.jsonl": ("metrics.jsonl", _fifo_instead, "FIFO"),
      "a FIFO for the lock": (".lock", _fifo_instead, "FIFO"),
      "run.json not JSON": ("run.json", lambda p: open(p, "w").write("{not json"),
                            "unreadable"),
      "run.json a list": ("run.json", lambda p: open(p, "w").write("[1, 2]"), "unreadable"),
      "run.json with other widths": ("run.json", lambda p: _edit_widths(p), "block_out_channels"),
  }
  for case, (name, tamper, reason) in cases.items():
    run = tmp_path / case.replace(" ", "-")
    shutil.copytree(uninterrupted, run)
    tamper(str(run / name))
    before = snapshot(tmp_path)
    proc = _train(photos, str(run), timeout=120)  # a FIFO used to block for good
    assert proc.returncode == 2, (case, proc.stderr[-3000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and reason in last and "Traceback" not in proc.stderr, (
        case, proc.stderr[-2000:])
    assert snapshot(tmp_path) == before, case


def _fifo_instead(path):
  if os.path.lexists(path):
    os.remove(path)
  os.mkfifo(path)


def _edit_widths(path):
  run = json.load(open(path))
  run["config"]["block_out_channels"] = [16, 32, 32, 32]
  json.dump(run, open(path, "w"))


def test_an_image_that_fails_to_decode_mid_run_is_named_listed_and_left_out(photos, tmp_path):
  # Three images and the evaluation on the three photos, as the other runs: their programs
  # (the latent statistics' encoder, the evaluation's decoder) are cached.
  images = _photos(str(tmp_path / "images"), ("astronaut", "coffee"))
  whole = tmp_path / "whole.jpg"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), np.uint8)).save(whole)
  data = whole.read_bytes()
  (tmp_path / "images" / "truncated.jpg").write_bytes(data[:len(data) // 2])  # header intact
  run = str(tmp_path / "run")
  proc = _train(images, run, "--steps", "8", "--eval-every", "8", "--eval-images", photos)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "LEFT OUT" in proc.stderr and "truncated.jpg" in proc.stderr, proc.stderr[-3000:]
  failures = json.load(open(os.path.join(run, "failures.json")))
  assert [os.path.basename(f["input"]) for f in failures] == ["truncated.jpg"]
  assert "failed to decode" in failures[0]["reason"]
  assert jcd.load(run).params is not None  # the model was exported
  # The same command again is the same run (the dropped file does not change what it is),
  # and it still reports the image its earlier run left out.
  again = _train(images, run, "--steps", "8", "--eval-every", "8", "--eval-images", photos)
  assert again.returncode == 1 and "another run" not in again.stderr, again.stderr[-3000:]
  assert "truncated.jpg" in again.stderr
  assert [os.path.basename(f["input"]) for f in json.load(
      open(os.path.join(run, "failures.json")))] == ["truncated.jpg"]


def test_flags_full_disks_and_killed_exports_are_answered(uninterrupted, photos, tmp_path):
  import shutil
  from hostile import run_cli, snapshot
  before = snapshot(tmp_path)
  proc = _train(photos, str(tmp_path / "r"), "--curriculum", "abc", timeout=120)
  assert proc.returncode == 2 and "--curriculum takes" in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and snapshot(tmp_path) == before
  for law, words in (("1.0", "--noise-law takes"), ("1.0,-2", "positive std")):
    proc = _train(photos, str(tmp_path / "r"), "--noise-law", law, timeout=120)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and snapshot(tmp_path) == before
  (tmp_path / "file").write_text("x")
  proc = _train(photos, str(tmp_path / "file"), timeout=120)
  assert proc.returncode == 2 and "--out " in proc.stderr and "-o " not in proc.stderr
  # A full disk while checkpointing (here a file-size limit, which fails writes alike) is
  # the disk, named as such: not "out of device memory", not a bug.
  full = run_cli(*_command(photos, str(tmp_path / "full"))[3:], file_size_limit=2_000_000,
                 timeout=600)
  assert full.code == 3, full.err[-3000:]
  last = full.err.strip().splitlines()[-1]
  assert "File too large" in last and "it resumes" in last and "device memory" not in last
  # An export killed mid-write leaves its temporary folder; the next run clears it.
  run = tmp_path / "run"
  shutil.copytree(uninterrupted, run)
  (run / ".model.tmp-0123abcd").mkdir()
  (run / ".model.tmp-0123abcd" / "big").write_bytes(b"\0" * 1000)
  proc = _train(photos, str(run))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert not [n for n in os.listdir(run) if ".tmp-" in n]


def test_a_run_killed_on_2_devices_with_its_state_sharded_resumes_on_1(uninterrupted, photos,
                                                                        tmp_path):
  """The checkpoint of a sharded state restores onto another device count and layout: the
  run ends where the uninterrupted one-device run ends (to float32 summation order)."""
  run = str(tmp_path / "run")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(_command(photos, run, "--state-layout", "sharded"), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for(os.path.join(run, "checkpoints", "2"), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  again = _train(photos, run)  # one device, the state replicated (auto, for the tiny widths)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resuming" in again.stderr
  got, want = _exported(run), _exported(uninterrupted)
  diff = np.sqrt(sum(np.sum((got[k].astype(np.float64) - want[k]) ** 2) for k in want))
  norm = np.sqrt(sum(np.sum(want[k].astype(np.float64) ** 2) for k in want))
  assert diff <= 1e-5 * norm, diff / norm


def test_when_one_of_two_processes_fails_both_stop_together_with_its_message(photos, tmp_path):
  """Process 0 alone writes the metrics; its run file replaced by a FIFO mid-run makes it
  fail alone. Both processes stop at the next sync point, with process 0's reason, and
  neither waits out a timeout in a collective the other never joins."""
  run = str(tmp_path / "run")
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  procs = [subprocess.Popen(_command(photos, run, "--steps", "200", "--save-every", "100",
                                     "--eval-every", "100", "--coordinator",
                                     f"127.0.0.1:{port}", "--num-processes", "2",
                                     "--process-id", str(i)),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  metrics = os.path.join(run, "metrics.jsonl")
  deadline = time.time() + 600
  while not (os.path.exists(metrics) and open(metrics).read().count('"train"') >= 3):
    assert all(p.poll() is None for p in procs) and time.time() < deadline
    time.sleep(0.05)
  _fifo_instead(metrics)
  tampered = time.time()
  outs = [p.communicate(timeout=120) for p in procs]
  assert time.time() - tampered < 60  # a lost peer would be noticed only after minutes
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
  assert "tampered" in outs[0][1].strip().splitlines()[-1]
  last = outs[1][1].strip().splitlines()[-1]
  assert "process 0 stopped the job" in last and "tampered" in last, last
  assert not os.path.exists(os.path.join(run, "model"))


def test_short_of_memory_the_trainer_hands_free_pages_back_after_each_step(photos, tmp_path):
  """Where the memory available before the first step holds one step's temporaries but not
  two (made so here: 3 GiB available; 1 GiB a step on each of 2 simulated devices, which
  share the host), each step's freed block is handed back before the next
  (jaxconsdec/host_memory.py); the run is the same run."""
  forced = ("import sys; from jaxconsdec import host_memory as h; calls = []\n"
            "from jaxconsdec.training.step import TrainStep\n"
            "TrainStep.temporary_bytes = property(lambda self: 1 << 30)\n"
            "h.available_bytes = lambda: 3 << 30\n"
            "h.release_free_memory = lambda: calls.append(1)\n"
            "from jaxconsdec.cli import main; code = main(sys.argv[1:])\n"
            "print('RELEASED', len(calls)); print('TORCH', 'torch' in sys.modules)\n"
            "sys.exit(code)")
  proc = subprocess.run([sys.executable, "-c", forced, "train", photos, "--out",
                         str(tmp_path / "run"), *TRAIN, *SHARED], capture_output=True,
                        text=True, timeout=600,
                        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "RELEASED 7" in proc.stdout, proc.stdout  # once after set-up, then once a step
  # Where torch is installed, the run does not import it (tensorboardX would, for nothing).
  assert "TORCH False" in proc.stdout, proc.stdout
