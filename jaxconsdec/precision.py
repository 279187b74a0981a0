"""Which parts of the decoder stay float32 when the UNet computes in bf16 or fp16.

This is the only place that decides it. Everything not named here runs in
`UNetConfig.dtype`.

- Schedule coefficients and the sampler's running image `x`: always float32 (`sampler.py`
  never casts them). The coefficients span 0.0057..1.26 and multiply a [-1, 1] image; in
  bf16 their 8-bit mantissa alone would cost ~0.4% per step.
- GroupNorm statistics: float32 (Flax's GroupNorm promotes mean/variance to at least
  float32 whatever its `dtype`; we rely on that and test it).
- The time embedding (table lookup + 2-layer MLP): float32. It is one vector per example,
  so this is free, and it feeds the scale/shift of every ResBlock.
- The output head (`conv_norm_out`, `conv_out`): float32, so the 6-channel prediction that
  becomes the image is not rounded to bf16 (0.4% of 2 = 0.008, i.e. one 8-bit pixel level).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxconsdec.config import UNetConfig

FLOAT32_PARTS = frozenset({"time_embedding", "conv_norm_out", "conv_out"})


def part_dtype(config: UNetConfig, part: str) -> jnp.dtype:
  """The compute dtype of the named top-level UNet part."""
  return jnp.dtype(jnp.float32) if part in FLOAT32_PARTS else config.compute_dtype
