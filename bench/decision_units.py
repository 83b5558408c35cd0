"""Does the stack's threshold transfer from out-of-fold scores to the submitted test scores?

The threshold is chosen on out-of-fold stacked scores: each row's features come from one fold model. The
submitted test features are means over the fold models, whose tails are shorter, so one cut can call another
share of the test set than it calls of any one fold model's test images. For each finished experiment this
prints the Private macro-F1 of three ways to apply the package's threshold (same stacker, same threshold):

- `submitted`: the cut on the averaged test scores (what `infer` writes);
- `fold_share`: the share q that the cut calls of each fold model's own test scores (the units it was tuned
  in), averaged over the fold models; the top q of the averaged test scores are called defective;
- `fold_vote`: each fold model's own test scores cut, an image called defective by at least half of them;

and `oracle`, the best cut on Private itself. Reads `answers.csv`: a bench script, never the package.

    .venv/bin/python bench/decision_units.py --config configs/real.yaml --data DATA --work WORK/runs EXPERIMENT...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import clone

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from competition.config import load_config  # noqa: E402
from competition.ensemble.gather import gather  # noqa: E402
from competition.ensemble.stacking import (  # noqa: E402
    build_stacker,
    level2_features,
    share_fold_features,
    stack,
    stacker_scores,
)
from competition.leaderboard import read_answers  # noqa: E402
from competition.metrics import best_threshold, macro_f1  # noqa: E402


def rules(cfg, answers: pd.DataFrame) -> dict[str, float]:
    gathered = gather(cfg)
    oof, test = level2_features(gathered.models, cfg.ensemble.normalise, gathered.folds, gathered.test_ids)
    fold_features = share_fold_features(gathered.models, cfg.ensemble, gathered.test_ids)
    result = stack(oof, test, cfg.ensemble, cfg.seed, fold_features)
    method = result.stacker.get("auto", {}).get("chosen", cfg.ensemble.method)
    fitted = clone(build_stacker(cfg.ensemble, cfg.seed, method)).fit(
        oof[result.models].to_numpy(float), oof["label"].to_numpy(int))
    scored = result.test.set_index("image_id")
    truth = answers.set_index("ImageId").loc[scored.index]
    private = (truth["Usage"] == "Private").to_numpy()
    y = truth["answer"].astype(int).to_numpy()[private]
    averaged = scored["score"].to_numpy(float)
    per_fold = np.stack([stacker_scores(fitted, frame.set_index("image_id").loc[scored.index, result.models]
                                        .to_numpy(float)) for frame in fold_features.values()])
    cut = result.threshold
    share = float((per_fold >= cut).mean())
    called = {
        "submitted": averaged >= cut,
        "fold_share": averaged >= np.quantile(averaged, 1.0 - share),
        "fold_vote": (per_fold >= cut).mean(axis=0) >= 0.5,
    }
    row = {"models": len(gathered.models), "true_share": float(truth["answer"].astype(int).mean()),
           "estimated_share": float(result.prior["test_share"]),
           "called_submitted": float(called["submitted"].mean()), "called_fold_share": share}
    row.update({f"private_{name}": macro_f1(y, calls[private]) for name, calls in called.items()})
    row["private_oracle"] = best_threshold(y, averaged[private])[1]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="+")
    parser.add_argument("--config", default=str(ROOT / "configs" / "real.yaml"))
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", required=True, help="paths.work of the runs (WORK/runs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    answers = read_answers(Path(args.data) / "answers.csv")
    rows = []
    for experiment in args.experiments:
        cfg = load_config(args.config, [f"paths.data={args.data}", f"paths.work={args.work}",
                                        f"experiment={experiment}", *args.set])
        rows.append({"experiment": experiment, **rules(cfg, answers)})
    frame = pd.DataFrame(rows)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if len(frame) > 1:
        print("mean Private:", " ".join(f"{c[8:]} {frame[c].mean():.3f}" for c in frame if c.startswith("private_")))


if __name__ == "__main__":
    main()
