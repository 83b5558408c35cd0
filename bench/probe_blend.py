"""Blend the probe's scores from two or more `bench/patch_llr_probe.py --save` runs (canvases, say): is a blend
better than its runs, on the folds' held-out images and on the test set?

Each image's held-out score comes from its own fold's model and each test score is the mean over the fold models,
all z-scored on the fold's held-out normals (as `--save` writes them), so a blend is a weighted sum of z-scores.
Prints the folds' mean held-out AUROC and the test AUROC of each run, of every pair's blends (weight w on the later
run) and, for three runs or more, of all of them with equal weights.

    python bench/probe_blend.py /tmp/probe256.csv /tmp/probe352.csv [/tmp/probe192.csv ...]
"""
from __future__ import annotations

import argparse
import itertools

import numpy as np
import pandas as pd

from competition.metrics import auroc


def aurocs(frame: pd.DataFrame, column: str) -> tuple[float, float]:
    """(mean over folds of the held-out AUROC, AUROC of the fold-averaged test scores)."""
    held = frame[frame["split"] == "held"]
    per_fold = [auroc(g["label"], g[column]) for _, g in held.groupby("fold")]
    test = frame[frame["split"] == "test"].groupby("image_id").agg(label=("label", "first"), score=(column, "mean"))
    return float(np.mean(per_fold)), auroc(test["label"], test["score"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="two or more --save files of the same folds")
    parser.add_argument("--column", default="probe",
                        help="the score column: probe or padim (patch_llr_probe.py), probe or lp (probe_finetune.py)")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    args = parser.parse_args()
    if len(args.runs) < 2:
        parser.error("give two --save files or more")
    keys = ["split", "fold", "image_id", "label"]
    frames = [pd.read_csv(path) for path in args.runs]
    both = frames[0][keys]
    for j, frame in enumerate(frames):
        both = both.merge(frame[keys + [args.column]].rename(columns={args.column: j}), on=keys, validate="1:1")
    if any(len(frame) != len(both) for frame in frames):
        raise SystemExit(f"the runs score different images or folds ({[len(f) for f in frames]}, {len(both)} in "
                         "common)")
    blends = [(path, {j: 1.0}) for j, path in enumerate(args.runs)]
    for j, k in itertools.combinations(range(len(frames)), 2):
        blends += [(f"{j}+{k}, w={w}", {j: 1 - w, k: w}) for w in args.weights]
    if len(frames) > 2:
        blends.append(("all, equal weights", {j: 1.0 for j in range(len(frames))}))
    rows = []
    for name, weights in blends:
        both["blend"] = sum(w * both[j] for j, w in weights.items())
        held, test = aurocs(both, "blend")
        rows.append({"scores": name, "held-out AUROC (fold mean)": held, "test AUROC": test})
    print(pd.DataFrame(rows).round(4).to_string(index=False))


if __name__ == "__main__":
    main()
