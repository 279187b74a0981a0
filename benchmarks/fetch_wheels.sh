#!/usr/bin/env bash
# Downloads the wheels gpu_check.sh installs on a GPU machine that has no network: diffusers
# (the PyTorch reference) and whatever of its and jaxconsdec's pure-Python dependencies such a
# machine may lack, and builds jaxconsdec's own wheel from this tree (`jaxconsdec parity` runs
# installed: the tree alone has no jaxconsdec.convert). Run it again after changing the tree. Run it here, where PyPI is reachable; the folder is git-ignored and is
# carried to the GPU machine with the working tree (the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip download -q -d wheels --only-binary=:all: --python-version 3.11 \
  diffusers==0.42.1 "tqdm>=4.66,<5" "Pillow>=12,<14" "tensorboardX>=2.6,<3"
rm -f wheels/jaxconsdec-*.whl
python3 -m pip wheel -q --no-deps -w wheels ..
du -sh wheels
