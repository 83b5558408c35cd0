#!/usr/bin/env bash
# On a machine with a CUDA GPU: `make all CONFIG=configs/full.yaml EXECUTOR=ray` on the `full` preset for at
# most LIMIT seconds (default 600), then each stage's time and the training and scoring images per second.
# A CPU machine skips it (exit 0). Run from the repository root:  bash bench/gpu_check.sh
#   LIMIT=600        seconds the pipeline may run (the data is written first, outside the limit)
#   JOB_CPUS=4       CPUs (threads, loader workers) per Ray job; GPU_SHARE=0.25: four jobs share one GPU
#   EXECUTOR=ray     or serial (one job at a time, every core)
#   EXTRA_SET="k=v"  more config overrides, e.g. fewer epochs so that every stage finishes inside LIMIT
# The run stops where the limit falls; jobs.csv holds every job finished by then (bench/scaling.py reads it).
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT=${LIMIT:-600}
JOB_CPUS=${JOB_CPUS:-4}
GPU_SHARE=${GPU_SHARE:-0.25}
EXECUTOR=${EXECUTOR:-ray}
EXTRA_SET=${EXTRA_SET:-}
DATA=input/synthetic-full

make setup >/dev/null || exit 1
if ! .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU here; skipped"
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s)
make data PRESET=full DATA=$DATA >/dev/null || exit 1
echo "gpu_check: full preset written in $(( $(date +%s) - start )) s"

workers=$(( JOB_CPUS > 1 ? JOB_CPUS - 1 : 0 ))
start=$(date +%s)
timeout "$LIMIT" make all CONFIG=configs/full.yaml EXECUTOR="$EXECUTOR" \
    SET="executor.num_cpus=$JOB_CPUS executor.num_gpus=$GPU_SHARE train.num_workers=$workers zoo.num_workers=$workers $EXTRA_SET"
status=$?
echo "gpu_check: make all exited $status after $(( $(date +%s) - start )) s (124: stopped at the ${LIMIT} s limit)"
.venv/bin/python bench/scaling.py --presets --gpu-jobs runs/full/full/_run/jobs.csv
