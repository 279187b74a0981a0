"""Every bad input to `decode` gets a clear error before any compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconsdec as jcd

CFG = jcd.TINY


@pytest.fixture(scope="module")
def params():
  return jcd.UNet(CFG).init(jax.random.key(0), jnp.zeros((1, 16, 16, 7)),
                            jnp.zeros((1,), jnp.int32))["params"]


GOOD = np.zeros((2, 4, 2, 2), np.float32)

CASES = {
    "unbatched": (dict(latents=np.zeros((4, 8, 8), np.float32)), ValueError, "add a batch axis"),
    "rank 5": (dict(latents=np.zeros((1, 1, 4, 8, 8), np.float32)), ValueError, "rank 4"),
    "rank 2": (dict(latents=np.zeros((4, 8), np.float32)), ValueError, "rank 4"),
    "16 channels": (dict(latents=np.zeros((1, 16, 8, 8), np.float32)), ValueError, "SD3/FLUX"),
    "3 channels": (dict(latents=np.zeros((1, 3, 8, 8), np.float32)), ValueError, "have 3 channels"),
    "NHWC given as NCHW": (dict(latents=np.zeros((1, 8, 8, 4), np.float32)), ValueError,
                           "layout='NHWC'"),
    "NCHW given as NHWC": (dict(latents=GOOD, layout="NHWC"), ValueError, "layout='NCHW'"),
    "int dtype": (dict(latents=np.zeros((1, 4, 8, 8), np.int32)), TypeError, "float array"),
    "not an array": (dict(latents=[[1.0]]), TypeError, "must be an array"),
    "empty batch": (dict(latents=np.zeros((0, 4, 8, 8), np.float32)), ValueError, "empty"),
    "schedule > 1": (dict(schedule=(1.5,)), ValueError, "outside \\[0, 1\\]"),
    "schedule < 0": (dict(schedule=(1.0, -0.1)), ValueError, "outside \\[0, 1\\]"),
    "schedule NaN": (dict(schedule=(float("nan"),)), ValueError, "outside \\[0, 1\\]"),
    "empty schedule": (dict(schedule=()), ValueError, "schedule is empty"),
    "schedule string": (dict(schedule="1.0,0.5"), TypeError, "sequence of numbers"),
    "schedule bool": (dict(schedule=(True,)), TypeError, "numbers in"),
    "bad layout": (dict(layout="CHW"), ValueError, "layout must be one of"),
    "key of wrong type": (dict(key="seed"), TypeError, "int seed"),
    "float key": (dict(key=np.float32(1.0)), TypeError, "int seed"),
    "wrong number of keys": (dict(key=jax.random.split(jax.random.key(0), 3)), ValueError,
                             "one key per example"),
    "noise count": (dict(noise=[np.zeros((2, 3, 16, 16), np.float32)]), ValueError,
                    "one array per schedule step"),
    "noise shape": (dict(noise=[np.zeros((2, 16, 16, 3), np.float32)] * 2), ValueError,
                    "shaped like the output"),
    "wrong config": (dict(config=jcd.CONSISTENCY_DECODER), jcd.ParamsMismatchError,
                     "params do not match"),
    "other timestep count": (dict(config=CFG.replace(num_train_timesteps=1000)), ValueError,
                             "1024-step schedule"),
}


# JAX's monitoring events for turning a program into XLA and compiling it. (Tracing alone is
# allowed: checking params against a config traces the model abstractly, with eval_shape.)
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


@pytest.fixture
def traces():
  """Every program JAX lowers or compiles while a test runs, from JAX's own monitoring events
  (whichever jit the public path takes, and any small helper program)."""
  seen = []

  def listener(name, *args, **kwargs):
    if name in COMPILE_EVENTS:
      seen.append(name)
  jax.monitoring.register_event_duration_secs_listener(listener)
  yield seen
  jax.monitoring.unregister_event_duration_listener(listener)


def test_the_trace_watch_sees_a_first_call(params, traces):
  # A latent size not used elsewhere in this module: this call must trace and compile.
  jcd.decode(params, np.zeros((1, 4, 6, 2), np.float32), 0, config=CFG)
  assert set(traces) == set(COMPILE_EVENTS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_before_compute(params, name, traces):
  overrides, error, message = CASES[name]
  kwargs = dict(latents=GOOD, key=0, config=CFG)
  kwargs.update(overrides)
  latents, key = kwargs.pop("latents"), kwargs.pop("key")
  with pytest.raises(error, match=message):
    jcd.decode(params, latents, key, **kwargs)
  assert traces == []  # nothing was lowered or compiled


def test_params_with_integer_leaves_are_refused(params):
  bad = jax.tree.map(lambda x: x, params)
  bad["conv_in"]["bias"] = jnp.zeros(bad["conv_in"]["bias"].shape, jnp.int32)
  with pytest.raises(jcd.ParamsMismatchError, match="not a float dtype"):
    jcd.decode(bad, GOOD, 0, config=CFG)


def test_config_itself_is_validated():
  with pytest.raises(ValueError, match="does not divide"):
    jcd.UNetConfig(block_out_channels=(32, 48), norm_num_groups=32)
  with pytest.raises(ValueError, match="must be one of"):
    jcd.UNetConfig(dtype="int8")
