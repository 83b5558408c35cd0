"""Private macro-F1 of each threshold rule (`ensemble.threshold_rule`) on finished experiments.

Each experiment is stacked as `infer` stacks it (its config, the same stacker and estimated test share),
once per rule: `plateau` (the middle of the best run of the out-of-fold macro-F1 reweighted to the share)
and `smoothed` (the best cut under kernel-smoothed class distributions). Printed per experiment: the
share the cut was tuned for, each rule's threshold, the share of test images it calls defective and its
Private macro-F1, and the best cut on Private itself (an oracle). Reads `answers.csv`: a bench script,
never the package.

    .venv/bin/python bench/threshold_rules.py --config configs/real.yaml --data DATA --work WORK/runs EXPERIMENT...
"""
from __future__ import annotations

import dataclasses

from restack import experiments_main, private_labels, stack_inputs

from competition.ensemble.stacking import stack
from competition.metrics import THRESHOLD_RULES, best_threshold, macro_f1


def rule_row(cfg, answers) -> dict[str, float]:
    gathered, oof, test, fold_features = stack_inputs(cfg)
    row: dict[str, float] = {"models": len(gathered.models)}
    for rule in THRESHOLD_RULES:
        result = stack(oof, test, dataclasses.replace(cfg.ensemble, threshold_rule=rule), cfg.seed, fold_features)
        scored = result.test.set_index("image_id")
        private, y, true_share = private_labels(answers, scored.index)
        row.update({"share": result.prior["test_share"], "true_share": true_share,
                    f"{rule}_threshold": result.threshold, f"{rule}_called": float(scored["answer"].mean()),
                    f"{rule}_private": macro_f1(y, scored["answer"].to_numpy()[private])})
        row["oracle_private"] = best_threshold(y, scored["score"].to_numpy(float)[private])[1]
    return row


if __name__ == "__main__":
    experiments_main(__doc__, rule_row)
