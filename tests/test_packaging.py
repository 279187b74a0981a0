"""The package as a user installs it: a wheel and an sdist, built from a copy of the sources,
installed with pip into a fresh virtual environment that has no editable install, and used
from a folder outside the repository.

Dependencies come from the machine's package index, as the README's install does.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run inside the installed environment: every module of the installed package imports, and
# it is the installed copy (not this checkout) that is found.
WALK = """\
import importlib, os, pkgutil, sys
import jaxconsdec
names = [m.name for m in pkgutil.walk_packages(jaxconsdec.__path__, "jaxconsdec.")]
for name in names:
  importlib.import_module(name)
print(os.path.dirname(jaxconsdec.__file__))
print(" ".join(sorted(names)))
"""


def _source_packages() -> set[str]:
  """Every package of the source tree, by its installed name."""
  found = set()
  for top, installed in (("jaxconsdec", "jaxconsdec"), ("convert", "jaxconsdec.convert")):
    for folder, _, files in os.walk(os.path.join(ROOT, top)):
      if "__init__.py" in files and "__pycache__" not in folder:
        rel = os.path.relpath(folder, os.path.join(ROOT, top))
        found.add(installed if rel == "." else installed + "." + rel.replace(os.sep, "."))
  return found


def _run(args, **kw):
  proc = subprocess.run(args, capture_output=True, text=True, timeout=900, **kw)
  assert proc.returncode == 0, f"{args}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
  return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """The wheel and the sdist, built by setuptools' PEP 517 hooks from a copy of the tree
  (so the build leaves nothing in it), with the setuptools of this environment."""
  tmp = tmp_path_factory.mktemp("dist")
  src = tmp / "src"
  shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
      ".venv*", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
  built = []
  for hook in ("build_wheel", "build_sdist"):  # one process each, as a build frontend does
    out = tmp / hook
    out.mkdir()
    code = f"import sys; from setuptools import build_meta; build_meta.{hook}(sys.argv[1])"
    _run([sys.executable, "-c", code, str(out)], cwd=str(src))
    [name] = os.listdir(out)
    built.append(out / name)
  return tuple(built)


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
  """A fresh environment: no site packages of this one, no editable install."""
  where = tmp_path_factory.mktemp("venv") / "env"
  _run([sys.executable, "-m", "venv", str(where)])
  return where


def test_wheel_holds_every_package_and_the_license(built):
  wheel, _ = built
  names = zipfile.ZipFile(wheel).namelist()
  tops = {n.split("/")[0] for n in names if ".dist-info/" not in n}
  assert tops == {"jaxconsdec"}, tops  # the converter only as jaxconsdec.convert
  packages = {os.path.dirname(n).replace("/", ".") for n in names if n.endswith("/__init__.py")}
  assert packages == _source_packages()
  assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names


def test_sdist_holds_the_sources_tests_and_license(built):
  _, sdist = built
  names = tarfile.open(sdist).getnames()
  stem = os.path.basename(sdist)[:-len(".tar.gz")]
  for path in ("LICENSE", "README.md", "pyproject.toml", "convert/formats.py",
               "jaxconsdec/models/unet.py", "jaxconsdec/training/loop.py"):
    assert f"{stem}/{path}" in names, path


def _check_installed(env, outside, tag: str) -> None:
  python, script = env / "bin" / "python", env / "bin" / "jaxconsdec"
  where, names = _run([str(python), "-c", WALK], cwd=str(outside)).stdout.splitlines()
  assert where.startswith(str(env)), where  # the installed copy, not the checkout
  assert {n for n in names.split()} | {"jaxconsdec"} >= _source_packages()
  assert "usage: jaxconsdec" in _run([str(script), "--help"], cwd=str(outside)).stdout
  out = outside / f"decoded-{tag}"
  _run([str(script), "decode", os.path.join(ROOT, "samples", "latents"), "-o", str(out),
        "--weights", os.path.join(ROOT, "samples", "demo", "model"), "--no-progress"],
       cwd=str(outside))
  assert sorted(os.listdir(out)) == ["astronaut.png", "chelsea.png", "coffee.png",
                                     "jaxconsdec-job.json"]


def test_wheel_then_sdist_install_and_work_from_outside_the_repository(built, venv,
                                                                       tmp_path):
  wheel, sdist = built
  pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
  _run([*pip, str(wheel)])
  _check_installed(venv, tmp_path, "wheel")
  # The sdist is built into a wheel by pip (in its own isolated build environment) and
  # replaces the installed copy; the dependencies are already there.
  _run([*pip, "--force-reinstall", "--no-deps", str(sdist)])
  _check_installed(venv, tmp_path, "sdist")
