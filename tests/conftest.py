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
