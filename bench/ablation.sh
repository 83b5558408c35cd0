#!/bin/bash
# The in-domain ablation: what each in-domain ingredient adds to the classifier (5-fold out-of-fold
# scores), and the zoo's feature models on random vs self-supervised resnet18. One thread per run.
#
#   bash bench/ablation.sh DATA WORK     # e.g. input/synthetic runs/ablation  (about an hour on one core)
#   (ends with the leaderboard of WORK; again: python -m competition leaderboard --set paths.work=WORK ...)
#
# Experiments (each a classifier on all folds): base (random init, real defects oversampled only),
# pos (+ painted positives), mask (+ mask head), pre (+ NT-Xent pretraining), all (all three);
# zoo: padim / patchcore on random-init resnet18 vs padim-ssl / patchcore-ssl (ZOO_MODELS=... to choose).
set -euo pipefail
DATA=${1:?dataset folder}; WORK=${2:?work folder}
PY=${PYTHON:-.venv/bin/python}
S=(--set "paths.data=$DATA" --set "paths.work=$WORK" --set "paths.submissions=$WORK/submissions" --set train.threads=1)
B0="$WORK/pretrain/efficientnet_b0.safetensors"
run() { echo "== $* ($(date +%T))"; "$PY" -m competition "$@" "${S[@]}"; }

run folds
run train --fold all --set experiment=base --set positives.ratio=0 --set mask_head.enabled=false
[ -f "$B0" ] || run pretrain
run train --fold all --set experiment=all --set "model.pretrained=$B0"
run train --fold all --set experiment=pos --set mask_head.enabled=false
run train --fold all --set experiment=mask --set positives.ratio=0
run train --fold all --set experiment=pre --set positives.ratio=0 --set mask_head.enabled=false \
    --set "model.pretrained=$B0"
[ -f "$WORK/pretrain/resnet18.safetensors" ] || run pretrain --set pretrain.backbone=resnet18
for model in ${ZOO_MODELS:-padim-resnet18 padim-ssl patchcore-resnet18 patchcore-ssl}; do
  run zoo --model "$model" --fold all --set experiment=zoo --set pretrain.backbone=resnet18
done
run leaderboard
