#!/usr/bin/env bash
# The demo model, end to end, exactly as committed (about 45 minutes on a 2-core CPU: 13 for the encoder, 32 for the decoder):
# photos -> the small frozen encoder -> `jaxconsdec train` -> report -> sample latents.
#   bash samples/demo/train.sh WORK_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
work=${1:?usage: bash samples/demo/train.sh WORK_DIR}
python samples/demo/photos.py "$work"
python samples/demo/train_autoencoder.py "$work/train" "$work/vae" 2000
# A new decoder: stage 1, denoising pre-training from scratch; stage 2, consistency training
# from stage 1's model (docs/training.md, section 3).
common=(--batch-size 8 --resolution 64 --vae "$work/vae" --ema-decay 0.995 --save-every 200
        --eval-every 200 --log-every 10 --eval-images "$work/held_out" --no-progress)
jaxconsdec train "$work/train" --out "$work/stage1" --objective denoising --config tiny \
  --steps 800 --lr 4e-4 --warmup 100 "${common[@]}"
jaxconsdec train "$work/train" --out "$work/run" --init "$work/stage1" \
  --steps 500 --lr 2e-4 --warmup 50 --curriculum 16,8 "${common[@]}"
rm -rf samples/demo/model && cp -r "$work/run/model" samples/demo/model
rm -rf samples/demo/results && mkdir -p samples/demo/results
cp "$work/stage1/metrics.jsonl" samples/demo/results/stage1_metrics.jsonl
cp "$work/stage1/run.json" samples/demo/results/stage1_run.json
cp "$work/run/metrics.jsonl" "$work/run/run.json" samples/demo/results/
cp -r "$work/run/samples" samples/demo/results/run_samples
python samples/demo/report.py "$work/run" "$work/vae" "$work" samples/demo/results "$work/stage1"
python samples/make_latents.py
