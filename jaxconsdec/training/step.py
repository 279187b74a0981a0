"""One training step, jitted over a mesh of every device of every host (data parallel).

The state is a dict {"step", "params", "opt_state", "ema"}. Sharded (ZeRO/FSDP), each leaf
is split over the mesh's "data" axis along its largest axis that divides by the device
count; each layer's params are gathered where they are used and their gradients
reduce-scattered (on CPUs, rematerialised ResBlocks do it themselves: `block_layout`; XLA's
partitioner does the rest); replicated, every device holds all of it. The step donates its
state, so the new one takes the old one's place. The global batch of uint8 crops is split
over the same axis.
Everything random in the step comes from `fold_in(key(seed), g)` for each example's global
index g (split into pair, noise and dropout keys), so a run computes the same thing on 1
device or 64; only the order of the gradient's cross-device sum differs (float32 rounding).

The frozen VAE encoder turns each crop into its latent (the posterior mean) inside the step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxconsdec.config import UNetConfig, VAEConfig
from jaxconsdec.weights import abstract_params
from jaxconsdec.xla_options import compiler_options
from jaxconsdec.autoencoder import nested_encode
from jaxconsdec.models.conv import cpu_product_gradients
from jaxconsdec.models.sharded_blocks import Layout, sharded_blocks
from jaxconsdec.training.loss import consistency_loss, denoising_loss
from jaxconsdec.training.pairs import (ICT_LAW, anchor, check_law, draw_from_table, draw_levels,
                                      pair_count, pair_table)

DATA_AXIS = "data"
# "consistency": consistency training (the decoder's objective). "denoising": stage 1 of a
# new decoder, denoising pre-training towards the clean image (docs/training.md, section 3).
OBJECTIVES = ("consistency", "denoising")
# "sharded": the state split over the devices; "replicated": a copy on each; "auto": sharded
# where a copy would exceed AUTO_SHARD_BYTES (the released widths' 10 GB), replicated below
# that (small models, where gathering the params on every step costs more than it saves).
STATE_LAYOUTS = ("auto", "sharded", "replicated")
AUTO_SHARD_BYTES = 1 << 30
# Rematerialised ResBlocks: "on", "off", or "auto": on for a state above AUTO_SHARD_BYTES
# (the released widths). There the activations the backward pass would keep do not fit
# beside the state: at 256x256, batch 1, the step's temporaries are 13.0 GiB without and
# 6.5 GiB with (benchmarks/results/train_memory_cpu_256_1_device.jsonl), and 24 GiB holds
# only the second. Small models keep every activation, which is faster.
REMAT_CHOICES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class Optimization:
  """The optimiser and its schedule (the recipe's defaults for fine-tuning, docs/training.md).

  Adam(b1, b2, eps) on gradients clipped to global norm `clip_norm`, the learning rate rising
  linearly over `warmup_steps` (lr x (n + 1) / warmup at update n) and then constant; no
  weight decay (conv_out's rows 3..5 get no gradient and must not decay). The exported model
  is an EMA of the params with decay min(ema_decay, (1 + n) / (10 + n)) at update n, so a
  short run's EMA is not dominated by its initial weights.
  """
  lr: float = 1e-5
  warmup_steps: int = 1000
  b1: float = 0.9
  b2: float = 0.99
  eps: float = 1e-8
  clip_norm: float = 1.0
  ema_decay: float = 0.9999

  def __post_init__(self):
    if not self.lr > 0 or self.warmup_steps < 0 or not self.clip_norm > 0:
      raise ValueError("lr and clip_norm must be positive and warmup_steps >= 0")
    if not 0 <= self.ema_decay < 1 or not 0 <= self.b1 < 1 or not 0 <= self.b2 < 1:
      raise ValueError("ema_decay, b1 and b2 must lie in [0, 1)")

  def learning_rate(self, count):
    return self.lr * jnp.minimum(1.0, (count + 1) / max(self.warmup_steps, 1))

  def optimizer(self) -> optax.GradientTransformation:
    return optax.chain(clip_by_global_norm(self.clip_norm),
                       optax.adam(self.learning_rate, b1=self.b1, b2=self.b2, eps=self.eps))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm's result, as a multiplication by one scalar. optax divides
  every element by the norm; XLA will not duplicate a division into both of Adam's moment
  updates, so it writes the whole clipped gradient out first (2.5 GB for the released
  decoder, all of it freshly faulted memory on every step). A product by a scalar is fused
  into both instead."""
  def update(updates, state, params=None):
    del params
    scale = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))  # 1 when the norm is 0
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def init_state(params, optimization: Optimization) -> dict:
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)  # float32 masters
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "opt_state": optimization.optimizer().init(params),
          "ema": jax.tree.map(jnp.copy, params)}


def fsdp_spec(shape, devices: int) -> PartitionSpec:
  """The leaf split over `devices` along its largest axis that divides by their count;
  replicated if none does (scalars, odd sizes) or on one device."""
  divisible = [a for a, n in enumerate(shape) if n % devices == 0 and devices > 1]
  if not divisible:
    return PartitionSpec()
  axis = max(divisible, key=lambda a: shape[a])
  return PartitionSpec(*(DATA_AXIS if a == axis else None for a in range(len(shape))))


def state_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def example_streams(seed: int, first: jax.Array, count: int):
  """Per-example (pair, noise, dropout) keys of examples first .. first + count - 1."""
  base = jax.random.key(seed)
  keys = jax.vmap(lambda g: jax.random.fold_in(base, g))(first + jnp.arange(count))
  split = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
  return split[:, 0], split[:, 1], split[:, 2]


def _step(state, vae_params, pixels, first, levels, logits, *, config: UNetConfig,
          vae_config: VAEConfig, optimization: Optimization, seed: int, remat: bool,
          objective: str, noise_law, pair_weighting: str, anchor_share: float,
          conv_products: bool, block_layout: Optional[Layout]):
  with cpu_product_gradients(conv_products), sharded_blocks(block_layout):
    return _step_body(state, vae_params, pixels, first, levels, logits, config=config,
                      vae_config=vae_config, optimization=optimization, seed=seed,
                      remat=remat, objective=objective, noise_law=noise_law,
                      pair_weighting=pair_weighting, anchor_share=anchor_share)


def _step_body(state, vae_params, pixels, first, levels, logits, *, config: UNetConfig,
               vae_config: VAEConfig, optimization: Optimization, seed: int, remat: bool,
               objective: str, noise_law, pair_weighting: str, anchor_share: float):
  images = pixels.astype(jnp.float32) / 127.5 - 1.0
  b = images.shape[0]
  pair_keys, noise_keys, dropout_keys = example_streams(seed, first, b)
  t_lo, t_hi = draw_from_table(pair_keys, levels, logits)
  noise = jax.vmap(lambda k: jax.random.normal(k, images.shape[1:], jnp.float32))(noise_keys)
  # The frozen encoder's posterior mean (raw latents, NHWC), the program `encode` runs.
  latents = jax.lax.stop_gradient(nested_encode(vae_params, pixels, None, config=vae_config,
                                                layout="NHWC"))
  dropout = dropout_keys if config.dropout else None

  if objective == "denoising":
    t_lo = t_hi = draw_levels(pair_keys, noise_law, levels)
  else:
    t_lo = anchor(pair_keys, t_lo, anchor_share)

  def batch_loss(params):
    if objective == "denoising":
      losses = denoising_loss(params, images, latents, t_hi, noise, config=config,
                              dropout_key=dropout, remat=remat)
    else:
      losses = consistency_loss(params, images, latents, t_lo, t_hi, noise, config=config,
                                dropout_key=dropout, remat=remat, weighting=pair_weighting)
    return jnp.mean(losses)

  loss, grads = jax.value_and_grad(batch_loss)(state["params"])
  updates, opt_state = optimization.optimizer().update(grads, state["opt_state"],
                                                       state["params"])
  params = optax.apply_updates(state["params"], updates)
  n = state["step"].astype(jnp.float32)
  decay = jnp.minimum(optimization.ema_decay, (1.0 + n) / (10.0 + n))
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
             "lr": optimization.learning_rate(n), "boundary_pairs": jnp.mean(t_lo < 0)}
  return {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
          "ema": ema}, metrics


class TrainStep:
  """The jitted step over a mesh of `devices` (default: every device of every process).

  `__call__(state, vae_params, local_pixels, first, delta)`: `local_pixels` are this
  process's rows of the global batch (uint8, (B / processes, R, R, 3)); `first` is the global
  index of the batch's first example; `delta` the grid spacing (one of `deltas`: the pair
  tables are padded to the largest grid, so one compiled program serves the curriculum).
  Returns (state, metrics); the state given is donated (its arrays are deleted).

  `state_layout`: one of STATE_LAYOUTS. Make the first state with `first_state` and read one
  back with `state_abstract` (a checkpoint restores onto any device count). `remat`: one of
  REMAT_CHOICES (`self.remat` says what was chosen). `platform`: the devices' platform.
  """

  def __init__(self, config: UNetConfig, vae_config: VAEConfig, optimization: Optimization,
               *, seed: int, deltas=(16,), remat: str = "auto", objective: str = "consistency",
               noise_law=ICT_LAW, pair_weighting: str = "ict", anchor_share: float = 0.0,
               state_layout: str = "auto", devices=None):
    if objective not in OBJECTIVES:
      raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if state_layout not in STATE_LAYOUTS:
      raise ValueError(f"state_layout must be one of {STATE_LAYOUTS}, got {state_layout!r}")
    if remat not in REMAT_CHOICES:
      raise ValueError(f"remat must be one of {REMAT_CHOICES}, got {remat!r}")
    self.mesh = Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
    self.config, self.vae_config, self.optimization = config, vae_config, optimization
    abstract = jax.eval_shape(functools.partial(init_state, optimization=optimization),
                              abstract_params(config))
    large = state_bytes(abstract) > AUTO_SHARD_BYTES
    self.sharded = (state_layout == "sharded" or state_layout == "auto" and large
                    ) and self.num_devices > 1
    self.remat = remat == "on" or remat == "auto" and large
    n = self.num_devices if self.sharded else 1
    self.state_shardings = jax.tree.map(
        lambda x: NamedSharding(self.mesh, fsdp_spec(x.shape, n)), abstract)
    self._abstract = abstract
    pairs = max(pair_count(d) for d in deltas)
    noise_law = check_law(noise_law)
    self._tables = {d: pair_table(d, pairs, noise_law) for d in deltas}
    self._compiled = None  # see `compile`
    self.platform = platform = self.mesh.devices.flat[0].platform
    self.program = jax.jit(
        functools.partial(_step, config=config, vae_config=vae_config,
                          optimization=optimization, seed=seed, remat=self.remat,
                          objective=objective, noise_law=noise_law,
                          pair_weighting=pair_weighting, anchor_share=float(anchor_share),
                          # models.conv's CPU backward, outside the per-example dropout vmap
                          conv_products=platform == "cpu" and not config.dropout,
                          block_layout=self.block_layout),
        in_shardings=(self.state_shardings, self.replicated, self.batch_sharding, None, None,
                      None),
        out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,),
        compiler_options=compiler_options(platform))

  @property
  def block_layout(self) -> Optional[Layout]:
    """On CPUs, sharded and rematerialised, each ResBlock gathers its own params and
    reduce-scatters their gradients (models.sharded_blocks): about one block's weights whole
    on a device at a time, where XLA:CPU's partitioner held them all (0.88 against 2.92 GiB
    per device). GPU and TPU compilers make the reduce-scatters themselves, and their
    schedulers can fetch a block's weights while the one before computes, which the blocks'
    ordering would forbid; unmeasured there, they keep the partitioner's choice. So do
    dropout's blocks, jax.checkpoint's under a per-example vmap."""
    if not (self.sharded and self.remat) or self.config.dropout or self.platform != "cpu":
      return None
    n = self.num_devices
    return Layout(self.mesh, DATA_AXIS, lambda shape: fsdp_spec(shape, n))

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  def check_batch_size(self, batch_size: int) -> None:
    if batch_size % self.num_devices or batch_size % jax.process_count():
      raise ValueError(f"the batch size {batch_size} does not divide over the"
                       f" {self.num_devices} devices of {jax.process_count()} process(es):"
                       f" use a multiple of {self.num_devices}")

  def replicate(self, tree):
    """Puts a host-local tree (numpy or single-device arrays, equal on every process) onto
    every device."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        self.replicated, np.asarray(x)), tree)

  def first_state(self, params, *, donate: bool = False) -> dict:
    """The first state from `params` (host or device arrays, the same on every process),
    laid out as the step takes it. Each process puts only its devices' parts in place, so no
    device ever holds more of the state than its share.

    donate: `params`' device arrays are deleted once the state holds them (used there where
    they already lie as the state does), as a jitted function's donated arguments are. At
    the released widths that is one copy of the weights (2.5 GB) fewer for the whole run."""
    shardings = self.state_shardings["params"]
    placed = place(params, shardings)
    if donate:  # the arrays `place` copied from; those it kept are donated to the jit below
      for given, kept in zip(jax.tree.leaves(params), jax.tree.leaves(placed)):
        if isinstance(given, jax.Array) and given is not kept:
          given.delete()
    else:
      placed = jax.tree.map(lambda p, g: p if p is not g else jnp.copy(p), placed, params)
    return jax.jit(functools.partial(init_state, optimization=self.optimization),
                   in_shardings=(shardings,), out_shardings=self.state_shardings,
                   donate_argnums=(0,))(placed)

  def state_abstract(self) -> dict:
    """The state's shapes, dtypes and shardings (what a checkpoint restores into)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        self._abstract, self.state_shardings)

  def tables(self, delta: int) -> tuple[np.ndarray, np.ndarray]:
    """The program's pair-law arguments for grid spacing `delta`."""
    return self._tables[delta]

  def compile(self, vae_params, batch_size: int, resolution: int) -> None:
    """Compiles the step for global batches of `batch_size` crops ahead of its first call.
    A trainer does this before it allocates the state: the compiler's working memory (GBs at
    the released widths), freed, is then reused for the state instead of adding to it."""
    pixels = jax.ShapeDtypeStruct((batch_size, resolution, resolution, 3), np.uint8,
                                  sharding=self.batch_sharding)
    vae = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                      sharding=self.replicated), vae_params)
    levels, logits = next(iter(self._tables.values()))
    self._compiled = self.program.lower(self.state_abstract(), vae, pixels, np.int32(0), levels,
                                        logits).compile()

  @property
  def temporary_bytes(self) -> Optional[int]:
    """Host or device bytes one step allocates for its temporaries (XLA's count), once
    `compile` has run; None before."""
    return None if self._compiled is None else (
        self._compiled.memory_analysis().temp_size_in_bytes)

  def __call__(self, state, vae_params, local_pixels: np.ndarray, first: int, delta: int):
    pixels = jax.make_array_from_process_local_data(self.batch_sharding, local_pixels)
    program = self._compiled or self.program
    return program(state, vae_params, pixels, jnp.int32(first), *self.tables(delta))


def place(tree, shardings):
  """A host-local tree (equal on every process) put onto the devices of `shardings`, each
  device receiving only its part; a device array already laid out so is kept, not copied."""
  def put(x, sharding):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
      return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree.map(put, tree, shardings)


def whole_copy(tree):
  """Each leaf whole, on this process (for evaluation and export, which run on one device):
  a replicated leaf's local copy; a sharded one assembled from its shards, which with
  several processes is a collective every process must call in the same order.

  On one process the shards are assembled on the host, one at a time. `jax.device_put` of
  the sharded array itself would leave a host copy of it cached on that array: the EMA's,
  2.3 GiB at the released widths, alive beside the next step's temporaries until the step
  takes the state over."""
  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_replicated:
      return x.addressable_data(0) if isinstance(x, jax.Array) else x
    if x.is_fully_addressable:
      whole = np.empty(x.shape, x.dtype)
      for shard in x.addressable_shards:
        whole[shard.index] = np.asarray(shard.data)
      return jax.device_put(whole, jax.local_devices()[0])
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(x, tiled=True)
  return jax.tree.map(one, tree)
