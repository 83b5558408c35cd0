"""Blend the probe's scores from two `bench/patch_llr_probe.py --save` runs (two canvases, say): is the pair better
than either, on the folds' held-out images and on the test set?

Each image's held-out score comes from its own fold's model and each test score is the mean over the fold models,
all z-scored on the fold's held-out normals (as `--save` writes them), so a blend is a plain sum of z-scores. Prints
the folds' mean held-out AUROC and the test AUROC of each run and of their blends, weight w on the second run.

    python bench/probe_blend.py /tmp/probe256.csv /tmp/probe352.csv
"""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score


def aurocs(frame: pd.DataFrame, column: str) -> tuple[float, float]:
    """(mean over folds of the held-out AUROC, AUROC of the fold-averaged test scores)."""
    held = frame[frame["split"] == "held"]
    per_fold = [roc_auc_score(g["label"], g[column]) for _, g in held.groupby("fold")]
    test = frame[frame["split"] == "test"].groupby("image_id").agg(label=("label", "first"), score=(column, "mean"))
    return float(np.mean(per_fold)), float(roc_auc_score(test["label"], test["score"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--column", default="probe", choices=["probe", "padim"])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    args = parser.parse_args()
    keys = ["split", "fold", "image_id", "label"]
    a, b = pd.read_csv(args.first), pd.read_csv(args.second)
    both = a[keys + [args.column]].merge(b[keys + [args.column]], on=keys, suffixes=("_a", "_b"), validate="1:1")
    if len(both) != len(a) or len(both) != len(b):
        raise SystemExit(f"the two runs score different images or folds ({len(a)}, {len(b)}, {len(both)} in common)")
    rows = []
    for name, w in [("first", 0.0), ("second", 1.0)] + [(f"blend w={w}", w) for w in args.weights]:
        both["blend"] = (1 - w) * both[f"{args.column}_a"] + w * both[f"{args.column}_b"]
        held, test = aurocs(both, "blend")
        rows.append({"scores": name, "held-out AUROC (fold mean)": held, "test AUROC": test})
    print(pd.DataFrame(rows).round(4).to_string(index=False))


if __name__ == "__main__":
    main()
