#!/usr/bin/env bash
# Pseudo-labels measured: a config end to end (round 1), then the same config as a second experiment
# trained with round 1's confident test images (round 2), both scored on the answer key's Public and
# Private splits. The OOF CV cannot see what pseudo-labels do to the test set; the answer key can.
#
#   bash bench/pseudo.sh DATA CONFIG [key=value ...]
#   bash bench/pseudo.sh ../shared/datasets/bsdata_tiles configs/real.yaml train.threads=1
#
# Both rounds share $WORK (default runs/bench-pseudo/<dataset>-<config>): folds, caches, and round 1's
# stacker output that round 2 reads. Extra key=value pairs go to both rounds.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${1:?usage: bash bench/pseudo.sh DATA CONFIG [key=value ...]}
CONFIG=${2:?usage: bash bench/pseudo.sh DATA CONFIG [key=value ...]}
shift 2
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export WORK=${WORK:-runs/bench-pseudo/$(basename "$(realpath "$DATA")")-$(basename "$CONFIG" .yaml)}
FIRST=$("$PY" -c "import sys; from competition.config import load_config; print(load_config(sys.argv[1]).experiment)" "$CONFIG")

echo "=== round 1: $FIRST"
bash bench/real.sh "$DATA" "$CONFIG" "$@"
echo
echo "=== round 2: $FIRST-pseudo (pseudo-labels from $FIRST)"
bash bench/real.sh "$DATA" "$CONFIG" "$@" "experiment=$FIRST-pseudo" pseudo.enabled=true "pseudo.source=$FIRST"
echo
echo "=== pseudo-labels picked ($WORK/runs/$FIRST-pseudo/pseudo.json)"
cat "$WORK/runs/$FIRST-pseudo/pseudo.json"
echo
ANSWERS="$DATA/answers.csv"
if [ -f "$ANSWERS" ]; then
  echo "=== pseudo-labels against $ANSWERS"
  "$PY" bench/pseudo_pick.py "$WORK/runs/$FIRST-pseudo/pseudo.csv" "$ANSWERS"
fi
