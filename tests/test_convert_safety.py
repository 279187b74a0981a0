"""`convert` and `load` against hostile files and a hostile environment: --force never deletes
what is not a checkpoint, a deflate bomb or a lying header cannot exhaust memory, special files
do not hang, a full disk or Ctrl-C leaves nothing behind and prints one clear line, and a
checkpoint restores onto the device it is loaded on."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest

import jaxconsdec as jcd
from jaxconsdec import cli
from jaxconsdec.convert import safetensors_file
from hostile import leftovers, run_cli, snapshot
from simulated_devices import run_on_simulated_devices

GIB = 1 << 30


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
  """A TINY UNet2DModel safetensors file (the converter's cheapest real input)."""
  pytest.importorskip("torch")  # diffusers writes it; the tests without it need no torch
  import weight_files
  from reference import diffusers_unet
  path = str(tmp_path_factory.mktemp("weights") / "unet.safetensors")
  weight_files.write_unet2d(path, diffusers_unet(jcd.TINY, seed=60))
  return path


def _convert(*args):
  return cli.main(["convert", *map(str, args), "--config", "tiny"])


def test_force_replaces_a_checkpoint_and_nothing_else(tmp_path, tiny_file, capsys):
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "a.txt").write_text("keep")
  (mine / "b.txt").write_text("keep too")
  plain = tmp_path / "notes.txt"
  plain.write_text("a plain file")
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "jaxconsdec.json").write_text("{ not json")
  before = snapshot(tmp_path)
  assert _convert(tiny_file, "-o", mine, "--force") == cli.EXIT_USAGE
  err = capsys.readouterr().err
  assert "is not a jaxconsdec checkpoint (no jaxconsdec.json)" in err
  assert "holds 2 entries (a.txt, b.txt)" in err
  assert _convert(tiny_file, "-o", plain, "--force") == cli.EXIT_USAGE
  assert "is a file, not a jaxconsdec checkpoint folder" in capsys.readouterr().err
  assert _convert(tiny_file, "-o", broken, "--force") == cli.EXIT_USAGE
  assert "jaxconsdec.json is unreadable" in capsys.readouterr().err
  assert snapshot(tmp_path) == before  # nothing deleted, nothing left (no .tmp-*.old)
  # A real checkpoint is replaced, and only then.
  ck = tmp_path / "ck"
  assert _convert(tiny_file, "-o", ck) == cli.EXIT_OK
  assert _convert(tiny_file, "-o", ck) == cli.EXIT_USAGE
  assert "pass --force" in capsys.readouterr().err
  assert _convert(tiny_file, "-o", ck, "--force", "--dtype", "bfloat16") == cli.EXIT_OK
  params, _ = jcd.load(str(ck))
  assert {str(x.dtype) for x in jcd_leaves(params)} == {"bfloat16"}
  assert leftovers(tmp_path) == []


def jcd_leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def _module_pickle(tree: dict, storages: dict) -> bytes:
  """A TorchScript data.pkl: nested __torch__ objects whose leaves are tensors.
  storages: key -> (numel, size, stride) of each leaf tensor, by the leaf's dotted name."""
  g = lambda module, name: b"c" + module.encode() + b"\n" + name.encode() + b"\n"
  ints = lambda xs: b"(" + b"".join(b"I%d\n" % x for x in xs) + b"t"

  def tensor(key, numel, size, stride):
    storage = (b"(Vstorage\n" + g("torch", "FloatStorage") + b"V" + key.encode()
               + b"\nVcpu\nI%d\ntQ" % numel)
    return (g("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + b"I0\n" + ints(size)
            + ints(stride) + b"I00\n" + g("collections", "OrderedDict") + b")Rt" + b"R")

  def node(name, value, prefix):
    if isinstance(value, dict):
      body = b"".join(b"V" + k.encode() + b"\n" + node(k, v, f"{prefix}{k}.")
                      for k, v in value.items())
      return g("__torch__", f"M_{abs(hash(prefix)) % 10**8}") + b")\x81}(" + body + b"ub"
    numel, size, stride = storages[value]
    return tensor(value, numel, size, stride)
  return b"\x80\x02" + node("top", tree, "") + b"."


def _deflate_bomb_archive(path, numel):
  """A 2 MB decoder.pt whose `embed_image.f.w` is a deflated storage of `numel` zeros (and
  whose time-embedding table is real, so the converter gets as far as the tensors)."""
  table = (1024, 320)
  data_pkl = _module_pickle(
      {"embed_image": {"f": {"w": "0"}}, "embed_time": {"table": "1"}},
      {"0": (numel, (numel,), (1,)), "1": (table[0] * table[1], table, (table[1], 1))})
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("decoder/data.pkl", data_pkl)
    z.writestr("decoder/data/1", b"\0" * (table[0] * table[1] * 4))
    with z.open("decoder/data/0", "w", force_zip64=True) as f:
      block = b"\0" * (1 << 24)
      for _ in range(numel * 4 // len(block)):
        f.write(block)
    z.writestr("decoder/version", "3\n")
  return str(path)


@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory):
  path = _deflate_bomb_archive(tmp_path_factory.mktemp("bomb") / "decoder.pt", 1 << 29)
  assert os.path.getsize(path) < 4 << 20  # 2 GiB of zeros in ~2 MB
  return path


@pytest.mark.parametrize("config", ["released", "tiny"])
def test_deflate_bomb_is_refused_before_reading_with_bounded_memory(tmp_path, zip_bomb, config):
  run = run_cli("convert", zip_bomb, "-o", tmp_path / "ck", "--config", config)
  assert run.code == cli.EXIT_USAGE, run.err
  if config == "released":  # 2^29 elements fit in the released model, its shape does not
    assert ("conv_in.weight: the weights declare (536870912,), the model needs"
            " (320, 7, 3, 3)") in run.err, run.err[-2000:]
  else:  # more elements than the whole tiny model: refused when the pickle names it
    assert "claims 536,870,912 elements, more than the whole model" in run.err
  assert "Traceback" not in run.err
  print(f"{config}: peak RSS {run.peak_rss / GIB:.2f} GiB")
  assert run.peak_rss < GIB, run.peak_rss
  assert os.listdir(tmp_path) == []


def test_pickle_declaring_more_than_a_module_tree_is_refused(tmp_path):
  path = tmp_path / "decoder.pt"
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("decoder/data.pkl", b"\x80\x02" + b"N" * (65 << 20) + b".")  # 65 MB, deflated
  assert os.path.getsize(path) < 1 << 20
  assert _convert(path, "-o", tmp_path / "ck") == cli.EXIT_USAGE


def test_lying_safetensors_header_is_refused_with_bounded_memory(tmp_path):
  header = json.dumps({"conv_in.weight": {"dtype": "F32", "shape": [100000, 100000],
                                          "data_offsets": [0, 40_000_000_000]}}).encode()
  path = tmp_path / "liar.safetensors"
  path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 1024)
  run = run_cli("convert", path, "-o", tmp_path / "ck", "--config", "tiny")
  assert run.code == cli.EXIT_USAGE and "lie outside the 1024 data bytes" in run.err, run.err
  print(f"peak RSS {run.peak_rss / GIB:.2f} GiB")
  assert run.peak_rss < GIB
  assert not os.path.exists(tmp_path / "ck")


def test_wrong_shaped_tensor_is_named_with_both_shapes_before_any_tensor_is_read(
    tmp_path, tiny_file, capsys, monkeypatch):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(tiny_file)
  tensors["conv_in.weight"] = np.zeros((64, 7, 3, 3), np.float32)
  src = str(tmp_path / "wrong.safetensors")
  save_file(tensors, src)
  reads = []
  real_read = safetensors_file.read_tensor
  monkeypatch.setattr(safetensors_file, "read_tensor",
                      lambda f, entry: reads.append(entry) or real_read(f, entry))
  assert _convert(src, "-o", tmp_path / "ck") == cli.EXIT_USAGE
  err = capsys.readouterr().err
  assert "conv_in.weight: the weights declare (64, 7, 3, 3), the model needs (32, 7, 3, 3)" in err
  assert reads == []  # refused from the header alone
  assert not os.path.exists(tmp_path / "ck")


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_special_files_as_weights_are_refused_without_hanging(tmp_path, kind):
  path = tmp_path / "decoder.pt"
  if kind == "fifo":
    os.mkfifo(path)
  else:
    os.symlink("/dev/zero", path)
  run = run_cli("convert", path, "-o", tmp_path / "ck", timeout=120)
  assert run.code == cli.EXIT_USAGE
  assert ("a FIFO (named pipe)" if kind == "fifo" else "a character device") in run.err
  np.save(tmp_path / "x.npy", np.zeros((4, 2, 2), np.float32))
  run = run_cli("decode", tmp_path / "x.npy", "-o", tmp_path / "out", "--weights", path,
                timeout=120)
  assert run.code == cli.EXIT_USAGE and "not a regular file" in run.err
  assert not os.path.exists(tmp_path / "out")


def test_full_disk_during_convert_is_one_line_exit_3_and_leaves_nothing(tmp_path, tiny_file):
  # Every file Orbax writes hits the 20 kB limit as it would hit a full disk.
  run = run_cli("convert", tiny_file, "-o", tmp_path / "ck", "--config", "tiny",
                file_size_limit=20_000)
  assert run.code == cli.EXIT_ENVIRONMENT, run.err
  lines = run.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and "File too large" in lines[0], (
      len(lines), run.err[:3000])
  assert os.listdir(tmp_path) == []
  verbose = run_cli("convert", tiny_file, "-o", tmp_path / "ck", "--config", "tiny",
                    "--verbose", file_size_limit=20_000)
  assert verbose.code == cli.EXIT_ENVIRONMENT and len(verbose.err.splitlines()) > 10
  assert os.listdir(tmp_path) == []


def _convert_process(src, out):
  return subprocess.Popen(
      [sys.executable, "-m", "jaxconsdec.cli", "convert", src, "-o", out, "--config", "tiny"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _interrupt_when(proc, ready, timeout=120):
  deadline = time.monotonic() + timeout
  while not ready() and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.002)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=timeout)
  return proc.returncode, err


@pytest.mark.parametrize("moment", ["writing", 0.01, 0.03, 0.1, 0.3, "complete"])
def test_ctrl_c_during_convert_leaves_nothing_and_a_complete_checkpoint_exits_0(
    tmp_path, tiny_file, moment):
  """Ctrl-C as the temporary folder appears, at delays after it (during the Orbax writes,
  the fsync, the rename: the previous main exited killed by the signal, or printed a
  traceback, at some of them), and once the checkpoint exists."""
  out = tmp_path / "ck"
  temporary = lambda: [n for n in os.listdir(tmp_path) if ".tmp-" in n]
  if moment == "complete":
    ready = lambda: os.path.exists(out)
  else:
    delay = 0 if moment == "writing" else moment
    seen = []
    ready = lambda: (seen or (temporary() and seen.append(time.monotonic()))) and (
        time.monotonic() - seen[0] >= delay)
  code, err = _interrupt_when(_convert_process(tiny_file, out), ready)
  assert "Traceback" not in err and "Event loop" not in err, err[-3000:]
  assert temporary() == [], "a partial checkpoint was left beside OUT"
  if os.path.exists(out):
    assert code == cli.EXIT_OK, err
    jcd.load(str(out))
  else:
    assert code == cli.EXIT_INTERRUPTED, err
    assert "interrupted" in err
  if moment == "writing":  # stopped at the next clean point, well before the final rename
    assert code == cli.EXIT_INTERRUPTED and not os.path.exists(out)
  if moment == "complete":
    assert code == cli.EXIT_OK


def test_damaged_checkpoint_is_one_clear_error(tmp_path, tiny_file):
  ck = tmp_path / "ck"
  assert _convert(tiny_file, "-o", ck) == cli.EXIT_OK
  for root, _, names in os.walk(ck / "params"):
    for n in names:
      p = os.path.join(root, n)
      if os.path.getsize(p) > 1000:
        with open(p, "r+b") as f:
          f.truncate(os.path.getsize(p) // 2)
  np.save(tmp_path / "x.npy", np.zeros((4, 2, 2), np.float32))
  run = run_cli("decode", tmp_path / "x.npy", "-o", tmp_path / "out", "--weights", ck)
  assert run.code == cli.EXIT_USAGE
  lines = run.err.strip().splitlines()
  assert len(lines) == 1 and "truncated or corrupt" in lines[0], run.err[:3000]
  (ck / "jaxconsdec.json").unlink()
  os.mkfifo(ck / "jaxconsdec.json")  # metadata that would block a reader forever
  run = run_cli("decode", tmp_path / "x.npy", "-o", tmp_path / "out", "--weights", ck,
                timeout=120)
  assert run.code == cli.EXIT_USAGE and "not a regular file" in run.err
  assert not os.path.exists(tmp_path / "out")


CHECKPOINT_DEVICES = textwrap.dedent("""
    import jax, numpy as np, jaxconsdec as jcd, sys
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxconsdec import checkpoint
    from jaxconsdec.sharded import data_mesh, replicate
    out = sys.argv[1]
    cfg = jcd.TINY
    params = jcd.random_params(cfg, seed=0)
    n = jax.device_count()
    if sys.argv[2] == "save-replicated":      # as a job's ShardedDecoder holds them
      checkpoint.save(out, replicate(params, data_mesh()), cfg, {})
    elif sys.argv[2] == "save-on-last":       # converted while another device was the default
      checkpoint.save(out, jax.device_put(params, jax.devices()[-1]), cfg, {})
    elif sys.argv[2] == "load":
      loaded, _ = jcd.load(out)
      assert {d for x in jax.tree.leaves(loaded) for d in x.devices()} == {jax.devices()[0]}
      with jax.default_device(jax.devices()[-1]):
        loaded, _ = jcd.load(out)
      assert {d for x in jax.tree.leaves(loaded) for d in x.devices()} == {jax.devices()[-1]}
      np.testing.assert_array_equal(jax.tree.leaves(loaded)[0], jax.tree.leaves(params)[0])
      if n > 1:  # a sharding that cannot hold the params is the caller's error, said so
        bad = NamedSharding(Mesh(np.asarray(jax.devices()[:2]), ("x",)), P("x"))
        try:
          jcd.load(out, sharding=bad)
          raise SystemExit("no error")
        except jcd.CheckpointError as e:
          raise SystemExit(f"reported as a corrupt checkpoint: {e}")
        except ValueError as e:
          assert "cannot hold a param of shape" in str(e), e
    print("OK")
""")


def test_checkpoint_restores_onto_this_process_devices_not_the_saved_ones(tmp_path):
  replicated, moved = str(tmp_path / "replicated"), str(tmp_path / "moved")
  run_on_simulated_devices(CHECKPOINT_DEVICES, 4, replicated, "save-replicated")
  run_on_simulated_devices(CHECKPOINT_DEVICES, 2, moved, "save-on-last")
  for ck in (replicated, moved):
    run_on_simulated_devices(CHECKPOINT_DEVICES, 1, ck, "load")
    run_on_simulated_devices(CHECKPOINT_DEVICES, 3, ck, "load")
