#!/usr/bin/env bash
# The demo model, end to end, exactly as committed (about 80 minutes on a 2-core CPU: ~30
# for the encoder, ~30 for stage 1, ~5 for stage 2):
# photos -> the small frozen encoder -> `jaxconsdec train` (two stages) -> report -> latents.
#   pip install scikit-learn matplotlib   # the unseen photos of the report
#   bash samples/demo/train.sh WORK_DIR
# The choices below are measured in docs/training.md ("The demo's ablations").
set -euo pipefail
cd "$(dirname "$0")/../.."
work=${1:?usage: bash samples/demo/train.sh WORK_DIR}
python samples/demo/photos.py "$work"
python samples/demo/train_autoencoder.py "$work/train" "$work/vae" 4000
# A new decoder. Both stages draw noise levels from a lognormal centred higher than iCT's
# (the decoder samples at the top of the table); stage 1 snaps them to the sampler's grid.
common=(--batch-size 8 --resolution 64 --vae "$work/vae" --ema-decay 0.995
        --noise-law 1.0,2.0 --log-every 20 --eval-images "$work/held_out" --no-progress)
# Stage 1: denoising pre-training from scratch.
jaxconsdec train "$work/train" --out "$work/stage1" --objective denoising --config tiny \
  --steps 2400 --lr 4e-4 --warmup 100 --save-every 400 --eval-every 400 "${common[@]}"
# Stage 2: consistency training from stage 1's model at a low learning rate, ECT's
# coarse-to-fine start (the first grid holds one pair: the clean image as the top level's
# teacher) and half the examples anchored to the clean image; the ablations' c_gentle.
jaxconsdec train "$work/train" --out "$work/run" --init "$work/stage1" \
  --steps 200 --lr 2e-5 --warmup 20 --curriculum 1008,336,112,48,16 --anchor-share 0.5 \
  --save-every 100 --eval-every 100 "${common[@]}"
rm -rf samples/demo/model && cp -r "$work/run/model" samples/demo/model
rm -rf samples/demo/results && mkdir -p samples/demo/results
cp "$work/stage1/metrics.jsonl" samples/demo/results/stage1_metrics.jsonl
cp "$work/stage1/run.json" samples/demo/results/stage1_run.json
cp "$work/run/metrics.jsonl" "$work/run/run.json" samples/demo/results/
cp -r "$work/run/samples" samples/demo/results/run_samples
(cd samples/demo && python report.py "$work/run" "$work/stage1" "$work/vae" "$work" results)
python samples/make_latents.py
