"""Every bad input to `decode` gets a clear error before any compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconsdec as jcd
from jaxconsdec import sampler

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


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_before_compute(params, name):
  overrides, error, message = CASES[name]
  kwargs = dict(latents=GOOD, key=0, config=CFG)
  kwargs.update(overrides)
  latents, key = kwargs.pop("latents"), kwargs.pop("key")
  compiled = sampler._decode._cache_size()
  with pytest.raises(error, match=message):
    jcd.decode(params, latents, key, **kwargs)
  assert sampler._decode._cache_size() == compiled  # nothing was traced or compiled


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
