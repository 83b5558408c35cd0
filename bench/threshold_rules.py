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

import argparse
import dataclasses
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from competition.config import load_config  # noqa: E402
from competition.ensemble.gather import gather  # noqa: E402
from competition.ensemble.stacking import level2_features, share_fold_features, stack  # noqa: E402
from competition.leaderboard import read_answers  # noqa: E402
from competition.metrics import THRESHOLD_RULES, best_threshold, macro_f1  # noqa: E402


def rule_row(cfg, answers: pd.DataFrame) -> dict[str, float]:
    gathered = gather(cfg)
    oof, test = level2_features(gathered.models, cfg.ensemble.normalise, gathered.folds, gathered.test_ids)
    fold_features = share_fold_features(gathered.models, cfg.ensemble, gathered.test_ids)
    row: dict[str, float] = {"models": len(gathered.models)}
    for rule in THRESHOLD_RULES:
        result = stack(oof, test, dataclasses.replace(cfg.ensemble, threshold_rule=rule), cfg.seed, fold_features)
        scored = result.test.set_index("image_id")
        truth = answers.set_index("ImageId").loc[scored.index]
        private = (truth["Usage"] == "Private").to_numpy()
        y = truth["answer"].astype(int).to_numpy()[private]
        row.update({"share": result.prior["test_share"], "true_share": float(truth["answer"].astype(int).mean()),
                    f"{rule}_threshold": result.threshold, f"{rule}_called": float(scored["answer"].mean()),
                    f"{rule}_private": macro_f1(y, scored["answer"].to_numpy()[private])})
        row["oracle_private"] = best_threshold(y, scored["score"].to_numpy(float)[private])[1]
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
        rows.append({"experiment": experiment, **rule_row(cfg, answers)})
    frame = pd.DataFrame(rows)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if len(frame) > 1:
        print("mean Private:", " ".join(f"{c[:-8]} {frame[c].mean():.3f}" for c in frame if c.endswith("_private")))


if __name__ == "__main__":
    main()
