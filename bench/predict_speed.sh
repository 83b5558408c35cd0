#!/usr/bin/env bash
# Images per second and peak memory of `predict` on a finished experiment, for each runtime, on the
# test images and on a folder COPIES times larger (links to them): memory must not grow with the folder.
#
#   bash bench/predict_speed.sh [CONFIG] [COPIES] [key=value ...]
#   bash bench/predict_speed.sh configs/default.yaml 10 paths.data=/tmp/small/data paths.work=/tmp/small/runs \
#        paths.submissions=/tmp/small/sub
#
# Runtimes other than torch need `make export FORMAT=onnx` (onnxruntime) / `FORMAT=openvino` first; a
# runtime whose graphs are missing is reported and skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

CONFIG=${1:-configs/default.yaml}
COPIES=${2:-10}
shift $(( $# >= 2 ? 2 : $# ))
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
ARGS=(--config "$CONFIG")
for kv in "$@"; do ARGS+=(--set "$kv"); done
DATA=$("$PY" -c "import sys; from competition.config import load_config; \
print(load_config(sys.argv[1], sys.argv[2:]).paths.data)" "$CONFIG" "$@")

SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$SCRATCH/many"
for i in $(seq 1 "$COPIES"); do
  for f in "$DATA"/test/images/*; do ln -s "$(realpath "$f")" "$SCRATCH/many/${i}_$(basename "$f")"; done
done

printf "%-12s %-8s %8s %10s %12s %s\n" runtime images seconds "images/s" "peak RSS MB" exit
for runtime in torch onnxruntime openvino; do
  folders=("$DATA/test/images")
  [ "$COPIES" -gt 0 ] && folders+=("$SCRATCH/many")  # COPIES=0: the test images only
  for folder in "${folders[@]}"; do
    n=$(find -L "$folder" -type f | wc -l)
    start=$(date +%s.%N)
    /usr/bin/time -f "%M" -o "$SCRATCH/rss" "$PY" -m competition predict "${ARGS[@]}" --images "$folder" \
      --out "$SCRATCH/out.csv" --runtime "$runtime" > "$SCRATCH/log" 2>&1
    code=$?
    end=$(date +%s.%N)
    if [ $code -ne 0 ] && [ $code -ne 1 ]; then
      printf "%-12s %-8s %s\n" "$runtime" "$n" "failed: $(grep -m1 '^error' "$SCRATCH/log")"
      break
    fi
    rate=$(grep -o '([0-9.]* images/s' "$SCRATCH/log" | tr -d '(' | cut -d' ' -f1)
    parity=""
    if [ "$folder" = "$DATA/test/images" ]; then  # against the submission infer wrote
      parity=$("$PY" - "$SCRATCH/out.csv" "$CONFIG" "$@" <<'PYEOF'
import os
import sys
import pandas as pd
from competition.config import load_config
from competition.folds import load_index
cfg = load_config(sys.argv[2], sys.argv[3:])
index = load_index(cfg)
ids = {os.path.realpath(p): i for p, i in zip(index["path"].astype(str), index["image_id"].astype(str))}
out = pd.read_csv(sys.argv[1], keep_default_na=False)
submission = pd.read_csv(f"{cfg.paths.submissions}/{cfg.experiment}.csv", dtype=str).set_index("ImageId")["answer"]
same = sum(submission[ids[os.path.realpath(p)]] == str(a) for p, a in zip(out["path"], out["answer"]))
print(f"answers equal to {cfg.experiment}.csv: {same}/{len(submission)}")
PYEOF
)
    fi
    printf "%-12s %-8s %8.1f %10s %12d %s %s\n" "$runtime" "$n" "$(echo "$end - $start" | bc)" "$rate" \
      $(( $(cat "$SCRATCH/rss") / 1024 )) "$code" "$parity"
  done
done
