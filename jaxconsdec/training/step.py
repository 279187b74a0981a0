"""One training step, jitted over a mesh of every device of every host (data parallel).

The state is a dict {"step", "params", "opt_state", "ema"}, replicated on every device; the
global batch of uint8 crops is split over the mesh's "data" axis. Everything random in the
step comes from `fold_in(key(seed), g)` for each example's global index g (split into pair,
noise and dropout keys), so a run computes the same thing on 1 device or 64; only the order
of the gradient's cross-device sum differs (float32 rounding).

The frozen VAE encoder turns each crop into its latent (the posterior mean) inside the step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxconsdec.config import UNetConfig, VAEConfig
from jaxconsdec.xla_options import compiler_options
from jaxconsdec.autoencoder import nested_encode
from jaxconsdec.training.loss import consistency_loss, denoising_loss
from jaxconsdec.training.pairs import (ICT_LAW, anchor, check_law, draw_from_table, draw_levels,
                                      pair_count, pair_table)

DATA_AXIS = "data"
# "consistency": consistency training (the decoder's objective). "denoising": stage 1 of a
# new decoder, denoising pre-training towards the clean image (docs/training.md, section 3).
OBJECTIVES = ("consistency", "denoising")


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
    scale = jnp.minimum(1.0, max_norm / optax.global_norm(updates))  # 1 when the norm is 0
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def init_state(params, optimization: Optimization) -> dict:
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)  # float32 masters
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "opt_state": optimization.optimizer().init(params),
          "ema": jax.tree.map(jnp.copy, params)}


def example_streams(seed: int, first: jax.Array, count: int):
  """Per-example (pair, noise, dropout) keys of examples first .. first + count - 1."""
  base = jax.random.key(seed)
  keys = jax.vmap(lambda g: jax.random.fold_in(base, g))(first + jnp.arange(count))
  split = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
  return split[:, 0], split[:, 1], split[:, 2]


def _step(state, vae_params, pixels, first, levels, logits, *, config: UNetConfig,
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
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
             "lr": optimization.learning_rate(n), "boundary_pairs": jnp.mean(t_lo < 0)}
  return {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
          "ema": ema}, metrics


class TrainStep:
  """The jitted step over a mesh of `devices` (default: every device of every process).

  `__call__(state, vae_params, local_pixels, first, delta)`: `local_pixels` are this
  process's rows of the global batch (uint8, (B / processes, R, R, 3)); `first` is the global
  index of the batch's first example; `delta` the grid spacing (one of `deltas`: the pair
  tables are padded to the largest grid, so one compiled program serves the curriculum).
  Returns (state, metrics), the state replicated.
  """

  def __init__(self, config: UNetConfig, vae_config: VAEConfig, optimization: Optimization,
               *, seed: int, deltas=(16,), remat: bool = False, objective: str = "consistency",
               noise_law=ICT_LAW, pair_weighting: str = "ict", anchor_share: float = 0.0,
               devices=None):
    if objective not in OBJECTIVES:
      raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    self.mesh = Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
    self.config, self.vae_config = config, vae_config
    pairs = max(pair_count(d) for d in deltas)
    noise_law = check_law(noise_law)
    self._tables = {d: pair_table(d, pairs, noise_law) for d in deltas}
    self.program = jax.jit(
        functools.partial(_step, config=config, vae_config=vae_config,
                          optimization=optimization, seed=seed, remat=remat,
                          objective=objective, noise_law=noise_law,
                          pair_weighting=pair_weighting, anchor_share=float(anchor_share)),
        in_shardings=(self.replicated, self.replicated, self.batch_sharding, None, None, None),
        out_shardings=(self.replicated, self.replicated),
        compiler_options=compiler_options(self.mesh.devices.flat[0].platform))

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

  def tables(self, delta: int) -> tuple[np.ndarray, np.ndarray]:
    """The program's pair-law arguments for grid spacing `delta`."""
    return self._tables[delta]

  def __call__(self, state, vae_params, local_pixels: np.ndarray, first: int, delta: int):
    pixels = jax.make_array_from_process_local_data(self.batch_sharding, local_pixels)
    return self.program(state, vae_params, pixels, jnp.int32(first), *self.tables(delta))


def local_copy(tree):
  """This process's copy of a replicated tree, as single-device arrays (for evaluation and
  export, which run on one device)."""
  return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)
