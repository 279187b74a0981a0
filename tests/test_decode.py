"""Full decode against diffusers and the original loop; bf16; batch invariance; jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
pytest.importorskip("torch")  # compares against PyTorch; skipped without it
import torch
from diffusers.schedulers import scheduling_consistency_decoder as sched_module

import jaxconsdec as jcd
from jaxconsdec import sampler
from reference import (diffusers_unet, diffusers_vae, diffusers_vae_decode, original_decode,
                       rel_err, state_dict_numpy)

DECODE_TOL = 1e-4
# bf16 compute vs the fp32 reference. bf16 keeps 8 significant bits: each conv output is
# rounded to a relative 2^-9 ~ 2e-3, and the rounding of ~15 ResBlocks of the tiny model (40
# in the released one) adds up roughly as a random walk, sqrt(15) x 2e-3 ~ 8e-3 per UNet
# call, amplified at most ~2x by the second step. 3e-2 is that with a 2x margin. A bound this
# loose cannot see a wrong float32 part or a dtype leak into the schedule: those are checked
# in the lowered program (test_precision.py) and against the float64 schedule below
# (test_reduced_precision_keeps_the_schedule_arithmetic_in_float32).
BF16_TOL = 3e-2


def _setup(seed, batch=2, h=4, w=6, cfg=jcd.TINY):
  rng = np.random.default_rng(seed)
  latents = (rng.standard_normal((batch, 4, h, w)) / 0.18215).astype(np.float32)
  return cfg, latents, rng


def _noise(rng, steps, shape):
  return [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)]


def test_decode_matches_diffusers_consistency_decoder_vae(monkeypatch):
  cfg, latents, rng = _setup(seed=21)
  vae = diffusers_vae(cfg, seed=21)
  params = jcd.params_from_torch(state_dict_numpy(vae.decoder_unet), cfg)
  noises = _noise(rng, 2, (2, 3, 32, 48))
  want = diffusers_vae_decode(vae, latents, noises, monkeypatch)
  got = jcd.decode(params, latents, 0, config=cfg, clamp=False, noise=noises)
  err = rel_err(got, want)
  print(f"\ndecode vs diffusers ConsistencyDecoderVAE: rel err {err:.3e}")
  assert err <= DECODE_TOL
  # The random model overshoots [-1, 1], so clamp=False really is tested as unclamped.
  assert float(jnp.abs(got).max()) > 1.0


@pytest.mark.parametrize("schedule", [(1.0,), (1.0, 0.5), (1.0, 0.75, 0.5, 0.25)])
def test_decode_matches_original_loop(schedule):
  cfg, latents, rng = _setup(seed=22 + len(schedule))
  ref = diffusers_unet(cfg, seed=22)
  params = jcd.params_from_torch(state_dict_numpy(ref), cfg)
  noises = _noise(rng, len(schedule), (2, 3, 32, 48))
  want = original_decode(ref, torch.from_numpy(latents), schedule,
                         [torch.from_numpy(n) for n in noises], clamp=True)
  got = jcd.decode(params, latents, 0, config=cfg, schedule=schedule, noise=noises)
  err = rel_err(got, want)
  print(f"\ndecode vs original loop {schedule}: rel err {err:.3e}")
  assert err <= DECODE_TOL
  assert float(jnp.abs(got).max()) <= 1.0


def test_nhwc_layout_is_the_same_decode():
  cfg, latents, rng = _setup(seed=30)
  params = jcd.params_from_torch(state_dict_numpy(diffusers_unet(cfg, seed=30)), cfg)
  nchw = jcd.decode(params, latents, 7, config=cfg)
  nhwc = jcd.decode(params, latents.transpose(0, 2, 3, 1), 7, config=cfg, layout="NHWC")
  np.testing.assert_allclose(nhwc, np.asarray(nchw).transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype,param_dtype,file_dtype", [
    ("bfloat16", "float32", None),        # bf16 compute, fp32 params
    ("bfloat16", "bfloat16", None),       # everything the UNet holds in bf16
    ("bfloat16", "float16", "float16"),   # fp16 params exactly as an fp16 weight file holds
    ("float16", "float16", "float16"),    # fp16 compute too
])
def test_reduced_precision_against_fp32_reference(dtype, param_dtype, file_dtype):
  cfg, latents, rng = _setup(seed=31)
  ref = diffusers_unet(cfg, seed=31)
  noises = _noise(rng, 2, (2, 3, 32, 48))
  want = original_decode(ref, torch.from_numpy(latents), (1.0, 0.5),
                         [torch.from_numpy(n) for n in noises])
  sd = state_dict_numpy(ref)
  if file_dtype:
    sd = {k: v.astype(file_dtype) for k, v in sd.items()}  # what the fp16 files hold
  low = cfg.replace(dtype=dtype, param_dtype=param_dtype)
  got = jcd.decode(jcd.params_from_torch(sd, low), latents, 0, config=low, noise=noises)
  assert got.dtype == jnp.float32
  err = rel_err(got, want)
  print(f"\n{dtype} compute, {param_dtype} params vs fp32 torch: rel err {err:.3e}")
  assert 1e-6 < err <= BF16_TOL  # > 1e-6: the reduced precision really was used


def test_example_decoded_alone_equals_it_in_a_batch():
  cfg, latents, _ = _setup(seed=32, batch=3)
  params = jcd.params_from_torch(state_dict_numpy(diffusers_unet(cfg, seed=32)), cfg)
  key = jax.random.key(5)
  batch = jcd.decode(params, latents, key, config=cfg)
  keys = jcd.example_keys(key, 3)
  for i in range(3):
    alone = jcd.decode(params, latents[i:i + 1], keys[i:i + 1], config=cfg)
    np.testing.assert_allclose(alone[0], batch[i], rtol=1e-5, atol=1e-5)
  # A batch of keys gives the same as the one key it was derived from.
  np.testing.assert_array_equal(jcd.decode(params, latents, keys, config=cfg), batch)
  # Different examples draw different noise.
  same = jcd.decode(params, np.repeat(latents[:1], 2, 0), key, config=cfg)
  assert float(jnp.abs(same[0] - same[1]).max()) > 1e-3


def test_seed_and_key_forms_agree():
  cfg, latents, _ = _setup(seed=33, batch=1, h=2, w=2)
  params = jcd.UNet(cfg).init(jax.random.key(0), jnp.zeros((1, 16, 16, 7)),
                              jnp.zeros((1,), jnp.int32))["params"]
  a = jcd.decode(params, latents, 3, config=cfg)
  b = jcd.decode(params, latents, jax.random.key(3), config=cfg)
  c = jcd.decode(params, latents, jax.random.PRNGKey(3), config=cfg)
  d = jcd.decode({"params": params}, latents, np.int64(3), config=cfg)
  for other in (b, c, d):
    np.testing.assert_array_equal(a, other)


def test_second_call_does_not_recompile_and_works_under_jit():
  cfg, latents, _ = _setup(seed=34, batch=1, h=2, w=3)
  params = jcd.UNet(cfg).init(jax.random.key(0), jnp.zeros((1, 16, 16, 7)),
                              jnp.zeros((1,), jnp.int32))["params"]
  first = jcd.decode(params, latents, 1, config=cfg)
  program = sampler.top_level_program("cpu")
  compiled = program._cache_size()
  again = jcd.decode(params, latents + 1.0, 1, config=cfg)
  assert program._cache_size() == compiled
  assert not np.array_equal(first, again)

  @jax.jit
  def pipeline(params, latents, key):  # a caller's own jitted pipeline, pixels out
    return jcd.to_uint8(jcd.decode(params, latents, key, config=cfg))

  inside = pipeline(params, jnp.asarray(latents), jax.random.key(1))
  assert inside.dtype == jnp.uint8
  assert np.abs(inside.astype(int) - np.asarray(jcd.to_uint8(first)).astype(int)).max() <= 1


def test_cpu_programs_compile_without_ynnpack_fusions(monkeypatch):
  """`xla_options`: top-level CPU programs (`decode`, the sharded decoders) leave YNNPACK's
  fusions out, as they are slower on this model's convolutions. The nestable program keeps
  XLA's default, which has them at these shapes, so the check can tell the two apart."""
  from jaxconsdec import sharded
  cfg, latents, _ = _setup(seed=35, batch=1, h=2, w=2)
  params = jcd.random_params(cfg, 0)
  keys = jcd.example_keys(0, 1)
  static = dict(config=cfg, timesteps=(1008, 512), clamp=True, layout="NCHW")
  hlo = lambda lowered: lowered.compile().as_text()
  assert "__ynn_fusion" in hlo(sampler.nested_program.lower(params, latents, keys, None, **static))

  used = []
  top_level = sampler.top_level_program
  monkeypatch.setattr(sampler, "top_level_program", lambda p: used.append(p) or top_level(p))
  jcd.decode(params, latents, 0, config=cfg)
  assert used == ["cpu"]
  assert "__ynn_fusion" not in hlo(top_level("cpu").lower(params, latents, keys, None, **static))

  decoder = sharded.ShardedDecoder(params, config=cfg)
  assert "__ynn_fusion" not in decoder.compile(1, latents.shape[1:]).as_text()
  assert jcd.compiler_options("gpu") == {} and jcd.compiler_options("cpu")


def test_an_xla_option_this_jaxlib_does_not_know_falls_back_once(monkeypatch):
  """The YNN option is experimental: if a jaxlib drops it, decoding must still work."""
  from jaxconsdec import xla_options
  monkeypatch.setattr(xla_options, "CPU_OPTIONS", {"xla_cpu_no_such_option_anywhere": ""})
  xla_options._accepted.cache_clear()
  try:
    with pytest.warns(RuntimeWarning, match="does not accept"):
      assert xla_options.compiler_options("cpu") == {}
    assert xla_options.compiler_options("cpu") == {}  # probed once: no second warning
    cfg, latents, _ = _setup(seed=36, batch=1, h=2, w=2)
    sampler.top_level_program.cache_clear()
    out = jcd.decode(jcd.random_params(cfg, 0), latents, 0, config=cfg)
    assert np.isfinite(np.asarray(out)).all()
  finally:
    xla_options._accepted.cache_clear()
    sampler.top_level_program.cache_clear()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_keeps_the_schedule_arithmetic_in_float32(dtype):
  """With every UNet parameter zero the UNet outputs exactly 0 in any dtype, so the decode is
  the sampler's schedule arithmetic alone: it must match diffusers' float32 tables, computed
  here in float64, to float32 rounding. A coefficient or the image rounded to bf16 or fp16 on
  the way (a dtype leak into the schedule) is off by ~1e-3 and fails; the error-bound test
  above, at 3e-2, would not see it."""
  cfg = jcd.TINY.replace(dtype=dtype, param_dtype=dtype)
  params = jax.tree.map(jnp.zeros_like, jcd.random_params(cfg, 0))
  rng = np.random.default_rng(37)
  latents = (rng.standard_normal((1, 4, 2, 2)) / 0.18215).astype(np.float32)
  noises = _noise(rng, 2, (1, 3, 16, 16))
  got = jcd.decode(params, latents, 0, config=cfg, noise=noises, clamp=False)
  sched = sched_module.ConsistencyDecoderScheduler()
  table = lambda name, t: float(getattr(sched, name)[t])
  x = np.zeros((1, 3, 16, 16))
  for t, noise in zip((1008, 512), noises):
    x = table("sqrt_alphas_cumprod", t) * x + table("sqrt_one_minus_alphas_cumprod", t) * noise
    x = table("c_skip", t) * x  # c_out * 0 + c_skip * x
  np.testing.assert_allclose(np.asarray(got, np.float64), x, rtol=2e-6, atol=1e-9)
