"""Hostile and broken weight files: each refused with a clear message and no side effect."""

import json
import os
import struct
import zipfile

import numpy as np
import pytest

import jaxconsdec as jcd
from jaxconsdec import cli
pytest.importorskip("torch")  # compares against PyTorch; skipped without it
from reference import diffusers_unet
import weight_files


def _g(module, name):  # pickle GLOBAL opcode
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _tensor_pickle(offset=0, size=(2, 2), stride=(2, 1), numel=4, key="0"):
  ints = lambda xs: b"(" + b"".join(b"I%d\n" % x for x in xs) + b"t"
  storage = b"(Vstorage\n" + _g("torch", "FloatStorage") + b"V" + key.encode() + b"\nVcpu\nI%d\ntQ" % numel
  return (_g("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + b"I%d\n" % offset
          + ints(size) + ints(stride) + b"I00\n" + _g("collections", "OrderedDict") + b")R" + b"tR.")


def _call_pickle(module, name, arg):
  return _g(module, name) + b"(V" + arg.encode() + b"\ntR."


def _archive(path, data_pkl, storages=None):
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr("decoder/data.pkl", data_pkl)
    for key, blob in (storages if storages is not None else {"0": b"\0" * 16}).items():
      z.writestr(f"decoder/data/{key}", blob)
    z.writestr("decoder/version", "3\n")
  return str(path)


def _safetensors(path, header: dict, data: bytes):
  blob = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob + data)
  return str(path)


@pytest.fixture
def marker(tmp_path):
  return tmp_path / "PWNED"


def _corpus(tmp_path, marker):
  m = str(marker)
  unet = diffusers_unet(jcd.TINY, seed=50)
  good = str(tmp_path / "good.safetensors")
  weight_files.write_unet2d(good, unet)
  from safetensors.numpy import load_file, save_file
  sd = load_file(good)
  files = {
      "os.system": (_archive(tmp_path / "a.pt", _call_pickle("os", "system", f"touch {m}")),
                    "global os.system"),
      "posix.system": (_archive(tmp_path / "b.pt", _call_pickle("posix", "system", f"touch {m}")),
                       "global posix.system"),
      "builtins.eval": (_archive(tmp_path / "c.pt", _call_pickle(
          "builtins", "eval", f"open({m!r}, 'w')")), "global builtins.eval"),
      "builtins.exec": (_archive(tmp_path / "d.pt", _call_pickle(
          "builtins", "exec", f"open({m!r}, 'w')")), "global builtins.exec"),
      "subprocess": (_archive(tmp_path / "e.pt", _call_pickle("subprocess", "getoutput",
                                                               f"touch {m}")),
                     "global subprocess.getoutput"),
      "getattr chain": (_archive(tmp_path / "f.pt", _g("builtins", "getattr") + b"("
                                 + _g("builtins", "__import__") + b"Vos\n\x85R" + b"Vsystem\ntR."),
                        "global builtins.getattr"),
      "torch.load reduce": (_archive(tmp_path / "g.pt", _call_pickle("torch", "load", m)),
                            "global torch.load"),
      "offset past end": (_archive(tmp_path / "h.pt", _tensor_pickle(offset=3)),
                          "past the end of its storage"),
      "negative size": (_archive(tmp_path / "i.pt", _tensor_pickle(size=(-2, 2))), "negative"),
      "enormous size": (_archive(tmp_path / "j.pt", _tensor_pickle(size=(1 << 40, 1 << 40),
                                                                   numel=1 << 33)),
                        "more than the whole model"),
      "missing storage": (_archive(tmp_path / "k.pt", _tensor_pickle(key="7")),
                          "missing from the archive"),
      "short storage": (_archive(tmp_path / "l.pt", _tensor_pickle(), {"0": b"\0" * 8}),
                        "less than its 4 elements"),
      "truncated zip": (_truncated(tmp_path / "m.pt", unet, 0.5, torchscript=True),
                        "truncated"),
      "truncated safetensors": (_truncate(good, tmp_path / "n.safetensors", 0.6), "truncated"),
      "lying header": (_safetensors(tmp_path / "o.safetensors", {
          "conv_in.weight": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4000000]}},
          b"\0" * 64), "not a valid safetensors"),
      "wrong kind": (_write(tmp_path / "p.safetensors", b"\x89PNG\r\n\x1a\n" + b"\0" * 100),
                     "neither a TorchScript archive"),
      "empty file": (_write(tmp_path / "q.pt", b""), "empty"),
      "mixed layouts": (_save(save_file, {"conv_in.weight": sd["conv_in.weight"],
                                          "decoder_unet.conv_in.bias": sd["conv_in.bias"]},
                              tmp_path / "r.safetensors"), "mixes layouts"),
      "missing tensors": (_save(save_file, {k: v for k, v in sd.items() if "mid_block" not in k},
                                tmp_path / "s.safetensors"), "missing"),
      "extra tensors": (_save(save_file, {**sd, "down_blocks.0.resnets.9.conv1.weight":
                                          sd["conv_in.weight"]}, tmp_path / "t.safetensors"),
                        "unexpected"),
      "foreign safetensors": (_save(save_file, {"model.layers.0.weight": np.zeros(3, np.float32)},
                                    tmp_path / "u.safetensors"), "none of the Consistency Decoder"),
  }
  return good, files


def _write(path, data):
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


def _save(save_file, tensors, path):
  save_file(tensors, str(path))
  return str(path)


def _truncate(src, dst, fraction):
  data = open(src, "rb").read()
  return _write(dst, data[:int(len(data) * fraction)])


def _truncated(dst, unet, fraction, torchscript):
  full = str(dst) + ".full"
  weight_files.write_torchscript(full, unet, jcd.TINY, "parameter")
  out = _truncate(full, dst, fraction)
  os.unlink(full)
  return out


def test_hostile_and_broken_files_are_refused_without_side_effects(tmp_path, marker, capsys):
  good, files = _corpus(tmp_path, marker)
  assert len(files) >= 10
  for name, (path, message) in files.items():
    out = tmp_path / f"out-{name.replace(' ', '_').replace('.', '_')}"
    before = set(os.listdir(tmp_path))
    code = cli.main(["convert", path, "-o", str(out), "--config", "tiny"])
    err = capsys.readouterr().err
    assert code == 2, (name, err)
    assert message in err, (name, message, err)
    assert not marker.exists(), f"{name}: code ran"
    assert not out.exists(), name
    assert set(os.listdir(tmp_path)) == before, f"{name}: left files behind"


def test_shape_that_does_not_match_the_config(tmp_path, capsys):
  unet = diffusers_unet(jcd.TINY, seed=51)
  src = str(tmp_path / "unet.safetensors")
  weight_files.write_unet2d(src, unet)
  assert cli.main(["convert", src, "-o", str(tmp_path / "ck")]) == 2  # released config
  err = capsys.readouterr().err
  assert "shape mismatch" in err and "conv_in.weight" in err
  assert not (tmp_path / "ck").exists()


def test_checkpoint_that_is_corrupt_or_foreign(tmp_path):
  unet = diffusers_unet(jcd.TINY, seed=52)
  src = str(tmp_path / "unet.safetensors")
  weight_files.write_unet2d(src, unet)
  assert cli.main(["convert", src, "-o", str(tmp_path / "ck"), "--config", "tiny"]) == 0
  with pytest.raises(jcd.CheckpointError, match="not a jaxconsdec checkpoint"):
    jcd.load(str(tmp_path))
  # A config that no longer matches the stored params.
  meta_path = tmp_path / "ck" / "jaxconsdec.json"
  meta = json.loads(meta_path.read_text())
  meta["decoder"]["config"]["layers_per_block"] = 3
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(jcd.CheckpointError, match="do not match"):
    jcd.load(str(tmp_path / "ck"))
  meta["decoder"]["config"]["layers_per_block"] = 2
  meta_path.write_text(json.dumps(meta))
  jcd.load(str(tmp_path / "ck"))
  # Truncate every data file of the params.
  for root, _, names in os.walk(tmp_path / "ck" / "params"):
    for n in names:
      p = os.path.join(root, n)
      if os.path.getsize(p) > 1000:
        with open(p, "r+b") as f:
          f.truncate(os.path.getsize(p) // 2)
  with pytest.raises(jcd.CheckpointError, match="truncated or corrupt"):
    jcd.load(str(tmp_path / "ck"))
