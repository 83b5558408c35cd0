"""A trained model's validation curve per fold: one line per fold with a column's value at every validated epoch,
read from each fold's `history.csv`. Shows whether a fold had taken off when its schedule ended.

    .venv/bin/python bench/histories.py RUNS/EXPERIMENT/MODEL [--column val_auroc]
    .venv/bin/python bench/histories.py runs/bench-real/deeppcb-real-bf16/runs/real/segdec
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a model folder holding fold<k>/history.csv")
    parser.add_argument("--column", default="val_auroc")
    args = parser.parse_args()
    folds = sorted(args.model.glob("fold*/history.csv"), key=lambda p: int(p.parent.name[4:]))
    if not folds:
        raise SystemExit(f"{args.model}: no fold<k>/history.csv")
    for path in folds:
        history = pd.read_csv(path)
        validated = history.dropna(subset=[args.column])
        epochs = validated["epoch"].astype(int).tolist() if "epoch" in validated else list(validated.index)
        values = " ".join(f"{v:.3f}" for v in validated[args.column])
        print(f"{path.parent.name}  epochs {epochs[0]}-{epochs[-1]} of {len(history)}: {values}")


if __name__ == "__main__":
    main()
