"""One 3x3 convolution at a time: XLA with its default options, XLA with jaxconsdec's
compiler options (`jaxconsdec/xla_options.py`), and PyTorch (NCHW and channels_last), on the
shapes the UNet runs at a 256x256 decode. This is what chose jaxconsdec's CPU options.

  python benchmarks/conv_kernels.py

Prints GFLOP/s per shape (best of --repeats after a warm-up) and writes
benchmarks/results/conv_kernels_<backend>.json.

  python benchmarks/conv_kernels.py --backward

The two gradients of each convolution of a 64x64, batch-1 training step (input dX, kernel dK):
XLA's own autodiff of `lax.conv_general_dilated`, jaxconsdec's `models.conv.conv2d` (matrix
products where `uses_products` says so), and PyTorch's `torch.nn.grad`. Run under the
trainer's host-memory setting (`jaxconsdec/host_memory.py`), so fresh-page faults are not
counted. Writes benchmarks/results/conv_backward_<backend>.json.
"""

import argparse
import json
import os
import platform
import sys

import numpy as np

from timing import best_seconds

# (height = width, in channels, out channels): each UNet level's resnet and skip-concat convs.
SHAPES = ((256, 320, 320), (256, 640, 320), (256, 640, 640), (128, 640, 640),
          (128, 1280, 640), (64, 1024, 1024), (64, 2048, 1024), (32, 1024, 1024))


def _operands(rng, size, cin, cout):
  """A batch-1 NHWC input, a 3x3 HWIO kernel, and the convolution's FLOPs."""
  x = rng.standard_normal((1, size, size, cin), np.float32)
  k = (rng.standard_normal((3, 3, cin, cout)) * 0.02).astype(np.float32)
  return x, k, 2 * size * size * cin * cout * 9


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--backward", action="store_true", help="the gradients (see above)")
  args = parser.parse_args()
  if args.backward:
    return backward(args)

  import jax
  import torch
  from jax import lax

  import jaxconsdec as jcd

  def conv(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def conv_valid(x, k):  # the same, padded by the caller
    return lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

  xla = {"xla_default": jax.jit(conv),
         "xla_jaxconsdec": jax.jit(conv, compiler_options=jcd.compiler_options()),
         "xla_default_valid": jax.jit(conv_valid)}
  rng = np.random.default_rng(0)
  rows = []
  print("size   in->out   GFLOP | " + " | ".join(list(xla) + ["torch", "torch_cl"])
        + "  (GFLOP/s)")
  for size, cin, cout in SHAPES:
    x, k, flops = _operands(rng, size, cin, cout)
    row = dict(size=size, cin=cin, cout=cout, gflop=flops / 1e9)
    xj, kj = jax.device_put(x), jax.device_put(k)
    xp = jax.device_put(np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))
    for name, f in xla.items():
      arg = xp if name.endswith("valid") else xj
      row[name] = flops / best_seconds(lambda: f(arg, kj).block_until_ready(), args.repeats) / 1e9
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    kt = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous()
    with torch.no_grad():
      for name, inp in (("torch", xt), ("torch_cl", xt.to(memory_format=torch.channels_last))):
        row[name] = flops / best_seconds(lambda: torch.nn.functional.conv2d(inp, kt, padding=1),
                                  args.repeats) / 1e9
    rows.append(row)
    print(f"{size:4d} {cin:5d}->{cout:<5d} {row['gflop']:6.1f} | " + " | ".join(
        f"{row[name]:6.1f}" for name in list(xla) + ["torch", "torch_cl"]), flush=True)
  _write("conv_kernels", rows)


# (height = width, in, out) of the UNet's convolutions in a 64x64, batch-1 training step.
TRAINING_SHAPES = ((64, 320, 320), (64, 640, 320), (32, 640, 640), (32, 1280, 640),
                   (16, 1024, 1024), (16, 2048, 1024), (8, 1024, 1024), (8, 2048, 1024))


def backward(args):
  from jaxconsdec import host_memory
  host_memory.keep_freed_memory()  # before JAX starts, as the trainer does
  import jax
  import torch
  from jax import lax

  import jaxconsdec as jcd
  from jaxconsdec.models.conv import conv2d, uses_products
  dn, pad = ("NHWC", "HWIO", "NHWC"), ((1, 1), (1, 1))

  def pullback(conv, wrt):
    def grad(x, k, g):
      return jax.vjp(lambda *xk: conv(*xk), x, k)[1](g)[wrt]
    return jax.jit(grad, compiler_options=jcd.compiler_options())

  xla = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), pad, dimension_numbers=dn)
  ours = lambda x, k: conv2d(x, k, (1, 1), pad, dimension_numbers=dn)
  programs = {"xla_dx": pullback(xla, 0), "ours_dx": pullback(ours, 0),
              "xla_dk": pullback(xla, 1), "ours_dk": pullback(ours, 1)}
  rng = np.random.default_rng(0)
  rows = []
  print("size   in->out   GFLOP | " + " | ".join(list(programs) + ["torch_dx", "torch_dk"])
        + "  (GFLOP/s) | products (dx, dk)")
  for size, cin, cout in TRAINING_SHAPES:
    x, k, flops = _operands(rng, size, cin, cout)
    g = rng.standard_normal((1, size, size, cout), np.float32)
    products = uses_products(k.shape, g.shape)
    row = dict(size=size, cin=cin, cout=cout, gflop=flops / 1e9, products=products)
    xj, kj, gj = (jax.device_put(a) for a in (x, k, g))
    for name, f in programs.items():
      row[name] = flops / best_seconds(lambda: f(xj, kj, gj).block_until_ready(),
                                       args.repeats) / 1e9
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    kt = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous()
    gt = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous()
    row["torch_dx"] = flops / best_seconds(
        lambda: torch.nn.grad.conv2d_input(xt.shape, kt, gt, padding=1), args.repeats) / 1e9
    row["torch_dk"] = flops / best_seconds(
        lambda: torch.nn.grad.conv2d_weight(xt, kt.shape, gt, padding=1), args.repeats) / 1e9
    rows.append(row)
    print(f"{size:4d} {cin:5d}->{cout:<5d} {row['gflop']:6.1f} | " + " | ".join(
        f"{row[name]:6.1f}" for name in list(programs) + ["torch_dx", "torch_dk"])
        + f" | {products}", flush=True)
  _write("conv_backward", rows)


def _write(stem, rows):
  """benchmarks/results/<stem>_<backend>.json: the rows, with the machine and versions."""
  import jax
  import torch

  import jaxconsdec as jcd
  result = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "jax": jax.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "compiler_options": jcd.compiler_options(),
            "command": "python benchmarks/conv_kernels.py " + " ".join(sys.argv[1:]),
            "rows": rows}
  os.makedirs("benchmarks/results", exist_ok=True)
  with open(f"benchmarks/results/{stem}_{jax.default_backend()}.json", "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
