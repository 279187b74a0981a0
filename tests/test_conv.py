"""The convolution the models run (`jaxconsdec.models.conv.conv2d`): its forward is XLA's to
the bit, and its backward (matrix products, where a CPU program asks for them) gives the
gradients XLA's own autodiff of `lax.conv_general_dilated` gives. Not asked for, every
convolution is XLA's own, forward-mode included; the trainer's step asks on CPU, and a step
through the products equals one through XLA's backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxconsdec.models import conv
from jaxconsdec.models.conv import conv2d, cpu_product_gradients, uses_products

NHWC = ("NHWC", "HWIO", "NHWC")


def _xla_conv(x, k, padding):
  return lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=NHWC,
                                  precision=lax.Precision.HIGHEST)


def _ours(x, k, padding):
  with cpu_product_gradients():
    return conv2d(x, k, (1, 1), padding, dimension_numbers=NHWC,
                  precision=lax.Precision.HIGHEST)


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


# (batch, height, width, in, out, kernel, padding, which gradients are products). Products
# need a kernel of at least 2^18 values (models.conv.KERNEL_MIN_SIZE): 3x3x192x192 is 331,776.
CASES = [
    (1, 8, 8, 192, 192, (3, 3), ((1, 1), (1, 1)), (True, True)),    # a small level: both
    (2, 4, 4, 160, 224, (3, 3), ((1, 1), (1, 1)), (True, True)),    # batch 2, in != out
    (1, 4, 6, 256, 320, (2, 2), ((1, 0), (0, 1)), (True, True)),    # an UpsampledConv phase
    (1, 6, 5, 192, 224, (3, 3), ((0, 0), (0, 0)), (True, True)),    # VALID, non-square
    (1, 5, 5, 512, 640, (1, 1), ((0, 0), (0, 0)), (True, True)),    # a 1x1 shortcut
    (1, 16, 16, 192, 192, (3, 3), ((1, 1), (1, 1)), (False, True)),  # 256 pixels: XLA's dX
    (1, 8, 8, 64, 64, (3, 3), ((1, 1), (1, 1)), (False, False)),     # a narrow kernel: XLA's
]


@pytest.mark.parametrize("b,h,w,cin,cout,kernel,padding,paths", CASES)
def test_gradients_equal_xla_autodiff(b, h, w, cin, cout, kernel, padding, paths):
  rng = np.random.default_rng(cin + cout + h)
  x = jnp.asarray(rng.standard_normal((b, h, w, cin)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((*kernel, cin, cout)), jnp.float32)
  y, pullback = jax.vjp(lambda x, k: _ours(x, k, padding), x, k)
  want_y, want_pullback = jax.vjp(lambda x, k: _xla_conv(x, k, padding), x, k)
  with cpu_product_gradients():
    assert uses_products(k.shape, y.shape) == paths  # the case tests the path it names
  np.testing.assert_array_equal(y, want_y)  # the forward is XLA's convolution itself
  g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  (dx, dk), (want_dx, want_dk) = pullback(g), want_pullback(g)
  assert dx.shape == x.shape and dk.shape == k.shape
  assert _rel(dx, want_dx) < 1e-5 and _rel(dk, want_dk) < 1e-5


def test_large_activations_and_other_convolutions_keep_xla():
  with cpu_product_gradients():
    assert uses_products((3, 3, 320, 320), (1, 64, 64, 320)) == (False, True)
    assert uses_products((3, 3, 320, 320), (8, 256, 256, 320)) == (False, False)
    assert uses_products((3, 3, 64, 64), (1, 8, 8, 64)) == (False, False)  # the test widths
  assert uses_products((3, 3, 192, 192), (1, 8, 8, 192)) == (False, False)  # not asked for
  # strided (the VAE's downsampler) and SAME-padded calls are lax's own, gradients included
  x = jnp.ones((1, 9, 9, 8))
  k = jnp.ones((3, 3, 8, 4))
  for args in (((2, 2), "VALID"), ((1, 1), "SAME")):
    got = jax.grad(lambda k: conv2d(x, k, *args, dimension_numbers=NHWC).sum())(k)
    want = jax.grad(lambda k: lax.conv_general_dilated(x, k, *args,
                                                       dimension_numbers=NHWC).sum())(k)
    np.testing.assert_array_equal(got, want)


def test_bfloat16_gradients_keep_their_dtypes():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 4, 4, 192)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((3, 3, 192, 192)), jnp.bfloat16)
  pad = ((1, 1), (1, 1))
  dx, dk = jax.grad(lambda x, k: _ours(x, k, pad).astype(jnp.float32).sum(), (0, 1))(x, k)
  want_dx, want_dk = jax.grad(
      lambda x, k: _xla_conv(x, k, pad).astype(jnp.float32).sum(), (0, 1))(x, k)
  assert dx.dtype == dk.dtype == jnp.bfloat16
  f32 = lambda a: a.astype(jnp.float32)
  assert _rel(f32(dx), f32(want_dx)) < 1e-2 and _rel(f32(dk), f32(want_dk)) < 1e-2


# The gradients of a batch-sharded convolution on 2 devices equal those on one device, for
# each way conv2d computes them (the kernel gradient sums over the batch, so across devices).
SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxconsdec.models.conv import conv2d, cpu_product_gradients, uses_products
rng = np.random.default_rng(0)
mesh = Mesh(np.array(jax.devices()), ("batch",))
for shape, cin in (((4, 4, 4), 192), ((2, 16, 16), 192), ((2, 4, 4), 64)):
  x = jnp.asarray(rng.standard_normal((*shape, cin)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, cin, cin)), jnp.float32)
  def loss(x, k):
    with cpu_product_gradients():
      return jnp.sum(conv2d(x, k, (1, 1), ((1, 1), (1, 1)),
                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                            precision=jax.lax.Precision.HIGHEST) ** 2)
  grads = jax.jit(jax.grad(loss, (0, 1)))
  one = grads(x, k)
  two = grads(jax.device_put(x, NamedSharding(mesh, P("batch"))), k)
  for a, b in zip(two, one):
    err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    with cpu_product_gradients():
      assert err < 1e-5, (shape, cin, uses_products(k.shape, (*shape, cin)), err)
print("OK", jax.device_count())
"""


def test_batch_sharded_gradients_equal_one_device():
  from simulated_devices import run_on_simulated_devices
  run_on_simulated_devices(SHARDED, 2)


def test_not_asked_for_a_large_convolution_is_xla_own_and_has_a_forward_derivative():
  """A user's own jax.jvp (or any program not traced for a CPU) at the released widths."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((1, 8, 8, 192)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 192, 192)), jnp.float32)
  dk = jnp.asarray(rng.standard_normal(k.shape), jnp.float32)
  pad = ((1, 1), (1, 1))
  f = lambda k: conv2d(x, k, (1, 1), pad, dimension_numbers=NHWC)
  _, got = jax.jvp(f, (k,), (dk,))
  np.testing.assert_array_equal(got, f(dk))  # linear in the kernel
  with pytest.raises(TypeError, match="custom_vjp"):  # what asking for the products costs
    with cpu_product_gradients():
      jax.jvp(f, (k,), (dk,))


def test_a_training_step_through_the_products_equals_one_through_xla(monkeypatch):
  """The trainer's own step on the tests' smallest decoder (it compiles twice),
  with the size threshold lowered so that its convolutions take the products (counted),
  against the same step with XLA's backward."""
  import jaxconsdec as jcd
  from jaxconsdec.training.step import Optimization, TrainStep, whole_copy
  from small_models import SMALLEST as cfg
  params = jcd.random_params(cfg, seed=1)
  vae = jcd.random_params(jcd.TINY_VAE, seed=2, halves=("encoder",))
  pixels = np.random.default_rng(3).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  opt = Optimization(lr=1e-3, warmup_steps=1)
  built = []
  real = conv._kernel_gradient
  monkeypatch.setattr(conv, "_kernel_gradient", lambda *a: built.append(1) or real(*a))

  def one_step():
    step = TrainStep(cfg, jcd.TINY_VAE, opt, seed=0, devices=jax.devices()[:1])
    state, metrics = step(step.first_state(params), step.replicate(vae), pixels, 0, 16)
    return jax.device_get(whole_copy(state)), float(metrics["loss"])

  xla_state, xla_loss = one_step()
  assert not built  # the tiny kernels are below the threshold
  monkeypatch.setattr(conv, "KERNEL_MIN_SIZE", 0)
  products_state, products_loss = one_step()
  assert len(built) > 10
  assert abs(products_loss - xla_loss) <= 1e-6 * abs(xla_loss)
  for part in ("params", "opt_state", "ema"):
    a = np.concatenate([np.ravel(v) for v in jax.tree.leaves(products_state[part])])
    b = np.concatenate([np.ravel(v) for v in jax.tree.leaves(xla_state[part])])
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), part
