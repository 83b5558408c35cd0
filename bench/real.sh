#!/usr/bin/env bash
# A config end to end on any competition-layout dataset, with the figures a real-data claim needs:
# OOF macro-F1 and AUROC per model and for the ensemble, Public/Private macro-F1 when answers.csv
# sits beside test/, and the wall time of each stage.
#
#   bash bench/real.sh DATA [CONFIG] [key=value ...]
#   bash bench/real.sh ../shared/datasets/deeppcb configs/real.yaml train.threads=1
#
# Outputs go to $WORK (default runs/bench-real/<dataset>-<config>), so runs of different datasets
# and configs never mix; a re-run resumes or skips finished folds like any stage.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${1:?usage: bash bench/real.sh DATA [CONFIG] [key=value ...]}
CONFIG=${2:-configs/default.yaml}
shift $(( $# >= 2 ? 2 : 1 ))
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
NAME="$(basename "$(realpath "$DATA")")-$(basename "$CONFIG" .yaml)"
WORK=${WORK:-runs/bench-real/$NAME}

ARGS=(--config "$CONFIG" --set "paths.data=$DATA" --set "paths.work=$WORK/runs"
      --set "paths.submissions=$WORK/submissions")
for kv in "$@"; do ARGS+=(--set "$kv"); done

declare -a STAGES=()
TIMES=$(mktemp)
trap 'rm -f "$TIMES"' EXIT
CPU=0
read_cpu() {  # CPU: seconds (user + system) of every finished child so far, from bash's `times` run in this
  times > "$TIMES"  # shell (in a pipe or $(...) it would describe a fresh subshell, whose children are none)
  CPU=$(tail -n 1 "$TIMES" | awk '{ s = 0; for (i = 1; i <= NF; i++) { split($i, t, "m"); s += t[1] * 60 + t[2] }
                                   printf "%d", s }')
}
stage() {  # stage NAME COMMAND...: run, time (wall and CPU), remember
  local name=$1 start cpu_start
  shift
  start=$(date +%s)
  read_cpu
  cpu_start=$CPU
  echo "== $name: $*"
  "$@"
  read_cpu
  STAGES+=("$name $(( $(date +%s) - start )) $(( CPU - cpu_start ))")
}

TOTAL_START=$(date +%s)
stage check-data "$PY" -m competition check-data --data "$DATA"
stage folds "$PY" -m competition folds "${ARGS[@]}"
PSEUDO=$("$PY" -c "import sys; from competition.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).pseudo.enabled)" "$CONFIG" "$@")
if [ "$PSEUDO" = True ]; then  # a second round (its config or a key=value says so): pick its pseudo-labels first
  stage pseudo "$PY" -m competition pseudo "${ARGS[@]}"
fi
stage train "$PY" -m competition train --fold all "${ARGS[@]}"
stage zoo "$PY" -m competition zoo --fold all "${ARGS[@]}"
stage infer "$PY" -m competition infer "${ARGS[@]}"
stage leaderboard "$PY" -m competition leaderboard "${ARGS[@]}"
TOTAL=$(( $(date +%s) - TOTAL_START ))

echo
echo "== $NAME: per model and ensemble (submissions/leaderboard.csv)"
"$PY" - "$WORK/submissions/leaderboard.csv" <<'EOF'
import sys

import pandas as pd

table = pd.read_csv(sys.argv[1])
columns = [c for c in ["model", "kind", "oof_macro_f1", "oof_auroc", "threshold", "public", "private"]
           if c in table.columns]
print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
EOF
ANSWERS="$DATA/answers.csv"
if [ -f "$ANSWERS" ]; then
  echo
  echo "== submission against $ANSWERS"
  "$PY" -m competition score --submission "$WORK/submissions/submission.csv" --answers "$ANSWERS"
fi
echo
echo "== time per stage: wall s, CPU s (all threads; on a virtual machine whose host steals CPU time, the wall"
echo "   grows and the CPU seconds hardly move: \`vmstat 2\` shows the steal in its st column)"
TOTAL_CPU=0
for s in "${STAGES[@]}"; do echo "  $s"; TOTAL_CPU=$(( TOTAL_CPU + ${s##* } )); done
echo "  total $TOTAL $TOTAL_CPU"
