#!/usr/bin/env bash
# Downloads the wheels gpu_check.sh installs on a GPU machine that has no network: diffusers
# (the PyTorch reference) and whatever of its and jaxconsdec's pure-Python dependencies such a
# machine may lack. Run it here, where PyPI is reachable; the folder is git-ignored and is
# carried to the GPU machine with the working tree (the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip download -q -d wheels --only-binary=:all: --python-version 3.11 \
  diffusers==0.42.1 "tqdm>=4.66,<5" "Pillow>=12,<14"
du -sh wheels
