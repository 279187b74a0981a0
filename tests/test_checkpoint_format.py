"""Checkpoints are written in Orbax's aggregated OCDBT store, so a model is a handful of
files; checkpoints of the plain store that earlier versions wrote still load."""

import os

import jax
import numpy as np

import jaxconsdec as jcd
from jaxconsdec import checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
# Written by jaxconsdec at commit 7c92566 (plain Orbax store, one folder of files per array):
# the decoder of FIXTURE_CONFIG with random_params(seed=3).
FIXTURE = os.path.join(HERE, "fixtures", "format2_plain")
FIXTURE_CONFIG = jcd.UNetConfig(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4)


def _files(folder):
  return [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]


def _assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_checkpoint_of_the_earlier_plain_store_still_loads():
  assert not any(f.endswith("manifest.ocdbt") for f in _files(FIXTURE))  # really the old store
  params, config = jcd.load(FIXTURE)
  assert config == FIXTURE_CONFIG
  _assert_same_tree(params, jcd.random_params(FIXTURE_CONFIG, seed=3))


def test_a_new_checkpoint_is_a_handful_of_files_and_loads_back(tmp_path):
  params = jcd.random_params(jcd.TINY, seed=1)
  vae = jcd.random_params(jcd.TINY_VAE, seed=2, halves=("encoder",))
  out = str(tmp_path / "ck")
  checkpoint.save(out, params, jcd.TINY, {}, vae_params=vae, vae_config=jcd.TINY_VAE,
                  vae_halves=("encoder",))
  files = _files(out)
  assert any(f.endswith("manifest.ocdbt") for f in files)
  # 443 arrays; how many small data files the store writes depends on how its concurrent
  # writes interleave (32 to 43 seen): far from the plain store's 3 files per array.
  assert len(files) <= 100, sorted(os.path.relpath(f, out) for f in files)
  loaded = jcd.load(out)
  _assert_same_tree(loaded.params, params)
  _assert_same_tree(loaded.vae_params, vae)


def test_the_demo_model_is_a_handful_of_files():
  files = _files(os.path.join(HERE, "..", "samples", "demo", "model"))
  assert len(files) <= 40, len(files)


def test_a_checkpoint_loads_through_a_relative_path(tmp_path, monkeypatch):
  checkpoint.save(str(tmp_path / "ck"), jcd.random_params(FIXTURE_CONFIG, seed=3),
                  FIXTURE_CONFIG, {})
  monkeypatch.chdir(tmp_path)
  params, _ = jcd.load("ck")
  _assert_same_tree(params, jcd.random_params(FIXTURE_CONFIG, seed=3))
