"""`jaxconsdec train` keeps freed host memory: a program whose temporaries are large faults
its pages in once, not on every execution (jaxconsdec/host_memory.py)."""

import subprocess
import sys

import pytest

PROGRAM = """
import resource, sys
if sys.argv[1] == "keep":
  from jaxconsdec import host_memory
  assert host_memory.keep_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.tanh(x @ x) @ x).sum())  # 36 MB temporaries, a scalar out
x = jnp.ones((3072, 3072))
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_of_a_third_run(mode):
  out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_is_not_faulted_in_again():
  default, kept = _faults_of_a_third_run("default"), _faults_of_a_third_run("keep")
  # 36 MB of temporaries are ~9,000 pages; glibc's default maps and unmaps them every run
  assert default > 9_000, default
  assert kept < 1_000, kept
