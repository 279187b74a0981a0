"""Test-wide set-up: the tests' helper modules are importable. Nothing global about numerics.

JAX's matmul precision is *not* forced here: the library pins it per config
(`UNetConfig.precision`), the parity tests rely on that, and tests/test_precision.py reads it
off the lowered programs. Torch's TF32 is turned off by `reference`, which only the tests
that compare against PyTorch import; those modules skip themselves when torch is missing,
and every other test still runs.

`--files torch|torch-free` runs one part of the suite: the files that compare against PyTorch
(they call `pytest.importorskip("torch")`), or the others. CI runs each part once, in the leg
whose environment it needs (README "Tests"), and BOTH_LEGS in both; a plain `pytest` runs
everything.
"""

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))  # `import reference`, `import hostile`, ...

# The newest-JAX leg tests the installed wheel: this checkout's sources must not stand in.
if os.environ.get("JAXCONSDEC_EXPECT_INSTALLED"):
  import jaxconsdec
  _SOURCES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "jaxconsdec")
  if os.path.abspath(jaxconsdec.__file__).startswith(_SOURCES + os.sep):
    raise SystemExit(f"JAXCONSDEC_EXPECT_INSTALLED: jaxconsdec was imported from"
                     f" {jaxconsdec.__file__}, this checkout, not the installed wheel")

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


def pytest_addoption(parser):
  parser.addoption("--files", choices=("all", "torch", "torch-free"), default="all",
                   help="the test files that compare against PyTorch, the others, or all")


BOTH_LEGS = ("test_across_versions.py",)  # compares one leg's results with the other's


def needs_torch(path) -> bool:
  with open(path, encoding="utf-8") as f:
    return 'importorskip("torch")' in f.read()


def pytest_ignore_collect(collection_path, config):
  part = config.getoption("--files")
  name = collection_path.name
  if part == "all" or not name.startswith("test_") or name in BOTH_LEGS:
    return None
  return True if needs_torch(collection_path) != (part == "torch") else None


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable otherwise
