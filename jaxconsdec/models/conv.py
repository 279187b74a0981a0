"""The convolution every layer of the UNet and the VAE runs: XLA's own forward, and on CPU a
backward pass written as two matrix products where XLA's is slow.

Why. XLA:CPU computes a convolution's input gradient as a convolution with the kernel
reversed and its in/out axes swapped, and it materialises that transposed kernel on every
call; its kernel gradient comes out as (in, kh, kw, out) and is transposed again. Where the
activations are smaller than the kernel (the UNet's 16x16 and 8x8 levels at a 64x64 crop,
1024 channels: a 38 MB kernel against a 1 MB activation) those copies, not the arithmetic, are
the cost: XLA's input gradient runs at 28-91 GFLOP/s there and the products below at 128-180;
the kernel gradient, at every level of a 64x64 training step, goes from 101-157 to 144-198
(`python benchmarks/conv_kernels.py --backward`, 2-core x86_64; `benchmarks/README.md`).

With K the kernel as a (kh*kw*in, out) matrix (its row-major layout, so no copy), P the
input's patches (B*Ho*Wo, kh*kw*in) ("im2col") and G the output gradient (B*Ho*Wo, out):

  dK = P^T G                       one product, already in the kernel's (kh, kw, in, out) order
  dX = col2im(K G^T)               one product; col2im adds each tap's rows back at its offset

P and K G^T hold kh*kw values per output pixel, so each is only built where it is small:
dX where the activations are no larger than the kernel (B*Ho*Wo <= min(in, out); above
that XLA's input gradient is at full speed), dK where P is at most PATCHES_MAX_BYTES (at
256x256 only the 32x32 level qualifies) and wherever dX is a product, both only for kernels
of at least KERNEL_MIN_SIZE values. A convolution with neither is XLA's own, outside any
custom_vjp. The forward is XLA's convolution everywhere, so decoding is unchanged to the bit.

Who chooses. The products are only for programs that run on a CPU (cuDNN and the TPU compiler
take these layouts natively), and a custom_vjp has no forward-mode derivative, so they are
off unless the program being traced asks for them: `with cpu_product_gradients():` around
the traced code, as the trainer's step does when its devices are CPUs. Anywhere else (a
user's own `jax.grad` or `jax.jvp`, any platform) every convolution is XLA's own. The size
rules see the shapes the convolution is traced with, so under `vmap` they would see one
example of a batch B times larger: the trainer asks for the products only outside one.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv2d(x: jax.Array, kernel: jax.Array, window_strides: Sequence[int],
           padding: Any, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
           feature_group_count: int = 1, batch_group_count: int = 1, precision=None,
           preferred_element_type=None) -> jax.Array:
  """`lax.conv_general_dilated` with the signature Flax's `nn.Conv(conv_general_dilated=...)`
  calls. A stride-1, undilated, ungrouped NHWC/HWIO convolution with explicit padding gets
  the backward pass of this module's docstring; anything else is XLA's as it is."""
  plain = (tuple(window_strides) == (1, 1) and not _dilated(lhs_dilation)
           and not _dilated(rhs_dilation) and feature_group_count == 1
           and batch_group_count == 1 and preferred_element_type is None
           and _is_nhwc(dimension_numbers) and not isinstance(padding, str)
           and all(lo >= 0 and hi >= 0 for lo, hi in padding))
  if not plain:
    return lax.conv_general_dilated(
        x, kernel, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  (top, bottom), (left, right) = padding
  out_shape = (x.shape[0], x.shape[1] + top + bottom - kernel.shape[0] + 1,
               x.shape[2] + left + right - kernel.shape[1] + 1, kernel.shape[3])
  if not any(uses_products(kernel.shape, out_shape)):
    # XLA's own autodiff, outside any custom_vjp. With XLA's gradients taken through jax.vjp
    # inside the custom_vjp backward instead, one training step of the tiny model differed
    # between 1 and 2 devices by 1e-3 (tests/test_training.py; cause not isolated: a lone
    # sharded convolution agrees either way, tests/test_conv.py).
    return _forward(x, kernel, padding, precision)
  return _conv(x, kernel, padding, _precision_key(precision))


def _dilated(dilation) -> bool:
  return dilation is not None and any(d != 1 for d in dilation)


def _is_nhwc(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return dimension_numbers == lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
  return tuple(dimension_numbers) == _NHWC


def _precision_key(precision):
  """custom_vjp's non-differentiable arguments must be hashable; Precision values are."""
  if precision is None or isinstance(precision, lax.Precision):
    return precision
  if isinstance(precision, str):
    return lax.Precision(precision)
  return tuple(precision)


def _forward(x, kernel, padding, precision):
  return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, padding, precision):
  return _forward(x, kernel, padding, precision)


def _conv_fwd(x, kernel, padding, precision):
  return _forward(x, kernel, padding, precision), (x, kernel)


def _conv_bwd(padding, precision, residuals, g):
  x, kernel = residuals
  input_products, _ = uses_products(kernel.shape, g.shape)  # the kernel's is always products
  if input_products:
    dx = _input_gradient(kernel, g, x, padding, precision)
  else:  # XLA's input gradient: no reduction over the batch, so no cross-device sum to lose
    dx = jax.vjp(lambda x: _forward(x, kernel, padding, precision), x)[1](g)[0]
  return dx, _kernel_gradient(x, g, kernel, padding, precision)


_conv.defvjp(_conv_fwd, _conv_bwd)


# The largest patch matrix the kernel gradient builds (at a 64x64 crop, batch 1, every level
# fits; at 256x256 only the 32x32 level does, and the rest keep XLA's convolution).
PATCHES_MAX_BYTES = 128 * 2 ** 20
# XLA's kernel copies only cost where kernels are large: the released widths' hold 0.9-19M
# values. Narrow models (the test widths) keep XLA's backward and its smaller programs.
KERNEL_MIN_SIZE = 2 ** 18  # values: a MiB in float32


_PRODUCTS = contextvars.ContextVar("jaxconsdec_cpu_product_gradients", default=False)


@contextlib.contextmanager
def cpu_product_gradients(enabled: bool = True):
  """Convolutions traced inside take the matrix-product backward where the size rules say:
  for programs that run on a CPU, outside any `vmap` (see the module docstring)."""
  token = _PRODUCTS.set(bool(enabled))
  try:
    yield
  finally:
    _PRODUCTS.reset(token)


def uses_products(kernel_shape, out_shape) -> tuple[bool, bool]:
  """Whether the (input, kernel) gradients of a convolution of these shapes, traced here, are
  the matrix products rather than XLA's own: inside `cpu_product_gradients`, for kernels of
  at least KERNEL_MIN_SIZE values; the input gradient where the activations are no larger
  than the kernel, the kernel gradient where its patch matrix is small."""
  kh, kw, cin, cout = kernel_shape
  if not _PRODUCTS.get() or kh * kw * cin * cout < KERNEL_MIN_SIZE:
    return False, False
  pixels = out_shape[0] * out_shape[1] * out_shape[2]
  input_products = pixels <= min(cin, cout)
  # Products for the input gradient imply them for the kernel's: a convolution with any
  # products is a custom_vjp, and its kernel gradient is never XLA's from inside one.
  return input_products, input_products or 4 * pixels * kh * kw * cin <= PATCHES_MAX_BYTES


def _kernel_gradient(x, g, kernel, padding, precision):
  kh, kw, cin, cout = kernel.shape
  b, ho, wo, _ = g.shape
  # P^T built directly, (kh*kw*in, B*Ho*Wo) in the kernel's (kh, kw, in) row order, from the
  # input transposed once to (in, B, H, W), so that the product is a plain one.
  xt = jnp.pad(x.transpose(3, 0, 1, 2), ((0, 0), (0, 0), *padding))
  patches_t = jnp.concatenate(
      [xt[:, :, a:a + ho, c:c + wo].reshape(cin, b * ho * wo)
       for a in range(kh) for c in range(kw)], axis=0)
  dk = jnp.matmul(patches_t, g.reshape(b * ho * wo, cout), precision=precision,
                  preferred_element_type=jnp.float32)
  return dk.reshape(kernel.shape).astype(kernel.dtype)


def _input_gradient(kernel, g, x, padding, precision):
  kh, kw, cin, cout = kernel.shape
  b, ho, wo, _ = g.shape
  (top, bottom), (left, right) = padding
  # Row (a, c, i) of K G^T is what input channel i at offset (a, c) from each output pixel
  # receives; float32, so the kh*kw partial sums add up as the convolution's would.
  taps = jnp.matmul(kernel.reshape(kh * kw * cin, cout), g.reshape(b * ho * wo, cout).T,
                    precision=precision, preferred_element_type=jnp.float32)
  taps = taps.reshape(kh, kw, cin, b, ho, wo)
  padded = sum(jnp.pad(taps[a, c], ((0, 0), (0, 0), (a, kh - 1 - a), (c, kw - 1 - c)))
               for a in range(kh) for c in range(kw))          # (in, B, Hp, Wp)
  h, w = x.shape[1:3]
  return padded[:, :, top:top + h, left:left + w].transpose(1, 2, 3, 0).astype(x.dtype)
