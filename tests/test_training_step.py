"""The training step: two steps with the state sharded over 2 and 8 devices and over 2
processes equal the steps on 1 device; the first state takes the weights only when they are donated;
the latent statistics merge across processes."""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jaxconsdec as jcd
from jaxconsdec.training import latent_stats
from simulated_devices import simulated_devices_process
from small_models import SMALLEST

# Two optimiser steps of the decoder whose config is argv[3] (the tests' smallest) on 8 fixed
# 32x32 crops, from any device count, with the state laid out as argv[2] says; the process
# that leads writes params, Adam state and EMA to argv[1]. argv[4] "dropout": with dropout
# (ResBlocks left to XLA's partitioner); "blocks <remat>": no dropout, remat "on" (sharded,
# each ResBlock gathers its own params: models/sharded_blocks.py) or "off".
ONE_STEP = textwrap.dedent("""
    import sys, jax, numpy as np, jaxconsdec as jcd
    from jaxconsdec.training.step import Optimization, TrainStep, whole_copy
    {setup}
    variant, *remat = sys.argv[4].split()
    cfg = jcd.UNetConfig.from_json(sys.argv[3]).replace(dropout=0.1 if variant == "dropout" else 0)
    params = jcd.random_params(cfg, seed=1)
    vae = jcd.random_params(jcd.TINY_VAE, seed=2, halves=("encoder",))
    pixels = np.random.default_rng(3).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    opt = Optimization(lr=1e-4, warmup_steps=1, ema_decay=0.5)
    step = TrainStep(cfg, jcd.TINY_VAE, opt, seed=7, deltas=(64, 16), state_layout=sys.argv[2],
                     remat=remat[0] if remat else "auto")
    assert (step.block_layout is not None) == (remat == ["on"] and sys.argv[2] == "sharded"
                                                  and jax.device_count() > 1)
    state = step.first_state(params, donate=True)
    assert all(x.is_deleted() for x in jax.tree.leaves(params))  # however they were laid out
    kernel = state["opt_state"][1][0].mu["conv_in"]["kernel"]   # Adam's first moment
    shard = kernel.addressable_shards[0].data.size
    if sys.argv[2] == "sharded" and jax.device_count() > 1:  # each device holds its part only
      assert shard * jax.device_count() == kernel.size, (shard, kernel.shape)
    else:
      assert shard == kernel.size
    per = 8 // jax.process_count()
    mine = pixels[jax.process_index() * per:(jax.process_index() + 1) * per]
    old = state
    state, metrics = step(state, step.replicate(vae), mine, 40, 16)
    assert kernel.is_deleted() and old["ema"]["conv_in"]["kernel"].is_deleted()  # donated
    state, metrics = step(state, step.replicate(vae), mine, 48, 64)
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(whole_copy(state)))[0]
    if jax.process_index() == 0:
      np.savez(sys.argv[1], **{{jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}})
    print("OK", jax.device_count(), float(metrics["loss"].addressable_data(0)))
""")


def _load(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _assert_close(a, b, rtol=1e-6):
  """Params, Adam state and EMA each agree to `rtol` relative (norm of the difference over
  the norm, over the whole tree: float32 sums in another order move single zero-initialised
  biases by more, relative to their own tiny norm)."""
  assert a.keys() == b.keys()
  for part in ("['params']", "['opt_state']", "['ema']"):
    names = [k for k in a if k.startswith(part)]
    diff = np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in names))
    norm = np.sqrt(sum(np.sum(b[k].astype(np.float64) ** 2) for k in names))
    print(part, "relative difference", diff / norm)
    assert diff <= rtol * norm, (part, diff / norm)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_step_results(tmp_path_factory):
  """Every run at once (each mostly compiles, on one core). With dropout: the state
  replicated on 1 device (the reference) and sharded on 2 devices. Without, the ResBlocks
  rematerialised and each gathering its own params: sharded on 8 devices and on 2 processes,
  against 1 device, replicated, without remat. A replicated state on many devices is the
  sharded program with whole leaves; the command tests run it."""
  folder = tmp_path_factory.mktemp("steps")
  runs = {}  # (variant, layout, devices) -> ([processes], path)
  for variant, layout, devices in (("dropout", "replicated", 1), ("dropout", "sharded", 2),
                                   ("blocks off", "replicated", 1), ("blocks on", "sharded", 8)):
    path = str(folder / f"{variant}-{layout}{devices}.npz")
    proc = simulated_devices_process(ONE_STEP.format(setup=""), devices, path, layout,
                                     SMALLEST.to_json(), variant)
    runs[variant, layout, devices] = ([proc], path)
  # Two processes with one CPU device each, through jax.distributed (gloo collectives).
  port = _free_port()
  setup = ("jax.config.update('jax_cpu_collectives_implementation', 'gloo'); "
           f"jax.distributed.initialize('127.0.0.1:{port}', 2, int(sys.argv[5]))")
  path = str(folder / "blocks-sharded-p2.npz")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  runs["blocks on", "sharded", "2 processes"] = ([subprocess.Popen(
      [sys.executable, "-c", ONE_STEP.format(setup=setup), path, "sharded", SMALLEST.to_json(),
       "blocks on", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)], path)
  results = {}
  for name, (procs, path) in runs.items():
    for p in procs:
      out, err = p.communicate(timeout=900)
      assert p.returncode == 0 and "OK" in out, (name, err[-3000:])
    results[name] = _load(path)
  return results


@pytest.mark.parametrize("variant,layout,devices", [
    ("dropout", "sharded", 2), ("blocks on", "sharded", 8),
    ("blocks on", "sharded", "2 processes")])
def test_a_step_agrees_on_1_2_and_8_devices_and_2_processes(one_step_results, variant, layout,
                                                           devices):
  base = one_step_results[variant.replace(" on", " off"), "replicated", 1]
  assert any("ema" in k for k in base) and any("opt_state" in k for k in base)
  assert int(base["['step']"]) == 2
  _assert_close(one_step_results[variant, layout, devices], base)
  # ...and the step did something: params moved from their initial values.
  init = jcd.random_params(SMALLEST, seed=1)
  assert not np.allclose(base["['params']['conv_in']['kernel']"], init["conv_in"]["kernel"])


def test_the_first_state_takes_the_weights_arrays_only_when_donated():
  import jax
  from jaxconsdec.training.step import Optimization, TrainStep
  params = jcd.random_params(jcd.TINY, seed=1)
  step = TrainStep(jcd.TINY, jcd.TINY_VAE, Optimization(), seed=0, devices=jax.devices()[:1])
  kept = jax.device_get(step.first_state(params))
  assert not any(x.is_deleted() for x in jax.tree.leaves(params))
  taken = jax.device_get(step.first_state(params, donate=True))
  assert all(x.is_deleted() for x in jax.tree.leaves(params))
  for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(taken)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(taken["ema"]["conv_in"]["kernel"],
                                taken["params"]["conv_in"]["kernel"])


def test_remat_is_on_by_default_at_the_released_widths_only():
  """Where the activations a 256x256 step keeps do not fit beside the state in 24 GB
  (docs/training.md, Memory); nothing is compiled here."""
  import jax
  from jaxconsdec.training.step import Optimization, TrainStep
  one = jax.devices()[:1]
  made = lambda cfg, **kw: TrainStep(cfg, jcd.TINY_VAE, Optimization(), seed=0, devices=one,
                                     **kw)
  assert made(jcd.CONSISTENCY_DECODER).remat and not made(jcd.TINY).remat
  assert made(jcd.TINY, remat="on").remat and not made(jcd.CONSISTENCY_DECODER,
                                                        remat="off").remat
  with pytest.raises(ValueError, match="remat must be one of"):
    made(jcd.TINY, remat=True)


def test_latent_statistics_merge_as_one_pass():
  rng = np.random.default_rng(0)
  parts = [rng.standard_normal((n, 3, 3, 4)) * [1, 2, 3, 4] + [5, 6, 7, 8] for n in (3, 1, 7)]
  total = latent_stats.Welford(4)
  for part in parts:  # as three processes would, each then merged
    one = latent_stats.Welford(4)
    one.add(part)
    total.merge(one.n, one.mean, one.m2)
  every = np.concatenate(parts).reshape(-1, 4)
  np.testing.assert_allclose(total.mean, every.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(total.std, every.std(axis=0, ddof=1), rtol=1e-12)


# A sharded leaf copied whole (as evaluation and export copy the EMA) leaves nothing behind
# once the copy is dropped: glibc's count of bytes in use returns to where it was.
WHOLE_COPY = textwrap.dedent("""
    import gc, jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from jaxconsdec.host_memory import heap_bytes
    from jaxconsdec.training.step import whole_copy

    def in_use():
      gc.collect()
      return heap_bytes()[0]

    values = np.arange(2048 * 8192, dtype=np.float32).reshape(2048, 8192)  # 64 MiB
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    ema = jax.device_put(values, NamedSharding(mesh, PartitionSpec("data")))
    del values
    ema.block_until_ready()
    before = in_use()
    copy = whole_copy({"w": ema})["w"]
    assert copy.devices() == {jax.devices()[0]}
    expected = np.arange(copy.size, dtype=np.float32).reshape(copy.shape)
    assert np.array_equal(np.asarray(copy), expected)
    del copy, expected
    grown = in_use() - before
    print("OK", grown)
    assert grown < 8 << 20, f"{grown / 2 ** 20:.0f} MiB still held after the copy was dropped"
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2")
def test_a_whole_copy_of_a_sharded_leaf_leaves_no_host_copy_behind():
  from simulated_devices import run_on_simulated_devices
  run_on_simulated_devices(WHOLE_COPY, 2)
