"""The matmul/convolution precision is pinned by the config, not inherited from the platform
or a global flag; and in reduced precision exactly the documented parts stay float32.

Both are read off the lowered program of a decode, as a caller's jit compiles it. On CPU an
fp32 convolution is fp32 whatever its precision attribute, so only the attribute shows what
a TPU (bf16 passes) or a GPU (TF32) would do.
"""

import re

import jax
import numpy as np
import pytest

import jaxconsdec as jcd

OP = re.compile(r"stablehlo\.(convolution|dot_general)\b.*?"
                r"(?:precision_config = \[#stablehlo<precision (\w+)>|precision = \[(\w+),)"
                r".*: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)")


@pytest.fixture(autouse=True)
def no_global_precision():
  """No process-wide default: what the program says is what the config asked for."""
  old = jax.config.jax_default_matmul_precision
  jax.config.update("jax_default_matmul_precision", None)
  yield
  jax.config.update("jax_default_matmul_precision", old)


def lowered(cfg, h=2, w=2):
  """StableHLO of a 2-step decode through the public `decode`, inside a caller's jit."""
  params = jcd.random_params(cfg, 0)
  latents = np.zeros((1, cfg.latent_channels, h, w), np.float32)
  return jax.jit(lambda p, x: jcd.decode(p, x, 0, config=cfg)).lower(params, latents).as_text()


def ops(text):
  """[(op, precision, lhs type, rhs type, result type)] of every convolution and dot."""
  found = []
  for line in text.splitlines():
    m = OP.search(line)
    if m:
      kind, conv_precision, dot_precision, lhs, rhs, out = m.groups()
      found.append((kind, conv_precision or dot_precision, lhs, rhs, out))
  assert len(found) == text.count("stablehlo.convolution") + text.count("stablehlo.dot_general")
  return found


def test_fp32_decode_is_highest_precision_in_every_layer():
  found = ops(lowered(jcd.TINY))
  kinds = {k for k, *_ in found}
  assert kinds == {"convolution", "dot_general"} and len(found) > 40
  assert {p for _, p, *_ in found} == {"HIGHEST"}, found


def test_bf16_decode_is_default_precision_and_only_the_named_parts_are_float32():
  cfg = jcd.TINY.replace(dtype="bfloat16")
  text = lowered(cfg)
  found = ops(text)
  assert {p for _, p, *_ in found} == {"DEFAULT"}
  f32 = [f for f in found if f[2].endswith("xf32>")]
  bf16 = [f for f in found if f[2].endswith("xbf16>")]
  assert len(f32) + len(bf16) == len(found)
  # float32: the time-embedding MLP (2 dots to time_embed_dim) and the output head (the one
  # convolution to out_channels), once in the scanned step; everything else bfloat16.
  time_mlp = [f for f in f32 if f[0] == "dot_general"]
  head = [f for f in f32 if f[0] == "convolution"]
  assert len(time_mlp) == 2 and all(f[4].endswith(f"x{cfg.time_embed_dim}xf32>")
                                    for f in time_mlp), time_mlp
  assert len(head) == 1 and all(f[4].endswith(f"x{cfg.out_channels}xf32>") for f in head), head
  assert all(f[4].endswith("xbf16>") for f in bf16)
  # The sampler's image and the schedule coefficients never touch bfloat16: no 3-channel
  # bfloat16 tensor anywhere (a leak would put the per-step update in bf16).
  assert not re.search(r"tensor<[0-9x]*x3xbf16>", text), "the image went through bfloat16"
  # GroupNorm statistics: every reduction is float32.
  reductions = re.findall(r"stablehlo\.reduce\(.*?\) applies stablehlo\.add across dimensions"
                          r" = \[[^\]]*\] : \((tensor<[^>]*>)", text)
  assert reductions and all(r.endswith("xf32>") for r in reductions), set(reductions)


def test_an_explicit_precision_is_applied_as_asked():
  found = ops(lowered(jcd.TINY.replace(precision="high")))
  assert {p for _, p, *_ in found} == {"HIGH"}


def test_decode_is_exact_without_any_global_flag():
  """fp32 parity with torch holds from the config alone (conftest sets no global flag)."""
  assert jax.config.jax_default_matmul_precision is None
  assert jcd.TINY.matmul_precision == jax.lax.Precision.HIGHEST
  assert jcd.TINY.replace(dtype="bfloat16").matmul_precision == jax.lax.Precision.DEFAULT
