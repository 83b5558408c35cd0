"""The test defect share estimated on averaged test features and per fold model (`ensemble.prior_features`).

A model's level-1 test feature is the mean of its fold models' normalised test scores, so the stack's
test scores have shorter tails than its out-of-fold scores, which come from single fold models. This
script refits the experiment's stacker on `_ensemble/oof.csv`'s features, scores the test images with the
averaged features and with each fold model's own features in turn (`stacking.fold_test_features`, what
`infer` estimates on by default), and prints the EM and BBSE estimates of both ways. With an answer key: the
true share, and the submitted scores' Private macro-F1 at the threshold `infer` would set for each mean
estimate (`prior.threshold_at_share`).

    python bench/share_per_fold.py RUNS/EXPERIMENT [--answers DATA/answers.csv]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from competition.artifacts import read_json
from competition.config import load_config
from competition.ensemble.gather import read_model
from competition.ensemble.prior import SHARE_RANGE, estimate_test_share, threshold_at_share
from competition.ensemble.stacking import build_stacker, fold_test_features, stacker_scores
from competition.leaderboard import read_answers
from competition.metrics import macro_f1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a stacked experiment: RUNS/EXPERIMENT with _ensemble/")
    parser.add_argument("--answers", type=Path, default=None)
    args = parser.parse_args()
    ensemble = args.run / "_ensemble"
    cfg = load_config(ensemble / "config.yaml")  # the experiment's resolved config: normalise, method, seed
    method = read_json(ensemble / "metrics.json").get("stacker", {}).get("auto", {}).get("chosen")  # auto's pick
    oof = pd.read_csv(ensemble / "oof.csv", dtype={"image_id": str})
    test = pd.read_csv(ensemble / "test.csv", dtype={"image_id": str})
    models = [c for c in oof.columns if c not in ("image_id", "label", "fold", "score", "auto_score")]
    labels = oof["label"].to_numpy(int)
    stacker = build_stacker(cfg.ensemble, cfg.seed, method).fit(oof[models].to_numpy(float), labels)
    rows = [{"test features": "averaged", **estimate_test_share(labels, oof["score"], test["score"])}]
    folds = sorted(int(k) for k in oof["fold"].unique())
    members = [read_model(args.run / model, folds) for model in models]
    for k, features in fold_test_features(members, cfg.ensemble.normalise, test["image_id"].tolist()).items():
        fold_scores = stacker_scores(stacker, features[models].to_numpy(float))
        rows.append({"test features": f"fold model {k}", **estimate_test_share(labels, oof["score"], fold_scores)})
    table = pd.DataFrame(rows)
    per_fold = table.iloc[1:]
    table.loc[len(table)] = {"test features": "mean over fold models", "em": per_fold["em"].mean(),
                             "bbse": per_fold["bbse"].mean()}
    print(f"training share {labels.mean():.3f}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.answers is None:
        return
    answers = read_answers(args.answers).rename(columns={"ImageId": "image_id", "answer": "truth"})
    test = test.merge(answers, on="image_id", how="left", validate="one_to_one")  # test's own `answer`: the submission
    truth, private = test["truth"].astype(int).to_numpy(), (test["Usage"] == "Private").to_numpy()
    print(f"true test share {truth.mean():.3f}; Private macro-F1 of the submitted scores at the threshold for:")
    shares = {f"{way} {name}": table.iloc[row][name] for way, row in (("averaged", 0), ("per-fold", -1))
              for name in ("em", "bbse")}
    for label, share in {**shares, "the true share": truth.mean()}.items():
        cut = threshold_at_share(labels, oof["score"], float(np.clip(share, *SHARE_RANGE)))[0]  # as infer clips
        print(f"  {label:<16} {share:.3f}: {macro_f1(truth[private], test['score'].to_numpy()[private] >= cut):.3f}")


if __name__ == "__main__":
    main()
