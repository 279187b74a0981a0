#!/usr/bin/env bash
# The demo recipe's ablations (docs/training.md, "The demo's ablations"), exactly as run:
# short runs on the demo's photos, each evaluated on the whole held-out photos.
#   bash samples/demo/ablations.sh WORK_DIR VAE
# WORK_DIR holds the photos (python samples/demo/photos.py WORK_DIR). The table in the docs
# was measured with the demo's previous encoder (2000 steps; its model folder at commit
# 069be00: git worktree add OLD 069be00, then VAE=OLD/samples/demo/model). About 75 minutes
# of a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=${1:?usage: bash samples/demo/ablations.sh WORK_DIR VAE}
vae=${2:?usage: bash samples/demo/ablations.sh WORK_DIR VAE}
abl="$work/abl"
common=(--batch-size 8 --resolution 64 --vae "$vae" --ema-decay 0.995 --log-every 20
        --eval-images "$work/held_out" --no-progress)
# Stage 1 (denoising from scratch, 600 steps): the levels' law and grid.
stage1=(--objective denoising --config tiny --steps 600 --warmup 60 --lr 4e-4 --save-every 600
        --eval-every 200)
train() { jaxconsdec train "$work/train" --out "$abl/$1" "${@:2}" "${common[@]}"; }
# s1_ict was measured when denoising levels snapped to all 1024 rows; --curriculum 1 (rows
# 1..1008) differs from that only in giving row 1008 the law's 0.7% above it.
train s1_ict "${stage1[@]}" --curriculum 1                    # the old recipe: whole table
train s1_g16 "${stage1[@]}"                                   # snapped to G_16
train s1_g16_law1 "${stage1[@]}" --noise-law 1.0,2.0          # and a law centred higher
# Stage 2 (200 steps from s1_g16_law1): what consistency training does to it.
stage2=(--init "$abl/s1_g16_law1" --steps 200 --warmup 20 --save-every 200 --eval-every 100)
train c_denoise "${stage2[@]}" --objective denoising --lr 5e-5 --noise-law 1.0,2.0  # control
train c_old "${stage2[@]}" --lr 2e-4 --curriculum 16,8        # the old demo's stage 2
train c_law1_lr2e4 "${stage2[@]}" --lr 2e-4 --curriculum 16,8 --noise-law 1.0,2.0
train c_law1 "${stage2[@]}" --lr 5e-5 --curriculum 16,8 --noise-law 1.0,2.0
train c_uniform "${stage2[@]}" --lr 5e-5 --curriculum 16,8 --noise-law 1.0,2.0 \
  --pair-weighting uniform
train c_anchor50 "${stage2[@]}" --lr 5e-5 --curriculum 16,8 --noise-law 1.0,2.0 \
  --anchor-share 0.5
train c_ect "${stage2[@]}" --lr 5e-5 --curriculum 112,48,16 --noise-law 1.0,2.0
train c_ect1008 "${stage2[@]}" --lr 5e-5 --curriculum 1008,336,112,48,16 --noise-law 1.0,2.0
train c_gentle "${stage2[@]}" --lr 2e-5 --curriculum 1008,336,112,48,16 --noise-law 1.0,2.0 \
  --anchor-share 0.5
(cd samples/demo && python ablation_table.py "$work" ablations "$abl"/s1_ict "$abl"/s1_g16 \
  "$abl"/s1_g16_law1 "$abl"/c_denoise "$abl"/c_old "$abl"/c_law1_lr2e4 "$abl"/c_law1 "$abl"/c_uniform \
  "$abl"/c_anchor50 "$abl"/c_ect "$abl"/c_ect1008 "$abl"/c_gentle)
