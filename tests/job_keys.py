"""The batch job's documented noise scheme (README, noise scheme 2), written out for tests
independently of jaxconsdec.jobs.engine."""

import hashlib

import jax


def documented_key(seed: int, name: str):
  """The first 8 bytes of SHA-256(name) as a little-endian 64-bit number, folded into
  key(seed) as its high then its low 32 bits."""
  h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), h >> 32), h & 0xFFFFFFFF)
