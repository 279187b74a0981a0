"""Test-wide set-up: the tests' helper modules are importable. Nothing global about numerics.

JAX's matmul precision is *not* forced here: the library pins it per config
(`UNetConfig.precision`), the parity tests rely on that, and tests/test_precision.py reads it
off the lowered programs. Torch's TF32 is turned off by `reference`, which only the tests
that compare against PyTorch import; those modules skip themselves when torch is missing,
and every other test still runs.
"""

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))  # `import reference`, `import hostile`, ...

# One persistent XLA cache for the whole run, in every process: both workers and every child
# process they start inherit these variables (JAX reads them when it starts). A program
# compiled once, in a test or in a command a test runs, is read back by every later process
# instead of being compiled again. A command given --compile-cache uses its own. The process
# that made the folder (pytest's, before it starts its workers) removes it at the end.
_MADE_HERE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _MADE_HERE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
      tempfile.gettempdir(), f"jaxconsdec-tests-xla-{os.getpid()}")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_sessionfinish(session):
  if _MADE_HERE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# The slowest files first, slowest of all first (by `pytest --durations` on a 2-core CPU):
# pytest-xdist hands out whole files in this order, so the two workers end together instead
# of one starting the longest file last.
SLOWEST_FILES = ("test_training.py", "test_training_learns.py", "test_training_step.py",
                 "test_convert.py", "test_conv.py", "test_keys.py", "test_remat.py",
                 "test_packaging.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable otherwise
