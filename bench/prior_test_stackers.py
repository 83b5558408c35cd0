"""Does `tests/test_prior.py`'s per-fold test lose anything by stacking with logistic instead of `auto`? Runs the
test's own setup (its folds, fold models and seeds) under each named stacker and prints the mean error of the
test-share EM estimate on averaged and on per-fold test features, with the wall time per share.

    .venv/bin/python bench/prior_test_stackers.py logistic auto
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the tests' helpers (test_prior imports conftest by name)

from competition.config import EnsembleConfig  # noqa: E402
from competition.ensemble.stacking import fold_test_features, level2_features, stack  # noqa: E402
from tests.test_prior import SEEDS, make_folds, make_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="+", help="ensemble.method values, e.g. logistic auto")
    args = parser.parse_args()
    print("method, test share: mean |EM estimate - truth| on averaged / per-fold features, wall time")
    for method in args.methods:
        for share in (0.05, 0.3):  # the test's parameters
            start = time.perf_counter()
            test_labels = (np.random.default_rng(9).random(600) < share).astype(int)
            folds = make_folds(n=400, n_pos=20, n_splits=5)
            errors = {"averaged": [], "per_fold": []}
            for seed in SEEDS:
                models = [make_model("a", folds, test_labels, 1.5, seed),
                          make_model("b", folds, test_labels, 1.0, seed + 10)]
                oof, test = level2_features(models, "rank", folds)
                per_fold_features = fold_test_features(models, "rank")
                for way in errors:
                    prior = stack(oof, test, EnsembleConfig(method=method, prior_features=way), 0,
                                  per_fold_features).prior
                    errors[way].append(abs(prior["estimates"]["em"] - test_labels.mean()))
            print(f"  {method}, {share}: {np.mean(errors['averaged']):.4f} / {np.mean(errors['per_fold']):.4f}, "
                  f"{time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
