"""How long stacking takes at the sizes of the synthetic presets: per-fold normalisation, nested CV of
the stacker, refit and test scoring (everything `infer` does after reading the CSVs).

    .venv/bin/python bench/stacking.py            # small and full preset sizes, every method
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from competition.config import EnsembleConfig
from competition.ensemble.gather import ModelPredictions
from competition.ensemble.stacking import level2_features, stack

SIZES = {"small": (430, 30, 300, 5), "full": (6820, 30, 9100, 5)}  # train, defects, test, folds
METHODS = {
    "logistic": EnsembleConfig(),
    "rank_blend": EnsembleConfig(method="rank_blend"),
    "random_forest": EnsembleConfig(method="sklearn", estimator="sklearn.ensemble.RandomForestClassifier",
                                    estimator_params={"n_estimators": 100, "n_jobs": 1}),
}


def fake_models(n_train: int, n_defect: int, n_test: int, n_splits: int, n_models: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n_defect, int), np.zeros(n_train - n_defect, int)]
    folds = pd.DataFrame({"image_id": [f"train_{i}" for i in range(n_train)], "label": labels,
                          "fold": np.r_[np.arange(n_defect), np.arange(n_train - n_defect)] % n_splits})
    test_labels = (rng.random(n_test) < 0.05).astype(int)
    models = []
    for m in range(n_models):
        signal = 0.5 + m
        oof = folds.assign(score=signal * labels + rng.normal(size=n_train))
        test = pd.concat([pd.DataFrame({"image_id": [f"test_{i}" for i in range(n_test)], "fold": k,
                                        "score": signal * test_labels + rng.normal(size=n_test)})
                          for k in range(n_splits)], ignore_index=True)
        models.append(ModelPredictions(f"model{m}", oof[["image_id", "label", "score", "fold"]], test))
    return folds, models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=int, default=3, help="models entering the ensemble")
    args = parser.parse_args()
    print(f"{'size':<6} {'method':<14} {'features s':>10} {'stack s':>8} {'OOF macro-F1':>12}")
    for size, (n_train, n_defect, n_test, n_splits) in SIZES.items():
        folds, models = fake_models(n_train, n_defect, n_test, n_splits, args.models)
        for method, ensemble in METHODS.items():
            start = time.perf_counter()
            oof, test = level2_features(models, "rank", folds)
            features = time.perf_counter() - start
            start = time.perf_counter()
            result = stack(oof, test, ensemble)
            stacking = time.perf_counter() - start
            print(f"{size:<6} {method:<14} {features:10.2f} {stacking:8.2f} {result.cv['oof_macro_f1']:12.4f}")


if __name__ == "__main__":
    main()
