"""Where a stack's test errors are: at the threshold that maximises the test macro-F1 (the best a threshold could do
on these scores), the missed defects and the false alarms, each with every member's percentile rank among the test
images, so one sees whether a miss is every member's or one member's.

    python bench/stack_errors.py runs/bench-real/bsdata_tiles-real-probe/runs/real-p5 \
        ../shared/datasets/bsdata_tiles/answers.csv

Reads `answers.csv` (a bench script; the pipeline never does) and the stack's `_ensemble/test.csv`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", help="a stacked experiment's folder (holding _ensemble/test.csv)")
    parser.add_argument("answers", help="the answer key, ImageId,answer[,Usage]")
    args = parser.parse_args()
    test = pd.read_csv(Path(args.experiment) / "_ensemble" / "test.csv").set_index("image_id")
    answers = pd.read_csv(args.answers).set_index("ImageId")
    truth = answers.loc[[Path(i).stem for i in test.index], "answer"].to_numpy()
    score = test["score"].to_numpy()
    best_f1, threshold = max((f1_score(truth, score >= t, average="macro"), t) for t in np.unique(score))
    members = [c for c in test.columns if c not in ("score", "answer")]
    ranks = test[members].rank(pct=True).round(2).assign(stack=test["score"].round(3))
    missed, alarms = ranks[(truth == 1) & (score < threshold)], ranks[(truth == 0) & (score >= threshold)]
    print(f"best threshold {threshold:.4g}: macro-F1 {best_f1:.3f} on all {len(test)} test images; "
          f"{len(missed)} missed defects, {len(alarms)} false alarms (defects: {int(truth.sum())})")
    print(f"members' median percentile rank: missed defects {missed[members].median().round(2).to_dict()}")
    print(f"                                 false alarms   {alarms[members].median().round(2).to_dict()}")
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print("missed defects, lowest stack score first\n" + missed.sort_values("stack").to_string())
        print("false alarms, lowest stack score first\n" + alarms.sort_values("stack").to_string())


if __name__ == "__main__":
    main()
