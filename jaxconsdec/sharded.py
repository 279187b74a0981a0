"""Data-parallel decoding over a `jax.sharding.Mesh`, on one host or many.

One jitted program with explicit shardings: params replicated, latents and per-example
indices sharded over the mesh's data axis, images sharded the same way. Example i of a job
draws its noise from `fold_in(key, i)` with i its *global* index, the same key `decode` uses
with `example_keys(key, n)`, so an image does not depend on the batch size, the device count
or the host count.

Multi-host (after `jax.distributed.initialize()`): every process builds the same
`ShardedDecoder`, calls it the same number of times with its own rows of each global batch
(`local_rows`), and gets back its rows of the images. Nothing is gathered across hosts.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxconsdec import layout as layouts
from jaxconsdec import xla_options
from jaxconsdec.config import CONSISTENCY_DECODER, SD_VAE, UNetConfig, VAEConfig
from jaxconsdec.keys import as_typed_key, batch_keys, example_keys
from jaxconsdec.sampler import check_latents, nested_program
from jaxconsdec.schedule import timesteps_for
from jaxconsdec.weights import check_params, unwrap_variables

DATA_AXIS = "data"


def data_mesh(devices: Optional[Sequence[jax.Device]] = None, axis: str = DATA_AXIS) -> Mesh:
  """A 1-D mesh over all devices of all processes (or the given ones), named `axis`."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (axis,))


def replicate(params, mesh: Mesh):
  """Puts a host or device param tree on every device of `mesh` (works across processes:
  each process supplies the same values for its own devices)."""
  sharding = NamedSharding(mesh, P())

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree.map(put, params)


class ShardedProgram:
  """One per-example program run over global batches sharded on `mesh`'s data axis: the
  params replicated, the examples and one key per example sharded, outputs sharded alike.
  Subclasses say what the program is (`_build`) and what one example is (`example_dtype`).

  Multi-host: every process calls it the same number of times with its own
  `local_rows(global_batch)` rows and gets back its rows of the outputs.
  """
  example_dtype = np.float32

  def __init__(self, params, mesh: Optional[Mesh], axis: str):
    self.mesh = data_mesh() if mesh is None else mesh
    self.axis = axis
    self.params = replicate(params, self.mesh)
    self._compiled: dict = {}  # (global batch, example shape, key impl) -> executable

  def _build(self, key_impl: str):
    """The jitted fn(params, examples, key_data) -> (outputs, finite, all_finite)."""
    raise NotImplementedError

  @property
  def num_shards(self) -> int:
    """Devices along the data axis: a global batch must be a multiple of this."""
    return self.mesh.shape[self.axis]

  def global_batch(self, batch_size: int) -> int:
    """`batch_size` rounded up to a multiple of the data axis."""
    return -(-max(batch_size, 1) // self.num_shards) * self.num_shards

  def local_rows(self, global_batch: int) -> slice:
    """The rows of each global batch that this process supplies and gets back."""
    sharding = NamedSharding(self.mesh, P(self.axis))
    starts = sorted({index[0].start or 0 for index in
                     sharding.addressable_devices_indices_map((global_batch,)).values()})
    per_device = global_batch // self.num_shards
    if starts != list(range(starts[0], starts[0] + per_device * len(starts), per_device)):
      raise ValueError("this process's devices hold non-contiguous rows of the data axis;"
                       " build the mesh with devices grouped by process (data_mesh does)")
    return slice(starts[0], starts[0] + per_device * len(starts))

  def compile(self, global_batch: int, example_shape: Sequence[int], key_impl: str = None):
    """Compiles the program for global batches of `global_batch` examples of `example_shape`
    ahead of use, so that a job can time its work apart from its compiling. Calls with that
    shape then run the compiled program."""
    key_impl = key_impl or str(jax.random.key_impl(jax.random.key(0)))
    cache_key = (global_batch, tuple(example_shape), key_impl)
    if cache_key not in self._compiled:
      data = NamedSharding(self.mesh, P(self.axis))
      key_shape = jax.random.key_data(jax.random.key(0, impl=key_impl)).shape
      examples = jax.ShapeDtypeStruct((global_batch, *example_shape), self.example_dtype,
                                      sharding=data)
      keys = jax.ShapeDtypeStruct((global_batch, *key_shape), jnp.uint32, sharding=data)
      self._compiled[cache_key] = self._build(key_impl).lower(
          self.params, examples, keys).compile()
    return self._compiled[cache_key]

  def __call__(self, local_examples, local_keys, global_batch: int):
    """Runs one global batch from this process's rows.

    Args:
      local_examples: this process's `local_rows(global_batch)` rows.
      local_keys: one key per row (a batch of typed keys, or of legacy uint32 keys).
      global_batch: the global batch size, a multiple of `num_shards`.

    Returns:
      (outputs, finite, all_finite): this process's rows of the outputs and, per row, whether
      its input was all finite (numpy arrays on the host); and whether every row of the
      *global* batch was, the same answer on every process.
    """
    rows = self.local_rows(global_batch)
    n = rows.stop - rows.start
    local_examples = np.asarray(local_examples, self.example_dtype)
    keys = as_typed_key(local_keys)
    if local_examples.shape[0] != n or keys.shape != (n,):
      raise ValueError(f"this process supplies {n} rows of a global batch of {global_batch};"
                       f" got {local_examples.shape[0]} examples and keys of shape"
                       f" {keys.shape}")
    key_impl = str(jax.random.key_impl(keys))
    data = NamedSharding(self.mesh, P(self.axis))
    key_data = np.asarray(jax.random.key_data(keys))
    examples = jax.make_array_from_process_local_data(
        data, local_examples, (global_batch,) + local_examples.shape[1:])
    key_data = jax.make_array_from_process_local_data(
        data, key_data, (global_batch,) + key_data.shape[1:])
    program = self._compiled.get((global_batch, local_examples.shape[1:], key_impl))
    program = program or self._build(key_impl)
    outputs, finite, all_finite = program(self.params, examples, key_data)
    return _local(outputs), _local(finite), bool(all_finite.addressable_data(0))

  def _run_all(self, examples: np.ndarray, keys_for, batch_size: Optional[int]) -> np.ndarray:
    """One process: all `examples` in global batches, the last padded to the device count
    only; keys_for(first, size) gives the keys of rows first .. first + size."""
    if jax.process_count() > 1:
      raise ValueError("this feeds every row from this process; with several processes"
                       " call the program with each process's local_rows instead")
    b = len(examples)
    step = self.global_batch(batch_size or b)
    out = []
    for first in range(0, b, step):
      chunk = examples[first:first + step]
      size = self.global_batch(len(chunk))
      pad = size - len(chunk)
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      outputs, _, _ = self(chunk, keys_for(first, size), size)
      out.append(outputs[:size - pad])
    return np.concatenate(out)


class ShardedDecoder(ShardedProgram):
  """Decodes global batches sharded over `mesh`'s data axis.

    decoder = ShardedDecoder(params, mesh=data_mesh(), config=cfg, schedule=(1.0, 0.5))
    images = decoder.decode(latents, key)               # one process: all examples at once

  `images[i]` equals `decode(params, latents[i:i+1], example_keys(key, n)[i:i+1])`; a latent
  holding NaN or inf gives an image of NaN, as `decode` would. Called with a batch of rows
  (`ShardedProgram.__call__`), each row's noise is drawn from its key as `decode` draws it.
  """

  def __init__(self, params, *, mesh: Optional[Mesh] = None,
               config: UNetConfig = CONSISTENCY_DECODER, schedule: Sequence[float] = (1.0, 0.5),
               clamp: bool = True, layout: str = "NCHW", axis: str = DATA_AXIS):
    layouts.check_layout(layout)
    params = unwrap_variables(params)
    check_params(params, config)
    super().__init__(params, mesh, axis)
    self.config, self.layout = config, layout
    self._timesteps, self._clamp = timesteps_for(schedule), bool(clamp)

  def _build(self, key_impl: str):
    return _program(self.mesh, self.axis, self.config, self._timesteps, self._clamp,
                    self.layout, key_impl)

  def decode(self, latents, key, *, start: int = 0, batch_size: Optional[int] = None):
    """One process: decodes all `latents` (B, ...) in global batches of `batch_size` (default:
    all of them, padded up to a multiple of the device count). Example i is global index
    `start + i`. Returns float32 images as one numpy array."""
    latents = np.asarray(latents)
    check_latents(latents, self.layout, self.config)
    return self._run_all(latents, lambda first, size: example_keys(key, size, start + first),
                         batch_size)


class ShardedEncoder(ShardedProgram):
  """Encodes global batches of uint8 images (NHWC) into raw latents (NCHW), sharded over
  `mesh`'s data axis: the posterior mean, or with `sample=True` a sample drawn from each
  row's key as `encode` draws it."""
  example_dtype = np.uint8

  def __init__(self, vae_params, *, mesh: Optional[Mesh] = None, config: VAEConfig = SD_VAE,
               sample: bool = False, axis: str = DATA_AXIS):
    from jaxconsdec.autoencoder import encoder_half
    super().__init__(encoder_half(vae_params, config), mesh, axis)
    self.config, self.sample = config, bool(sample)

  def _build(self, key_impl: str):
    return _encode_program(self.mesh, self.axis, self.config, self.sample, key_impl)


def _local(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in order (replicas counted once)."""
  shards = {}
  for shard in array.addressable_shards:
    shards.setdefault(shard.index[0].start or 0, shard)
  return np.concatenate([np.asarray(shards[s].data) for s in sorted(shards)])


@functools.lru_cache(maxsize=None)
def _program(mesh: Mesh, axis: str, config: UNetConfig, timesteps: tuple[int, ...],
             clamp: bool, layout: str, key_impl: str):
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(axis))

  def run(params, latents, key_data):
    keys = jax.random.wrap_key_data(key_data, impl=key_impl)
    finite = jnp.all(jnp.isfinite(latents), axis=(1, 2, 3))
    # A non-finite row only spoils its own image (nothing mixes across examples); it is
    # decoded from zeros and then set to NaN, so no inf/NaN arithmetic runs at all, and the
    # result says what `decode` would: this latent has no image.
    clean = jnp.where(finite[:, None, None, None], latents, 0)
    images = nested_program(params, clean, keys, None, config=config, timesteps=timesteps,
                     clamp=clamp, layout=layout)
    images = jnp.where(finite[:, None, None, None], images, jnp.nan)
    return images, finite, jnp.all(finite)

  return jax.jit(run, in_shardings=(replicated, data, data),
                 out_shardings=(data, data, replicated), compiler_options=_options(mesh))


@functools.lru_cache(maxsize=None)
def _encode_program(mesh: Mesh, axis: str, config: VAEConfig, sample: bool, key_impl: str):
  from jaxconsdec.autoencoder import nested_encode
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(axis))

  def run(params, images, key_data):
    keys = jax.random.wrap_key_data(key_data, impl=key_impl) if sample else None
    latents = nested_encode(params, images, keys, config=config, layout="NHWC")
    finite = jnp.ones(images.shape[0], bool)  # pixels are always finite
    return jnp.transpose(latents, (0, 3, 1, 2)), finite, jnp.all(finite)

  return jax.jit(run, in_shardings=(replicated, data, data),
                 out_shardings=(data, data, replicated), compiler_options=_options(mesh))


SPACE_AXIS = "space"


def decode_spatial(params, latents, key, *, mesh: Optional[Mesh] = None,
                   config: UNetConfig = CONSISTENCY_DECODER,
                   schedule: Sequence[float] = (1.0, 0.5), clamp: bool = True,
                   layout: str = "NCHW", axis: str = SPACE_AXIS) -> jax.Array:
  """Decodes images too large for one device by sharding their *height* over `mesh`'s `axis`.

  Arguments and result as `decode` (one key or one per example; no `noise`). XLA partitions
  the convolutions (exchanging a halo of rows between neighbours) and turns each GroupNorm's
  statistics into a cross-device reduction, so the result equals the unsharded decode up to
  float summation order. Noise is drawn with JAX's partitionable threefry: each device draws
  its own rows of the same numbers. The latent height must divide by the axis size.
  """
  layouts.check_layout(layout)
  mesh = data_mesh(axis=axis) if mesh is None else mesh
  b, h, _ = check_latents(latents, layout, config)
  n = mesh.shape[axis]
  if h % n:
    raise ValueError(f"latent height {h} does not divide over {n} devices on mesh axis"
                     f" {axis!r}; pad the latents or use a divisor of {h}")
  params = unwrap_variables(params)
  check_params(params, config)
  keys = batch_keys(key, b)
  return spatial_program(mesh, axis, config, timesteps_for(schedule), bool(clamp), layout)(
      replicate(params, mesh), latents, keys)


@functools.lru_cache(maxsize=None)
def spatial_program(mesh: Mesh, axis: str, config: UNetConfig, timesteps: tuple[int, ...],
                     clamp: bool, layout: str):
  rows = NamedSharding(mesh, P(None, None, axis) if layout == "NCHW" else P(None, axis))
  replicated = NamedSharding(mesh, P())

  def run(params, latents, keys):
    return nested_program(params, latents, keys, None, config=config, timesteps=timesteps,
                   clamp=clamp, layout=layout)
  return jax.jit(run, in_shardings=(replicated, rows, replicated), out_shardings=rows,
                 compiler_options=_options(mesh))


def _options(mesh: Mesh) -> dict[str, str]:
  return xla_options.compiler_options(mesh.devices.flat[0].platform)
