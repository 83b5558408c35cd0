"""Random draws of one zoo model, alone and averaged: does averaging random feature extractors pay?

Each MODEL_DIR is one model's finished five folds on the same folds.csv (e.g. `padim-resnet18` with
`zoo.params.padim-resnet18.draw=K`, K = 0, 1, ...). Prints pooled OOF and test AUROC of each draw, then of
the running mean of the first k draws' raw scores (per fold, so a fold model's out-of-fold and test scores
stay on one scale; test scores averaged over folds as `infer` does).

    .venv/bin/python bench/draws.py DATA MODEL_DIR...

Reads `answers.csv` beside `DATA/test`: a bench script, never the package.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from competition.leaderboard import read_answers
from competition.metrics import auroc


def fold_scores(model_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    oof = pd.concat([pd.read_csv(f / "oof.csv", dtype={"image_id": str}).assign(fold=int(f.name[4:]))
                     for f in sorted(model_dir.glob("fold*"))])
    test = pd.concat([pd.read_csv(f / "test.csv", dtype={"image_id": str}).assign(fold=int(f.name[4:]))
                      for f in sorted(model_dir.glob("fold*"))])
    return oof.set_index("image_id").sort_index(), test.set_index(["fold", "image_id"]).sort_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("models", type=Path, nargs="+")
    args = parser.parse_args()
    truth = read_answers(args.data / "answers.csv").set_index("ImageId")["answer"].astype(int)
    runs = [fold_scores(m) for m in args.models]
    labels = runs[0][0]["label"].to_numpy()
    rows = []
    for k, (oof, test) in enumerate(runs):
        per_image = test["score"].groupby(level="image_id").mean()
        rows.append({"scores": f"draw {args.models[k]}", "oof_auroc": auroc(labels, oof["score"].to_numpy()),
                     "test_auroc": auroc(truth.loc[per_image.index].to_numpy(), per_image.to_numpy())})
    for k in range(2, len(runs) + 1):
        oof = np.mean([r[0]["score"].to_numpy() for r in runs[:k]], axis=0)
        test = pd.concat([r[1]["score"] for r in runs[:k]], axis=1).mean(axis=1).groupby(level="image_id").mean()
        rows.append({"scores": f"mean of the first {k}", "oof_auroc": auroc(labels, oof),
                     "test_auroc": auroc(truth.loc[test.index].to_numpy(), test.to_numpy())})
    with pd.option_context("display.width", 200, "display.max_colwidth", 90, "display.float_format", "{:.3f}".format):
        print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
