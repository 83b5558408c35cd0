"""`python -m competition pseudo`: pick a second round's pseudo-labels from a finished first round.

The first round (`pseudo.source`, an experiment under the same `paths.work`) has stacked every model's
test scores and thresholded them (`<paths.work>/<source>/_ensemble/test.csv`: score, answer). Its most
confident calls become training labels of this experiment: the lowest-scoring `normal_share` of the
images it predicted normal, the highest-scoring `defect_share` of those it predicted defective. Both
shares are ranks within the predicted side, so they mean the same under every stacker and threshold.

Writes `<paths.work>/<experiment>/pseudo.csv` (image_id, label, score) and `pseudo.json` (the source, a
digest of the test scores it read, the counts). `folds.training_folds` adds them to every fold's training
set; a fold's record keeps pseudo.csv's digest, so a changed pick makes its folds stale, not reused.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from competition.artifacts import file_digest, pseudo_labels_path, read_table, write_csv, write_json
from competition.config import Config
from competition.ensemble.infer import ENSEMBLE_DIR

PSEUDO_COLUMNS = ["image_id", "label", "score"]


def select_pseudo_labels(test: pd.DataFrame, normal_share: float, defect_share: float) -> pd.DataFrame:
    """Confident rows of a stacked test table (image_id, score, answer): image_id, label, score.

    Ties in score are broken by image id, so the pick is the same on every run."""
    ordered = test.assign(image_id=test["image_id"].astype(str)).sort_values(["score", "image_id"], kind="stable")
    normal = ordered[ordered["answer"].astype(int) == 0]
    defect = ordered[ordered["answer"].astype(int) == 1].iloc[::-1]
    picked = [normal.head(int(normal_share * len(normal))).assign(label=0),
              defect.head(int(defect_share * len(defect))).assign(label=1)]
    return pd.concat(picked, ignore_index=True)[PSEUDO_COLUMNS]


def source_scores_path(cfg: Config) -> Path:
    return Path(cfg.paths.work) / str(cfg.pseudo.source) / ENSEMBLE_DIR / "test.csv"


def main(cfg: Config) -> Path:
    if not cfg.pseudo.enabled:
        raise ValueError("pseudo.enabled is false: set it (and pseudo.source, the first-round experiment) in a "
                         "second-round experiment, e.g. --set pseudo.enabled=true --set pseudo.source=real "
                         "--set experiment=real-pseudo")
    source = source_scores_path(cfg)
    if not source.exists():
        raise ValueError(f"{source} not found: finish the first round (experiment {cfg.pseudo.source!r}: its "
                         "folds and `infer`) under the same paths.work first")
    test = read_table(source)
    missing = {"image_id", "score", "answer"} - set(test.columns)
    if missing:
        raise ValueError(f"{source} lacks column(s) {sorted(missing)}: re-run infer of {cfg.pseudo.source!r}")
    labels = select_pseudo_labels(test, cfg.pseudo.normal_share, cfg.pseudo.defect_share)
    out = pseudo_labels_path(cfg.paths.work, cfg.experiment)
    write_csv(labels, out)
    counts = {"n_test": len(test), "n_predicted_defect": int(test["answer"].astype(int).sum()),
              "n_normal": int((labels["label"] == 0).sum()), "n_defect": int((labels["label"] == 1).sum())}
    write_json({"source": cfg.pseudo.source, "source_test_csv": str(source), "source_sha1": file_digest(source),
                "normal_share": cfg.pseudo.normal_share, "defect_share": cfg.pseudo.defect_share, **counts},
               out.with_suffix(".json"))
    print(f"pseudo-labels from {cfg.pseudo.source!r} ({counts['n_test']} test images, "
          f"{counts['n_predicted_defect']} predicted defective): {counts['n_normal']} normal and "
          f"{counts['n_defect']} defect (no masks) -> {out}")
    return out
