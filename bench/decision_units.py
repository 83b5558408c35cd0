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

import numpy as np
from restack import experiments_main, private_labels, stack_inputs
from sklearn.base import clone

from competition.ensemble.stacking import build_stacker, stack, stacker_scores
from competition.metrics import best_threshold, macro_f1


def rules(cfg, answers) -> dict[str, float]:
    gathered, oof, test, fold_features = stack_inputs(cfg)
    result = stack(oof, test, cfg.ensemble, cfg.seed, fold_features)
    method = result.stacker.get("auto", {}).get("chosen", cfg.ensemble.method)
    fitted = clone(build_stacker(cfg.ensemble, cfg.seed, method)).fit(
        oof[result.models].to_numpy(float), oof["label"].to_numpy(int))
    scored = result.test.set_index("image_id")
    private, y, true_share = private_labels(answers, scored.index)
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
    row = {"models": len(gathered.models), "true_share": true_share,
           "estimated_share": float(result.prior["test_share"]),
           "called_submitted": float(called["submitted"].mean()), "called_fold_share": share}
    row.update({f"private_{name}": macro_f1(y, calls[private]) for name, calls in called.items()})
    row["private_oracle"] = best_threshold(y, averaged[private])[1]
    return row


if __name__ == "__main__":
    experiments_main(__doc__, rules)
