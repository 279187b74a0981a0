"""Runs a snippet in a fresh Python whose CPU platform shows N devices (XLA's host flag only
takes effect before JAX starts, hence the subprocess)."""

import os
import subprocess
import sys


def _env(count: int) -> dict:
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}",
              JAX_PLATFORMS="cpu")


def simulated_devices_process(code: str, count: int, *args: str) -> subprocess.Popen:
  """`code` (with `args` as sys.argv[1:]) started on `count` simulated CPU devices."""
  return subprocess.Popen([sys.executable, "-c", code, *args], env=_env(count),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_on_simulated_devices(code: str, count: int, *args: str) -> str:
  """Runs `code` (with `args` as sys.argv[1:]) on `count` simulated CPU devices; asserts it
  succeeded and printed OK."""
  proc = subprocess.run([sys.executable, "-c", code, *args], env=_env(count), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "OK" in proc.stdout
  print(proc.stdout)
  return proc.stdout
