"""Keys as every public function takes them: a `jax.random.key`, a legacy `PRNGKey` array, an
int seed, or a batch of B keys. With one key, example i uses `fold_in(key, i)`, so an
example's randomness never depends on the batch it sits in."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def example_keys(key, batch_size: int, start: int = 0) -> jax.Array:
  """Per-example keys: `fold_in(key, start + i)` for i in range(batch_size). Shape (B,).

  `start` is the global index of the first example, so a slice of a larger job draws the
  same noise as it would in one big batch.
  """
  key = as_typed_key(key)
  if key.ndim != 0:
    raise ValueError(f"example_keys takes one key, got a key array of shape {key.shape}")
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(start + jnp.arange(batch_size))


def as_typed_key(key) -> jax.Array:
  if isinstance(key, (numbers.Integral, np.integer)) and not isinstance(key, bool):
    return jax.random.key(int(key))
  if not hasattr(key, "dtype"):
    raise TypeError(f"key must be a jax.random.key, a batch of keys, or an int seed;"
                    f" got {type(key).__name__}")
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if key.dtype == jnp.uint32 and key.ndim >= 1 and key.shape[-1] == 2:  # legacy PRNGKey
    return jax.random.wrap_key_data(key)
  if jnp.issubdtype(key.dtype, jnp.integer) and key.ndim == 0:
    return jax.random.key(key)
  raise TypeError(f"key must be a jax.random.key, a batch of keys, or an int seed; got an"
                  f" array of dtype {key.dtype} and shape {key.shape}")


def batch_keys(key, batch_size: int) -> jax.Array:
  key = as_typed_key(key)
  if key.ndim == 0:
    return example_keys(key, batch_size)
  if key.shape != (batch_size,):
    raise ValueError(f"a batch of keys must hold one key per example: expected shape"
                     f" ({batch_size},), got {key.shape}")
  return key
