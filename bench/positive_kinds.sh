#!/usr/bin/env bash
# What each synthetic-positive kind adds: the supervised model of a finished run trained again on the same folds
# with other `positives.kinds` (one experiment per variant), each stacked with that run's zoo (bench/stack_with.sh)
# and scored: the training wall time, the model's OOF / test AUROC, and the stack's Public/Private macro-F1.
# Measures transplant and NSA on real sets without refitting the zoo.
#
#   bash bench/positive_kinds.sh DATA CONFIG WORK FROM NAME KINDS [NAME KINDS ...] [-- key=value ...]
#   bash bench/positive_kinds.sh ../shared/datasets/bsdata_tiles configs/real.yaml runs/bench-real/bsdata_tiles-real-p5 \
#       real no-transplant "[scratch,crack,hole,stain,cutpaste_scar]" \
#       nsa "[transplant,nsa,scratch,crack,hole,stain,cutpaste_scar]"
#
# A variant already trained (its folds finished) is not trained again: the train stage skips finished folds.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash bench/positive_kinds.sh DATA CONFIG WORK FROM NAME KINDS [NAME KINDS ...] [-- key=value ...]"
DATA=${1:?$usage}; CONFIG=${2:?$usage}; WORK=${3:?$usage}; FROM=${4:?$usage}
shift 4
NAMES=(); KINDS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do NAMES+=("$1"); KINDS+=("${2:?$usage}"); shift 2; done
[ "${1:-}" = "--" ] && shift
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
ARGS=(--config "$CONFIG" --set "paths.data=$DATA" --set "paths.work=$WORK/runs"
      --set "paths.submissions=$WORK/submissions")
for kv in "$@"; do ARGS+=(--set "$kv"); done

for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]}
  start=$(date +%s)
  "$PY" -m competition train --fold all "${ARGS[@]}" --set "experiment=$name" --set "positives.kinds=${KINDS[$i]}"
  echo "== $name: positives.kinds=${KINDS[$i]}, trained in $(( $(date +%s) - start )) s"
  model=$(find "$WORK/runs/$name" -mindepth 1 -maxdepth 1 -type d ! -name '_*' | head -n 1)
  bash bench/stack_with.sh "$DATA" "$CONFIG" "$WORK" "$FROM" "$name-stack" "$model" -- "$@"
done
for name in "$FROM" "${NAMES[@]}"; do
  stack=$name-stack
  [ "$name" = "$FROM" ] && stack=$FROM
  echo "== $stack"
  "$PY" bench/test_auroc.py "$WORK/runs/$stack" "$DATA/answers.csv"
  "$PY" -m competition score --submission "$WORK/submissions/$stack.csv" --answers "$DATA/answers.csv" | tail -n 3
done
