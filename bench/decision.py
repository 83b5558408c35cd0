"""Where a finished experiment's Private macro-F1 is lost: in the ranking or in the decision.

For the stacked score and each member's level-2 score (`<experiment>/_ensemble/{oof,test}.csv`):
out-of-fold and test AUROC, the test defect share as EM and BBSE estimate it (and the truth), and
the Private macro-F1 of the threshold tuned for each share (`ensemble.prior: train`, `estimate`
with `em` or `bbse`, the true share), of calling the top BBSE share of the test images defective
(`private_bbse_top`: a quantile rule the package does not use), against the best threshold on
Private itself (an oracle: the most the decision could give these scores). Then, with the data's
masks, the out-of-fold defects missed at the training-share threshold by defect area: which sizes
the ranking loses.

    .venv/bin/python bench/decision.py RUNS/EXPERIMENT --data DATA
    .venv/bin/python bench/decision.py runs/bench-pseudo/deeppcb-real/runs/real --data ../shared/datasets/deeppcb

Reads `answers.csv` beside `DATA/test`: a bench script, never the package.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from competition.data.images import read_mask
from competition.data.layouts import read_competition
from competition.ensemble.prior import decide_threshold, estimate_test_share, threshold_at_share
from competition.leaderboard import read_answers
from competition.metrics import auroc, best_threshold, macro_f1


def mixture_threshold(labels, oof_scores, test_scores, share: float) -> float:
    """The cut maximising the test set's expected macro-F1 as a mixture: called share from the test scores
    themselves, false positives from the out-of-fold normals' tail at `share` normals' weight, the rest true."""
    labels, oof_scores, test_scores = np.asarray(labels), np.asarray(oof_scores, float), np.sort(test_scores)
    normals = np.sort(oof_scores[labels == 0])
    cuts = (test_scores[1:] + test_scores[:-1]) / 2
    called = 1.0 - np.searchsorted(test_scores, cuts, side="left") / len(test_scores)
    fp = (1.0 - share) * (1.0 - np.searchsorted(normals, cuts, side="left") / len(normals))
    tp = np.clip(called - fp, 0.0, share)
    fp = called - tp
    fn, tn = share - tp, (1.0 - share) - fp
    f1 = (tp / np.maximum(tp + (fp + fn) / 2, 1e-12) + tn / np.maximum(tn + (fp + fn) / 2, 1e-12)) / 2
    return float(cuts[int(np.argmax(f1))])


def decision_rows(oof: pd.DataFrame, test: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    private = test["Usage"] == "Private"
    truth = test["truth"].to_numpy()
    rows = []
    for column in columns:
        labels, oof_scores = oof["label"].to_numpy(), oof[column].to_numpy(float)
        test_scores = test[column].to_numpy(float)
        shares = estimate_test_share(labels, oof_scores, test_scores)
        row = {"scores": column, "oof_auroc": auroc(labels, oof_scores), "test_auroc": auroc(truth, test_scores),
               "em_share": shares["em"], "bbse_share": shares["bbse"], "true_share": truth.mean()}
        cuts = {"train": best_threshold(labels, oof_scores)[0],
                "em": decide_threshold(labels, oof_scores, test_scores, "estimate", "em").threshold,
                "bbse": decide_threshold(labels, oof_scores, test_scores, "estimate", "bbse").threshold,
                "true": threshold_at_share(labels, oof_scores, float(truth.mean()))[0]}
        for name, cut in cuts.items():
            row[f"private_{name}"] = macro_f1(truth[private], test_scores[private] >= cut)
        # another rule, not the package's: call the top BBSE share of the test images defective (a quantile cut)
        if np.isfinite(shares["bbse"]):
            row["private_bbse_top"] = macro_f1(truth[private], test_scores[private] >= np.quantile(
                test_scores, 1.0 - shares["bbse"]))
            row["private_mixture"] = macro_f1(truth[private], test_scores[private] >= mixture_threshold(
                labels, oof_scores, test_scores, shares["bbse"]))
        row["private_oracle"] = best_threshold(truth[private], test_scores[private])[1]  # the best any cut reaches
        rows.append(row)
    return pd.DataFrame(rows)


def size_rows(oof: pd.DataFrame, data: Path, column: str = "score", groups: int = 3) -> pd.DataFrame:
    """Out-of-fold defects by mask area (share of the image), recall at the training-share threshold."""
    cut = best_threshold(oof["label"].to_numpy(), oof[column].to_numpy(float))[0]
    normals = np.sort(oof.loc[oof["label"] == 0, column].to_numpy(float))
    mask_paths = read_competition(data).set_index("image_id")["mask_path"]
    rows = []
    for _, row in oof[oof["label"] == 1].iterrows():
        mask_path = mask_paths.get(row["image_id"], "")
        if not mask_path:
            continue
        area = float((read_mask(mask_path) > 0).mean())
        rows.append({"area": area, "called": row[column] >= cut,
                     # the share of out-of-fold normals scored below this defect: 1 = above every normal
                     "above_normals": np.searchsorted(normals, row[column]) / max(len(normals), 1)})
    if not rows:
        return pd.DataFrame()
    sizes = pd.DataFrame(rows)
    sizes["group"] = pd.qcut(sizes["area"].rank(method="first"), groups, labels=False)
    return sizes.groupby("group").agg(area_from=("area", "min"), area_to=("area", "max"), defects=("area", "size"),
                                      recall=("called", "mean"), above_normals=("above_normals", "median"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", type=Path, help="a finished experiment folder (RUNS/EXPERIMENT)")
    parser.add_argument("--data", type=Path, required=True, help="the dataset, answers.csv beside its test/")
    args = parser.parse_args()
    ensemble = args.experiment / "_ensemble"
    oof = pd.read_csv(ensemble / "oof.csv", dtype={"image_id": str})
    test = pd.read_csv(ensemble / "test.csv", dtype={"image_id": str})
    answers = read_answers(args.data / "answers.csv").rename(columns={"ImageId": "image_id", "answer": "truth"})
    test = test.merge(answers.astype({"truth": int}), on="image_id", how="left", validate="one_to_one")
    if test["truth"].isna().any():
        raise SystemExit(f"{args.data / 'answers.csv'} lacks {int(test['truth'].isna().sum())} test images")
    # the members' level-2 scores: columns both files hold (auto's `auto_score`, its honest out-of-fold score with the
    # choice made inside each outer fold, has no test column)
    members = [c for c in oof.columns if c in test.columns and c not in ("image_id", "label", "fold", "score")]
    private = test["Usage"] == "Private"
    print(f"submitted: Private macro-F1 {macro_f1(test.loc[private, 'truth'], test.loc[private, 'answer']):.3f}"
          f" ({int(test['answer'].sum())} of {len(test)} test images called defective;"
          f" truth {int(test['truth'].sum())})")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        print(decision_rows(oof, test, ["score", *members]).to_string(index=False))
        sizes = size_rows(oof, args.data)
        if len(sizes):
            print("\nout-of-fold defects of the stack by mask area (recall at the training-share threshold;"
                  " above_normals: median share of out-of-fold normals scored below them)")
            print(sizes.to_string())


if __name__ == "__main__":
    main()
