"""Which latents a job finds, what it calls their outputs, and what it refuses (headers only)."""

import os

import numpy as np
from safetensors.numpy import save_file

from jaxconsdec.config import UNetConfig
from jaxconsdec.jobs.latent_files import LatentReader, list_latents


def _latents(*shape):
  return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def test_names_are_derived_from_inputs_and_directories_are_mirrored(tmp_path):
  (tmp_path / "in" / "sub").mkdir(parents=True)
  np.save(tmp_path / "in" / "one.npy", _latents(4, 2, 3))
  np.save(tmp_path / "in" / "sub" / "many.npy", _latents(11, 4, 2, 2))
  np.savez(tmp_path / "in" / "pack.npz", a=_latents(4, 2, 2), b=_latents(2, 4, 2, 2))
  save_file({"x": _latents(4, 3, 3)}, str(tmp_path / "in" / "st.safetensors"))
  (tmp_path / "in" / "notes.txt").write_text("ignored inside a directory")
  listing = list_latents([str(tmp_path / "in")], layout="NCHW")
  items, failures = listing.items, listing.failures
  assert failures == []
  names = [i.name for i in items]
  assert names == ["one", "pack-a", "pack-b-0", "pack-b-1", "st-x"] + [
      f"sub/many-{i:02d}" for i in range(11)]
  assert {i.name: i.hw for i in items}["one"] == (2, 3)
  reader = LatentReader()
  many = np.load(tmp_path / "in" / "sub" / "many.npy")
  assert np.array_equal(reader.read(items[-1]), many[10])


def test_bad_inputs_are_named_with_a_reason(tmp_path):
  d = tmp_path
  np.save(d / "rank2.npy", _latents(4, 4))
  np.save(d / "three.npy", _latents(3, 4, 4))
  np.save(d / "ints.npy", np.zeros((4, 2, 2), np.int64))
  (d / "empty.npy").write_bytes(b"")
  (d / "garbage.npy").write_bytes(b"not a numpy file at all")
  (d / "nolatents").mkdir()
  (d / "x.txt").write_text("hi")
  np.save(d / "odd.npy", _latents(4, 3, 3))
  inputs = [str(d / n) for n in ("rank2.npy", "three.npy", "ints.npy", "empty.npy",
                                 "garbage.npy", "nolatents", "x.txt", "missing.npy", "odd.npy")]
  five_levels = UNetConfig(block_out_channels=(8,) * 5, norm_num_groups=8)  # divides by 16
  listing = list_latents(inputs, layout="NCHW", config=five_levels)
  items, failures = listing.items, listing.failures
  assert items == []
  reasons = {os.path.basename(f.input): f.reason for f in failures}
  assert "rank 2" in reasons["rank2.npy"]
  assert "3 channels" in reasons["three.npy"]
  assert "dtype int64" in reasons["ints.npy"]
  assert reasons["empty.npy"] == "empty file"
  assert "unreadable" in reasons["garbage.npy"]
  assert "holds no .npy" in reasons["nolatents"]
  assert "not a latent file" in reasons["x.txt"]
  assert "no such file" in reasons["missing.npy"]
  assert "does not divide" in reasons["odd.npy"]


def test_layout_hint_and_name_clash(tmp_path):
  np.save(tmp_path / "hwc.npy", _latents(2, 2, 4))
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  np.save(tmp_path / "a" / "same.npy", _latents(4, 2, 2))
  np.save(tmp_path / "b" / "same.npy", _latents(4, 2, 2))
  listing = list_latents([str(tmp_path / "hwc.npy"), str(tmp_path / "a"),
                                  str(tmp_path / "b")], layout="NCHW")
  items, failures = listing.items, listing.failures
  assert [i.name for i in items] == ["same"]
  assert "(--layout NHWC)" in failures[0].reason
  assert "already taken" in failures[1].reason


def test_every_storage_order_and_container_reads_back_the_same_rows(tmp_path):
  batch = _latents(3, 4, 2, 5)
  np.save(tmp_path / "c.npy", batch)
  np.save(tmp_path / "f.npy", np.asfortranarray(batch))            # column-major on disk
  np.save(tmp_path / "one.npy", np.asfortranarray(batch[1]))
  np.savez_compressed(tmp_path / "z.npz", x=batch)                  # a deflated member
  save_file({"x": batch}, str(tmp_path / "s.safetensors"))
  listing = list_latents([str(tmp_path)], layout="NCHW")
  assert listing.failures == []
  reader = LatentReader()
  for item in listing.items:
    want = batch[1] if item.name == "one" else batch[item.row]
    np.testing.assert_array_equal(reader.read(item), want, err_msg=item.where)
  reader.close()
