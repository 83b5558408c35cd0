#!/usr/bin/env bash
# Zoo models on every fold of one dataset, one model after another, then the per-model table: the
# runs behind the notes' zoo tables (pooled OOF AUROC, fit s per fold, scoring img/s).
#
#   bash bench/zoo_runs.sh DATA WORK MODEL... [-- key=value ...]
#   bash bench/zoo_runs.sh ../shared/datasets/bsdata_tiles runs/zoo-table/bsdata_tiles fre-resnet18 cfa-resnet18 -- train.threads=1
#   CONFIG=configs/real.yaml bash bench/zoo_runs.sh ...   # another base config (default: configs/default.yaml)
#
# A model whose five folds are finished is skipped by the stage itself, so a stopped run resumes.
# Each model's wall time goes to WORK/walls.tsv; its log to WORK/logs/MODEL.log.
set -uo pipefail
cd "$(dirname "$0")/.."

DATA=${1:?usage: bash bench/zoo_runs.sh DATA WORK MODEL... [-- key=value ...]}
WORK=${2:?usage: bash bench/zoo_runs.sh DATA WORK MODEL... [-- key=value ...]}
shift 2
MODELS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do MODELS+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

ARGS=(--config "${CONFIG:-configs/default.yaml}" --set "paths.data=$DATA" --set "paths.work=$WORK/runs" --set "paths.submissions=$WORK/submissions")
for kv in "$@"; do ARGS+=(--set "$kv"); done
mkdir -p "$WORK/logs"

"$PY" -m competition folds "${ARGS[@]}" > "$WORK/logs/folds.log" 2>&1 || { cat "$WORK/logs/folds.log"; exit 1; }
for model in "${MODELS[@]}"; do
  start=$(date +%s)
  if "$PY" -m competition zoo --model "$model" --fold all "${ARGS[@]}" > "$WORK/logs/$model.log" 2>&1; then
    status=ok
  else
    status="failed ($?)"
  fi
  wall=$(( $(date +%s) - start ))
  printf '%s\t%s\t%s\n' "$model" "$wall" "$status" >> "$WORK/walls.tsv"
  echo "$model: $status in ${wall} s"
done
# The table covers the models of this call, in the experiment the config and overrides resolve to.
SETS=(); for kv in "$@"; do SETS+=("$kv"); done
experiment=$("$PY" -c 'import sys; from competition.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).experiment)' "${CONFIG:-configs/default.yaml}" "${SETS[@]}")
DIRS=(); for model in "${MODELS[@]}"; do [ -d "$WORK/runs/$experiment/$model" ] && DIRS+=("$WORK/runs/$experiment/$model"); done
[ ${#DIRS[@]} -gt 0 ] && "$PY" bench/zoo_table.py "${DIRS[@]}"
