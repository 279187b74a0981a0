"""Why `jax.checkpoint` saved no memory on XLA:CPU, and what does: compiled temporaries.

1. A chain of 16 blocks (4 matmul + tanh + sin layers each, 8192x512 activations): no remat,
   `jax.checkpoint` on each block, and jaxconsdec's way (`models.unet.recomputed`): the
   recomputation's input made to depend on the block's output cotangent, which no scheduler
   can move into the forward pass. Also whether the compiled program keeps JAX's
   optimisation barriers, and its FLOPs (the recomputation is there in both remat forms).
2. The tiny UNet's consistency-loss gradient at 256x256, batch 4, `remat=False/True`.

  python benchmarks/remat_memory.py
Prints a table (kept in benchmarks/results/remat_memory_cpu.md); compiling only.
"""

import jax
import jax.numpy as jnp

import jaxconsdec as jcd
from jaxconsdec.training.loss import consistency_loss


def block(w, x):
  for _ in range(4):
    x = jnp.tanh(x @ w) * 1.1 + jnp.sin(x)
  return x


def tied(f):
  @jax.custom_vjp
  def g(w, x):
    return f(w, x)

  def fwd(w, x):
    return f(w, x), (w, x)

  def bwd(res, ct):
    w, x = res
    x = x + (ct.reshape(-1)[0] * 0).astype(x.dtype)
    return jax.vjp(f, w, x)[1](ct)
  g.defvjp(fwd, bwd)
  return g


def chain(mode):
  f = {"none": block, "jax.checkpoint": jax.checkpoint(block), "tied": tied(block)}[mode]

  def net(ws, x):
    for w in ws:
      x = f(w, x)
    return jnp.sum(x ** 2)
  return net


def main():
  ws = [jax.ShapeDtypeStruct((512, 512), jnp.float32)] * 16
  x = jax.ShapeDtypeStruct((8192, 512), jnp.float32)
  print("| program | remat | barriers lowered / compiled | GFLOP | temporaries MiB |")
  print("|---|---|---|---|---|")
  for mode in ("none", "jax.checkpoint", "tied"):
    lowered = jax.jit(jax.grad(chain(mode))).lower(ws, x)
    compiled = lowered.compile()
    barriers = (lowered.as_text().count("optimization_barrier"),
                compiled.as_text().count("opt-barrier"))
    print(f"| 16-block chain | {mode} | {barriers[0]} / {barriers[1]} |"
          f" {compiled.cost_analysis()['flops'] / 1e9:.0f} |"
          f" {compiled.memory_analysis().temp_size_in_bytes / 2 ** 20:.0f} |")
  cfg = jcd.TINY
  params = jcd.abstract_params(cfg)
  b, r = 4, 256
  x0 = jax.ShapeDtypeStruct((b, r, r, 3), jnp.float32)
  lat = jax.ShapeDtypeStruct((b, r // 8, r // 8, cfg.latent_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((b,), jnp.int32)
  for remat in (False, True):
    loss = lambda p, x0, lat, t, eps: jnp.mean(consistency_loss(
        p, x0, lat, t - 16, t, eps, config=cfg, remat=remat))
    compiled = jax.jit(jax.grad(loss)).lower(params, x0, lat, t, x0).compile()
    print(f"| tiny UNet gradient, 256², batch 4 | {'jaxconsdec' if remat else 'none'} | |"
          f" {compiled.cost_analysis()['flops'] / 1e9:.0f} |"
          f" {compiled.memory_analysis().temp_size_in_bytes / 2 ** 20:.0f} |")


if __name__ == "__main__":
  main()
