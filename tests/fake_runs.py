"""Small prediction files in the run layout every model writes, for the stacking and leaderboard tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from competition.artifacts import run_dir, write_json, write_predictions


def write_fake_model(work: Path, experiment: str, name: str, folds: pd.DataFrame, test_ids: list[str],
                     test_labels, signal: float, seed: int, fold_scale: bool = True,
                     only_folds: list[int] | None = None, seconds: float = 10.0) -> None:
    """oof.csv/test.csv/summary.json per fold: score = signal * label + noise, then a different affine
    transform per fold model (as zoo models fitted on different normals would give) when fold_scale."""
    rng = np.random.default_rng(seed)
    test_labels = np.asarray(test_labels, float)
    # Fold models of one model agree on the test images up to a little fold-specific noise.
    test_noise = rng.normal(size=len(test_ids))
    for k in sorted(folds["fold"].unique()):
        if only_folds is not None and k not in only_folds:
            continue
        scale, offset = (1.0 + 3.0 * k, 10.0 * k) if fold_scale else (1.0, 0.0)
        part = folds[folds["fold"] == k]
        oof = pd.DataFrame({"image_id": part["image_id"].to_numpy(), "label": part["label"].to_numpy(int)})
        oof["score"] = offset + scale * (signal * oof["label"] + rng.normal(size=len(oof)))
        test = pd.DataFrame({"image_id": test_ids})
        noise = 0.9 * test_noise + 0.45 * rng.normal(size=len(test))
        test["score"] = offset + scale * (signal * test_labels + noise)
        out = run_dir(work, experiment, name, int(k))
        write_predictions(oof, test, out)
        write_json({"train_seconds": seconds, "best_epoch": 1}, out / "summary.json")


def read_answers_labels(data: Path, test_ids: list[str]) -> np.ndarray:
    answers = pd.read_csv(data / "answers.csv", dtype=str, keep_default_na=False).set_index("ImageId")
    return answers.loc[test_ids, "answer"].astype(int).to_numpy()
