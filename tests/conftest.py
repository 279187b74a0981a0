"""Test-wide set-up: the tests' helper modules are importable. Nothing global about numerics.

JAX's matmul precision is *not* forced here: the library pins it per config
(`UNetConfig.precision`), the parity tests rely on that, and tests/test_precision.py reads it
off the lowered programs. Torch's TF32 is turned off by `reference`, which only the tests
that compare against PyTorch import; those modules skip themselves when torch is missing,
and every other test still runs.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # `import reference`, `import hostile`, ...

# The slowest files first, slowest of all first (by `pytest --durations` on a 2-core CPU):
# pytest-xdist hands out whole files in this order, so the two workers end together instead
# of one starting the longest file last.
SLOWEST_FILES = ("test_training.py", "test_training_learns.py", "test_training_step.py",
                 "test_convert.py", "test_conv.py", "test_keys.py", "test_remat.py",
                 "test_packaging.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable otherwise
