"""Test-wide numerics: JAX at "highest" matmul precision, torch with TF32 off, on CPU."""

import os
import sys

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

sys.path.insert(0, os.path.dirname(__file__))  # `import reference` from the tests


@pytest.fixture(autouse=True, scope="session")
def _torch_exact():
  torch = pytest.importorskip("torch")
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  torch.set_float32_matmul_precision("highest")
  yield
