"""Can a fold's own training data tell a good random network from a bad one before the zoo fits it?

    python bench/draw_screen.py ../shared/datasets/bsdata_tiles --work runs/bench-real/bsdata_tiles-real-seed1/runs \
        --set seed=1 --draws 0 1 2 3 4 5 6 7

For each fold and each draw `K` of `padim-resnet18-layer1@K` (`--model`; another random resnet18 per draw), PaDiM is
fitted and judged as the zoo's `screen_draws` does it (`competition.zoo.draws.judging_split`): on half of the training
folds' normals (`--inner-share`), the "inner" AUROC ranking the other half against the training folds' real defects
(none of them held out, so choosing a draw by it is honest). The same fitted model then scores the fold's held-out
images and the test images, whose AUROCs (`answers.csv` beside `test/`) say whether the inner AUROC would have chosen
well. Prints one row per fold and draw, then per fold the draws the inner AUROC ranks first.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from competition.config import load_config
from competition.folds import load_index, training_folds
from competition.zoo.api import ImageSet
from competition.zoo.draws import JUDGED_SHARE, judging_split
from competition.zoo.registry import build_from_config

MODEL = "padim-resnet18-layer1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a competition-layout dataset with answers.csv beside test/")
    parser.add_argument("--work", required=True, help="paths.work whose folds.csv to use (a bench/real.sh run's runs/)")
    parser.add_argument("--config", default="configs/real.yaml")
    parser.add_argument("--model", default=MODEL, help="a zoo entry with a random backbone (default: %(default)s)")
    parser.add_argument("--draws", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--folds", type=int, nargs="+", default=None)
    parser.add_argument("--inner-share", type=float, default=JUDGED_SHARE,
                        help="share of the training normals judged, not fitted (default: the zoo's, %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="CSV of the rows (default: WORK/draw_screen.csv)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"paths.data={args.data}", f"paths.work={args.work}", "zoo.cache_max_gb=0",
                                    *args.set])
    index = load_index(cfg)
    folds = training_folds(cfg, index, pseudo=False)
    test_rows = index[index["split"] == "test"].reset_index(drop=True)
    answers = pd.read_csv(Path(args.data) / "answers.csv").set_index("ImageId")["answer"]
    test_labels = answers.loc[test_rows["image_id"]].to_numpy()
    test_images = ImageSet.from_frame(test_rows)
    out = Path(args.out) if args.out else Path(args.work) / "draw_screen.csv"
    rows = []
    for fold in args.folds if args.folds is not None else range(cfg.folds.n_splits):
        train = folds[folds["fold"] != fold]
        held = folds[folds["fold"] == fold]
        fit, inner, inner_labels, _ = judging_split(cfg, train, fold, args.inner_share)
        for draw in args.draws:
            name = args.model if draw == 0 else f"{args.model}@{draw}"
            model = build_from_config(name, cfg)
            model.fit(fit, batchnorm_images=test_images if cfg.zoo.batchnorm_images == "test" else None)
            row = {"fold": fold, "draw": draw,
                   "inner": roc_auc_score(inner_labels, model.score_samples(inner)),
                   "held_out": roc_auc_score(held["label"], model.score_samples(ImageSet.from_frame(held))),
                   "test": roc_auc_score(test_labels, model.score_samples(test_images))}
            rows.append(row)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
            pd.DataFrame(rows).to_csv(out, index=False)
    table = pd.DataFrame(rows)
    for fold, group in table.groupby("fold"):
        rho = spearmanr(group["inner"], group["test"]).statistic
        ranked = group.sort_values("inner", ascending=False)
        print(f"fold {fold}: Spearman(inner, test) {rho:.2f}; by inner: draws {ranked['draw'].tolist()}, "
              f"test {np.round(ranked['test'].to_numpy(), 3).tolist()}")
    mean = table.groupby("draw")[["inner", "held_out", "test"]].mean()
    print(mean.round(3).to_string())
    print(f"Spearman over draws of the fold-mean inner vs test AUROC: "
          f"{spearmanr(mean['inner'], mean['test']).statistic:.2f}")


if __name__ == "__main__":
    main()
