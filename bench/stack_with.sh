#!/usr/bin/env bash
# A finished experiment's stack with more models: its model folders and the given ones (finished runs on
# the same folds.csv, e.g. from bench/zoo_runs.sh) copied into a new experiment, stacked with `infer`
# and scored against answers.csv. Measures whether extra members help the ensemble, without refitting.
#
#   bash bench/stack_with.sh DATA CONFIG WORK FROM TO MODEL_DIR... [-- key=value ...]
#   bash bench/stack_with.sh ../shared/datasets/bsdata_tiles configs/real.yaml runs/bench-pseudo/bsdata_tiles-real \
#       real real-zoo runs/zoo-table/bsdata_tiles/runs/default/fre-resnet18
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash bench/stack_with.sh DATA CONFIG WORK FROM TO MODEL_DIR... [-- key=value ...]"
DATA=${1:?$usage}; CONFIG=${2:?$usage}; WORK=${3:?$usage}; FROM=${4:?$usage}; TO=${5:?$usage}
shift 5
MODELS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do MODELS+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
cmp -s "$WORK/runs/folds.csv" "$(dirname "$(dirname "${MODELS[0]}")")/folds.csv" \
  || { echo "the added models were fitted on another folds.csv"; exit 1; }

mkdir -p "$WORK/runs/$TO"
# a model folder without its fitted models (model.pt): the stack reads the scores, and deeppcb's fold models
# take a gigabyte a copy
copy_scores() { tar -C "$(dirname "$1")" --exclude=model.pt -cf - "$(basename "$1")" | tar -C "$WORK/runs/$TO" -xf -; }
for model in "$WORK/runs/$FROM"/*/; do
  case "$(basename "$model")" in _*) continue;; esac
  copy_scores "${model%/}"
done
for model in "${MODELS[@]}"; do copy_scores "${model%/}"; done
ARGS=(--config "$CONFIG" --set "paths.data=$DATA" --set "paths.work=$WORK/runs"
      --set "paths.submissions=$WORK/submissions" --set "experiment=$TO")
for kv in "$@"; do ARGS+=(--set "$kv"); done
"$PY" -m competition infer "${ARGS[@]}"
"$PY" -m competition score --submission "$WORK/submissions/$TO.csv" --answers "$DATA/answers.csv"
