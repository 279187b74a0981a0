"""The package as pip builds it: jaxconsdec.convert comes from the top-level convert/ folder,
and no top-level `convert` module is installed."""

import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_ships_the_converter_as_jaxconsdec_convert_only(tmp_path):
  # --no-build-isolation: the environment's setuptools (pyproject asks >= 77) builds it, so
  # the test needs no network.
  # A copy of the sources, so that the build leaves nothing (build/, egg-info) in the tree.
  src = tmp_path / "src"
  shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
      ".venv", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
  proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                         "--no-build-isolation", "-q", "-w", str(tmp_path)],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  [wheel] = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
  names = zipfile.ZipFile(tmp_path / wheel).namelist()
  tops = {n.split("/")[0] for n in names if not n.startswith("jaxconsdec-")}
  assert tops == {"jaxconsdec"}, tops
  for module in ("__init__", "formats", "torchscript", "safetensors_file", "errors"):
    assert f"jaxconsdec/convert/{module}.py" in names
  # Importing from the unpacked wheel (its dependencies from this environment) finds the
  # converter inside the package.
  unpacked = tmp_path / "unpacked"
  zipfile.ZipFile(tmp_path / wheel).extractall(unpacked)
  code = ("import sys; sys.path.insert(0, sys.argv[1]); import jaxconsdec.convert as c;"
          " print(c.__file__); import importlib.util as u;"
          " print(u.find_spec('convert') is None)")
  out = subprocess.run([sys.executable, "-c", code, str(unpacked)], capture_output=True,
                       text=True, timeout=120, cwd=str(tmp_path))
  assert out.returncode == 0, out.stderr[-3000:]
  where, no_top_level = out.stdout.split()
  assert where.startswith(str(unpacked)) and no_top_level == "True", out.stdout
