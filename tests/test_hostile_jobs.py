"""Hostile and broken latent files given to `jaxconsdec decode`: each is a listed failure with
a clear reason, the good file beside it is still decoded, nothing is written outside OUT_DIR,
nothing of the user's is touched, no temporary file is left, and memory stays bounded."""

import json
import os
import struct

import numpy as np
import pytest

from jaxconsdec import cli
from jaxconsdec.files import TMP_PREFIX
from jaxconsdec.config import SD_SCALING_FACTOR as LATENT_SCALE
from hostile import (deflate_bomb_npz, leftovers, npy_header_only, npz_with_names, run_cli,
                     snapshot)

GIB = 1 << 30


def _latent(*shape, seed=0):
  return (np.random.default_rng(seed).standard_normal(shape) / LATENT_SCALE).astype(np.float32)


def _safetensors(path, arrays: dict, header_patch=None):
  """A safetensors file with exactly these names (any string), written by hand."""
  header, blobs, offset = {}, [], 0
  for name, array in arrays.items():
    data = np.ascontiguousarray(array, np.float32).tobytes()
    header[name] = {"dtype": "F32", "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  if header_patch:
    header_patch(header)
  text = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
  return str(path)


def _fortran_batch_in_npz(path):
  np.savez(path, x=np.asfortranarray(_latent(2, 4, 2, 2)))
  return str(path)


def _fifo(path):
  os.mkfifo(path)
  return str(path)


def _link(target):
  def make(path):
    os.symlink(target, path)
    return str(path)
  return make


def _lying_offsets(header):
  header["x"]["data_offsets"] = [0, 1 << 40]


# name: (file name, how to make it, a phrase of the listed reason)
CORPUS = {
    "npz name climbing out of OUT_DIR": (
        "climb.npz", lambda p: npz_with_names(p, {"/../../outside/x": _latent(4, 2, 2)}),
        "cannot be part of an output name"),
    "npz name with a slash (stray folders)": (
        "slash.npz", lambda p: npz_with_names(p, {"a/b": _latent(4, 2, 2)}), "contains '/'"),
    "npz name '..'": ("dots.npz", lambda p: npz_with_names(p, {"..": _latent(4, 2, 2)}),
                      "refers to a folder"),
    "safetensors name with a backslash": (
        "back.safetensors", lambda p: _safetensors(p, {"a\\b": _latent(4, 2, 2)}),
        "contains '\\\\'"),
    "safetensors name with a NUL": (
        "nul.safetensors", lambda p: _safetensors(p, {"a\x00b": _latent(4, 2, 2)}),
        "contains '\\x00'"),
    "safetensors absolute name": (
        "abs.safetensors", lambda p: _safetensors(p, {"/tmp/owned": _latent(4, 2, 2)}),
        "contains '/'"),
    "npy header declaring 160 GB in 384 bytes": (
        "liar.npy", lambda p: npy_header_only(p, (1, 4, 100000, 100000), 256),
        "declares shape (1, 4, 100000, 100000)"),
    "npy header declaring a 16384^2 image, short file": (
        "short.npy", lambda p: npy_header_only(p, (1, 4, 2048, 2048), 1000),
        "only 1,000 bytes follow it"),
    "npz member shorter than its header": (
        "cut.npz", lambda p: _npz_cut(p), "bytes follow it"),
    "safetensors offsets past the end": (
        "off.safetensors", lambda p: _safetensors(p, {"x": _latent(4, 2, 2)}, _lying_offsets),
        "lie outside"),
    "image above the size limit": (
        "huge.npy", lambda p: np.save(p, _latent(4, 264, 264)) or str(p),
        "above the limit of 4.2 (--max-pixels"),
    "Fortran-ordered batch in an .npz": ("fortran.npz", _fortran_batch_in_npz,
                                         "Fortran-ordered"),
    "FIFO named .npy (would hang)": ("fifo.npy", _fifo, "a FIFO (named pipe), not a regular file"),
    "/dev/zero linked as .npz (endless)": ("zero.npz", _link("/dev/zero"),
                                          "a character device, not a regular file"),
    "/dev/urandom linked as .npy": ("rand.npy", _link("/dev/urandom"),
                                    "a character device, not a regular file"),
    "a folder named .npy": ("dir.npy", lambda p: os.mkdir(p) or str(p), "holds no"),
    "name reserved for temporary files": (
        TMP_PREFIX + "x.npy", lambda p: np.save(p, _latent(4, 2, 2)) or str(p),
        "reserved for the job's temporary files"),
}


def _npz_cut(path):
  """An .npz whose member's npy header declares more rows than the member holds."""
  import io
  import zipfile
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buffer, {"descr": "<f4", "fortran_order": False, "shape": (64, 4, 8, 8)})
  buffer.write(_latent(4, 8, 8).tobytes())
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("x.npy", buffer.getvalue())
  return str(path)


def _decode(*args):
  return cli.main(["decode", *map(str, args), "--random-weights", "tiny", "--no-compile-cache",
                   "--no-progress"])


@pytest.mark.parametrize("case", list(CORPUS))
def test_hostile_latent_file_is_a_listed_failure_and_the_job_goes_on(tmp_path, case, capsys):
  name, make, reason = CORPUS[case]
  (tmp_path / "in").mkdir()
  (tmp_path / "outside").mkdir()
  (tmp_path / "outside" / "mine.txt").write_text("the user's file")
  np.save(tmp_path / "in" / "good.npy", _latent(4, 2, 2))
  bad = make(tmp_path / "in" / name)
  out = tmp_path / "out"
  before = snapshot(tmp_path)
  # Explicit paths for the special files: a folder walk would find them just the same.
  assert _decode(tmp_path / "in" / "good.npy", bad, "-o", out) == cli.EXIT_INPUTS_FAILED
  err = capsys.readouterr().err
  assert snapshot(tmp_path, skip=[out]) == before, "something outside OUT_DIR changed"
  assert leftovers(tmp_path, ignore=[bad]) == []
  failures = json.load(open(out / "failures.json"))["failures"]
  assert len(failures) == 1 and failures[0]["input"].startswith(bad), failures
  assert reason in failures[0]["reason"], failures[0]["reason"]
  assert reason in err
  assert sorted(os.listdir(out)) == ["failures.json", "good.png", "jaxconsdec-job.json"]


def test_the_same_corpus_in_one_folder_walk(tmp_path, capsys):
  """A folder holding all of it at once: one run, every bad file listed, the good decoded."""
  (tmp_path / "in").mkdir()
  np.save(tmp_path / "in" / "good.npy", _latent(4, 2, 2))
  made = [make(tmp_path / "in" / name) for name, make, _ in CORPUS.values()
          if not name.startswith(".") and name != "dir.npy"]  # hidden; an empty subfolder
  assert _decode(tmp_path / "in", "-o", tmp_path / "out") == cli.EXIT_INPUTS_FAILED
  capsys.readouterr()
  listed = {f["input"].split("[")[0] for f in
            json.load(open(tmp_path / "out" / "failures.json"))["failures"]}
  assert listed == set(made)
  assert os.path.exists(tmp_path / "out" / "good.png")


def test_symlinked_subfolder_of_out_dir_cannot_lead_outside(tmp_path, capsys):
  (tmp_path / "in" / "sub").mkdir(parents=True)
  np.save(tmp_path / "in" / "sub" / "x.npy", _latent(4, 2, 2))
  np.save(tmp_path / "in" / "top.npy", _latent(4, 2, 2, seed=1))
  (tmp_path / "elsewhere").mkdir()
  out = tmp_path / "out"
  out.mkdir()
  os.symlink(tmp_path / "elsewhere", out / "sub")  # planted, or left by another tool
  assert _decode(tmp_path / "in", "-o", out) == cli.EXIT_INPUTS_FAILED
  capsys.readouterr()
  assert os.listdir(tmp_path / "elsewhere") == []
  [failure] = json.load(open(out / "failures.json"))["failures"]
  assert failure["input"].endswith("x.npy") and "leads outside" in failure["reason"]
  assert os.path.exists(out / "top.png")


def test_out_dir_inside_an_input_folder_is_not_read_back_and_hidden_files_are_counted(
    tmp_path, capsys):
  inputs = tmp_path / "in"
  (inputs / ".cache").mkdir(parents=True)
  np.save(inputs / "a.npy", _latent(2, 4, 2, 2))
  np.save(inputs / ".hidden.npy", _latent(4, 2, 2))
  np.save(inputs / ".cache" / "b.npy", _latent(4, 2, 2))
  out = inputs / "decoded"
  for _ in range(2):  # the second run would read the first run's .npy outputs as latents
    assert _decode(inputs, "-o", out, "--format", "npy") == cli.EXIT_OK
    err = capsys.readouterr().err
    assert "2 latents" in err and "2 hidden files or folders skipped" in err, err
  assert sorted(os.listdir(out)) == ["a-0.npy", "a-1.npy", "jaxconsdec-job.json"]
  assert _decode(inputs, "-o", inputs) == cli.EXIT_INPUTS_FAILED  # OUT_DIR is the input
  assert "this is the job's own output folder" in capsys.readouterr().err


def test_size_limit_is_checked_before_compiling_and_can_be_changed(tmp_path, capsys):
  np.save(tmp_path / "wide.npy", _latent(4, 4, 6))  # a 32x48 image: 1536 pixels
  out = tmp_path / "out"
  assert _decode(tmp_path / "wide.npy", "-o", out, "--max-pixels", "1024") == 1
  assert "above the limit" in capsys.readouterr().err
  assert _decode(tmp_path / "wide.npy", "-o", out, "--max-pixels", "1536") == 0
  capsys.readouterr()
  assert os.path.exists(out / "wide.png")


def test_lying_headers_and_deflate_bombs_keep_memory_bounded(tmp_path):
  """Measured in a child process, as a user runs it: the 384-byte liar, a short 2048^2
  latent, and a 1 MB .npz inflating to 1 GiB of zeros are listed; the job finishes."""
  (tmp_path / "in").mkdir()
  np.save(tmp_path / "in" / "good.npy", _latent(4, 2, 2))
  npy_header_only(tmp_path / "in" / "liar.npy", (1, 4, 100000, 100000), 256)
  assert os.path.getsize(tmp_path / "in" / "liar.npy") == 384
  npy_header_only(tmp_path / "in" / "short.npy", (1, 4, 2048, 2048), 4096)
  deflate_bomb_npz(tmp_path / "in" / "bomb.npz", "x", (1, 4, 8192, 8192))
  assert os.path.getsize(tmp_path / "in" / "bomb.npz") < 4 << 20
  run = run_cli("decode", tmp_path / "in", "-o", tmp_path / "out", "--random-weights", "tiny",
                "--no-compile-cache", "--no-progress")
  assert run.code == cli.EXIT_INPUTS_FAILED, run.err
  assert "Traceback" not in run.err
  failures = {os.path.basename(f["input"]).split("[")[0]: f["reason"] for f in
              json.load(open(tmp_path / "out" / "failures.json"))["failures"]}
  assert set(failures) == {"liar.npy", "short.npy", "bomb.npz"}, failures
  assert "above the limit" in failures["bomb.npz"]
  assert os.path.exists(tmp_path / "out" / "good.png")
  print(f"peak RSS {run.peak_rss / GIB:.2f} GiB")
  assert run.peak_rss < GIB, run.peak_rss


def _poisoned(tree, leaf_path):
  """A copy of a param tree whose leaf at `leaf_path` is NaN: every output is then NaN."""
  import jax
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x * np.nan if jax.tree_util.keystr(p) == leaf_path else x, tree)


def test_a_finite_input_with_broken_weights_is_a_listed_failure_not_a_black_image(
    tmp_path, capsys):
  import jaxconsdec as jcd
  from PIL import Image
  from jaxconsdec import checkpoint
  params = _poisoned(jcd.random_params(jcd.TINY, seed=0), "['conv_out']['bias']")
  checkpoint.save(str(tmp_path / "nan-decoder"), params, jcd.TINY, {})
  vae = _poisoned(jcd.random_params(jcd.TINY_VAE, seed=0, halves=("encoder",)),
                  "['quant_conv']['bias']")
  checkpoint.save(str(tmp_path / "nan-vae"), None, None, {}, vae_params=vae,
                  vae_config=jcd.TINY_VAE, vae_halves=("encoder",))
  np.save(tmp_path / "x.npy", _latent(4, 2, 2))
  Image.new("RGB", (16, 16), "white").save(tmp_path / "x.png")
  for command, src, flags, out in (
      ("decode", "x.npy", ["--weights", str(tmp_path / "nan-decoder")], tmp_path / "dec"),
      ("encode", "x.png", ["--vae", str(tmp_path / "nan-vae")], tmp_path / "enc")):
    code = cli.main([command, str(tmp_path / src), "-o", str(out), *flags,
                     "--no-compile-cache", "--no-progress"])
    assert code == cli.EXIT_INPUTS_FAILED, command
    failures = json.load(open(out / "failures.json"))["failures"]
    assert len(failures) == 1 and "NaN or inf" in failures[0]["reason"], failures
    assert "broken" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["failures.json", "jaxconsdec-job.json"], command


@pytest.mark.parametrize("command", ["decode", "encode", "eval"])
def test_names_that_cannot_name_outputs_are_listed_and_the_job_completes(tmp_path, command,
                                                                         capsys):
  """A name that is not UTF-8 used to crash the key hash (exit 4, nothing written); a newline
  split a row of eval's report.md and named a grid file."""
  import jaxconsdec as jcd
  from PIL import Image
  from jaxconsdec import checkpoint
  inputs = tmp_path / "in"
  inputs.mkdir()
  ext = ".npy" if command == "decode" else ".png"
  for name in (b"good", b"bad\xff", b"new\nline", b"tab\there"):
    path = os.fsdecode(os.path.join(os.fsencode(inputs), name + ext.encode()))
    if command == "decode":
      np.save(path, _latent(4, 2, 2))
    else:
      Image.new("RGB", (16, 16), "white").save(path, format="PNG")
  checkpoint.save(str(tmp_path / "model"), jcd.random_params(jcd.TINY, 0), jcd.TINY, {},
                  vae_params=jcd.random_params(jcd.TINY_VAE, 0, halves=("encoder",)),
                  vae_config=jcd.TINY_VAE, vae_halves=("encoder",))
  out = tmp_path / "out"
  flags = {"decode": ["--weights"], "encode": ["--vae"], "eval": ["--weights"]}[command]
  extra = [] if command == "eval" else ["--no-compile-cache", "--no-progress"]
  code = cli.main([command, str(inputs), "-o", str(out), *flags, str(tmp_path / "model"),
                   *extra])
  captured = capsys.readouterr()
  err = captured.err + captured.out  # eval lists its failures in the report it prints
  assert code == cli.EXIT_INPUTS_FAILED, err[-3000:]
  assert "not valid UTF-8" in err and "contains '\\n'" in err and "contains '\\t'" in err, err
  if command == "eval":
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["images"]] == ["good"]
    assert len(report["failures"]) == 3
    assert os.listdir(out / "grids") == ["good.png"]
  else:
    text = (out / "failures.json").read_text()
    failures = json.loads(text)["failures"]
    assert len(failures) == 3 and all("rename the file" in f["reason"] for f in failures)
    written = "good.png" if command == "decode" else "good.npy"
    assert sorted(os.listdir(out)) == ["failures.json", written, "jaxconsdec-job.json"]
  assert leftovers(tmp_path) == []
