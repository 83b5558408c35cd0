#!/usr/bin/env bash
# Does a refactor keep the numbers? Fold 0 of the classifier, patchcore-resnet18, padim-resnet18 and
# fastflow-resnet18 on the tiny synthetic set (configs/quick.yaml, one thread), once with the code of
# REV (a git worktree) and once with the working tree; prints both md5 lists and SAME or DIFFERENT.
#
#   bash bench/same_predictions.sh 0c5eb98      # a few minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:?usage: bash bench/same_predictions.sh REV}
PY=${PY:-$PWD/.venv/bin/python}
WORK=$(mktemp -d)
trap 'git worktree remove --force "$WORK/base" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
git worktree add --detach "$WORK/base" "$REV" >/dev/null 2>&1

predictions() {  # predictions SOURCE_TREE OUT: md5 of every oof.csv / test.csv, paths relative to OUT
  local src=$1 out=$2
  local sets=(--config configs/quick.yaml --set "paths.data=$WORK/tiny" --set "paths.work=$out/runs"
              --set "paths.submissions=$out/subs" --set train.threads=1)
  (
    cd "$src"
    export PYTHONPATH="$src" OMP_NUM_THREADS=1
    "$PY" -m competition folds "${sets[@]}" >/dev/null
    "$PY" -m competition train --fold 0 "${sets[@]}" >/dev/null 2>&1
    for model in patchcore-resnet18 padim-resnet18 fastflow-resnet18; do
      "$PY" -m competition zoo --model "$model" --fold 0 "${sets[@]}" >/dev/null 2>&1
    done
  )
  (cd "$out" && find runs -name oof.csv -o -name test.csv | sort | xargs md5sum)
}

"$PY" -m competition synth --preset tiny --out "$WORK/tiny" >/dev/null
echo "== $REV"
predictions "$WORK/base" "$WORK/out-base" | tee "$WORK/base.md5"
echo "== working tree"
predictions "$PWD" "$WORK/out-now" | tee "$WORK/now.md5"
if diff -q "$WORK/base.md5" "$WORK/now.md5" >/dev/null; then echo SAME; else echo DIFFERENT; exit 1; fi
