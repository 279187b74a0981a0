#!/usr/bin/env bash
# Every GPU figure benchmarks/README.md asks for, in one command (about 8 minutes on one H100):
#   1. 512², batch 8, bf16: images/s and MFU against diffusers fp16 eager and fp16 +
#      channels_last + torch.compile            -> results/decode_speed_gpu_512.{json,md}
#   2. 1024², batch 4, bf16, against fp16 eager -> results/decode_speed_gpu_1024.{json,md}
#   3. 1024², batch 1, bf16: the device's peak memory of one decode (target <= 8 GiB)
#                                                -> results/decode_speed_gpu_1024_b1.{json,md}
#   4. compiled memory (XLA's analysis) at 1024², bf16 and f32 -> results/memory_gpu.json
#   5. training: one released-width trainer step at 256², batch 8, bf16: images/s and MFU
#                                                -> results/train_throughput_gpu.{json,md}
#   6. `jaxconsdec parity` at the released widths (random weights), 512², batch 2, fp32 and
#      bf16: each block's and the decode's error against diffusers, and both sides' times
#                                                -> results/parity_gpu.{json,md}
# Each step is its own process, so each peak belongs to its step.
#
# The GPU machine's Python has jax (CUDA), flax, optax, orbax-checkpoint and torch, and no
# network: diffusers and the rest come from benchmarks/wheels (make it here with
# benchmarks/fetch_wheels.sh and carry it along). jaxconsdec itself runs from the tree.
#
#   bash benchmarks/gpu_check.sh            # on the GPU
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: tiny widths, 64², the same steps
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# JAX would otherwise take 75% of the GPU at start, leaving torch (the reference) too little.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

if ! python3 -c "import diffusers, tqdm, PIL" 2>/dev/null; then
  if [ ! -d benchmarks/wheels ]; then
    echo "diffusers is not installed and benchmarks/wheels is missing: run" \
         "benchmarks/fetch_wheels.sh where PyPI is reachable and carry the folder" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --find-links benchmarks/wheels \
    diffusers==0.42.1 "tqdm>=4.66,<5" "Pillow>=12,<14"
fi
if ! (cd / && env -u PYTHONPATH python3 -c "import jaxconsdec.convert" 2>/dev/null); then
  python3 -m pip install -q --no-deps --no-index --find-links benchmarks/wheels jaxconsdec
fi

# `jaxconsdec parity` runs the installed package, from outside the tree (whose jaxconsdec/
# lacks the convert subpackage), on a diffusers folder of random released-width weights.
parity() {
  local weights
  weights=$(mktemp -d)
  python3 benchmarks/parity_weights.py "$weights/vae" "${@:1:2}"
  (cd "$weights" && env -u PYTHONPATH python3 -m jaxconsdec parity "$weights/vae" "${@:3}") \
    || echo "parity: exit status $? (1: an error above its bound; see the table)" >&2
  rm -rf "$weights"
}

if [ "${1:-}" = "--dry-run" ]; then
  out=benchmarks/results/dry_run
  mkdir -p "$out"
  common=(--tiny --dtype bfloat16 --repeats 1)
  python3 benchmarks/decode_speed.py "${common[@]}" --sizes 64 --batches 2 \
    --reference fp16,fp16-compile --out "$out/decode_speed_512"
  python3 benchmarks/decode_speed.py "${common[@]}" --sizes 64 --batches 2 --reference fp16 \
    --out "$out/decode_speed_1024"
  python3 benchmarks/decode_speed.py "${common[@]}" --sizes 64 --batches 1 --reference fp16 \
    --out "$out/decode_speed_1024_b1"
  python3 benchmarks/memory.py --sizes 64 --devices 1 --out "$out/memory.json"
  python3 benchmarks/train_speed.py throughput --tiny --size 64 --batch 2 --repeats 1 \
    --out "$out/train_throughput"
  parity --widths tiny --size 64 --batch 1 --dtype float32,bfloat16 --repeats 1 \
    --out "$PWD/$out/parity"
  echo "dry run done: $out"
  exit 0
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  | tee benchmarks/results/gpu_device.txt
python3 benchmarks/decode_speed.py --sizes 512 --batches 8 --dtype bfloat16 --repeats 3 \
  --reference fp16,fp16-compile --out benchmarks/results/decode_speed_gpu_512
python3 benchmarks/decode_speed.py --sizes 1024 --batches 4 --dtype bfloat16 --repeats 2 \
  --reference fp16 --out benchmarks/results/decode_speed_gpu_1024
python3 benchmarks/decode_speed.py --sizes 1024 --batches 1 --dtype bfloat16 --repeats 2 \
  --reference fp16 --out benchmarks/results/decode_speed_gpu_1024_b1
python3 benchmarks/memory.py --sizes 1024 --devices 1 --out benchmarks/results/memory_gpu.json
python3 benchmarks/train_speed.py throughput --size 256 --batch 8 --dtype bfloat16 --repeats 3 \
  --out benchmarks/results/train_throughput_gpu
parity --widths released --size 512 --batch 2 --dtype float32,bfloat16 --repeats 3 \
  --out "$PWD/benchmarks/results/parity_gpu"
