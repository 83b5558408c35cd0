"""The zoo's per-model table from finished `zoo --fold all` runs: what the closing notes quote.

    python bench/zoo_table.py runs/default/padim-resnet18 runs/default/patchcore-resnet18 ...
    python bench/zoo_table.py runs/default/*          # every model of an experiment

Per model folder: folds found, pooled out-of-fold AUROC and AUPR (raw scores, all folds together),
the mean of the per-fold AUROCs, and from each fold's summary.json the mean fit seconds, training
seconds per epoch (trained models) and scoring images per second. The leaderboard's OOF AUROC
ranks scores after per-fold normalisation, so it can differ slightly from the pooled raw AUROC.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from competition.artifacts import read_json  # noqa: E402
from competition.metrics import aupr, auroc  # noqa: E402


def model_row(folder: Path) -> dict | None:
    folds = sorted(p for p in folder.glob("fold*") if (p / "summary.json").is_file() and (p / "oof.csv").is_file())
    if not folds:
        return None
    summaries = [read_json(p / "summary.json") for p in folds]
    oofs = [pd.read_csv(p / "oof.csv") for p in folds]
    pooled = pd.concat(oofs)
    per_epoch = [s["fit_info"].get("train_seconds_per_epoch") for s in summaries]
    per_epoch = [v for v in per_epoch if v]
    return {"model": folder.name, "folds": len(folds),
            "oof_auroc": auroc(pooled["label"], pooled["score"]), "oof_aupr": aupr(pooled["label"], pooled["score"]),
            "mean_fold_auroc": float(np.mean([auroc(o["label"], o["score"]) for o in oofs])),
            "fit_s": float(np.mean([s["fit_seconds"] for s in summaries])),
            "s_per_epoch": float(np.mean(per_epoch)) if per_epoch else float("nan"),
            "img_per_s": float(np.mean([s["images_per_second"] for s in summaries]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="<paths.work>/<experiment>/<model> folders")
    args = parser.parse_args()
    rows = [r for r in (model_row(f) for f in args.folders) if r is not None]
    print("| model | folds | OOF AUROC | OOF AUPR | mean fold AUROC | fit s / fold | s / epoch | scoring img/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        epoch = "–" if np.isnan(r["s_per_epoch"]) else f"{r['s_per_epoch']:.1f}"
        print(f"| {r['model']} | {r['folds']} | {r['oof_auroc']:.3f} | {r['oof_aupr']:.3f} "
              f"| {r['mean_fold_auroc']:.3f} | {r['fit_s']:.1f} | {epoch} | {r['img_per_s']:.1f} |")


if __name__ == "__main__":
    main()
