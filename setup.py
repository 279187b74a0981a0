"""Only the package list, which pyproject.toml cannot express: every package under
jaxconsdec/ is found, and the top-level convert/ folder (the project's layout) installs as
jaxconsdec.convert. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

CONVERT = {"jaxconsdec.convert" + p[len("convert"):]: p.replace(".", "/")
           for p in find_packages(include=["convert", "convert.*"])}
setup(packages=find_packages(include=["jaxconsdec", "jaxconsdec.*"]) + sorted(CONVERT),
      package_dir=CONVERT)
