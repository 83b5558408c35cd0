"""Every stacking method on one finished experiment: nested OOF macro-F1 and AUROC, and, with a local
answer key (development sets only), Public/Private macro-F1 of the submission each would make.

    python bench/ensemble_methods.py --config configs/real.yaml --set paths.work=RUNS \\
        --answers ../shared/datasets/bsdata_tiles/answers.csv

`seconds` is each method's `stack()` wall time (nested CV, the fit, the threshold): what it adds to `infer`.

The experiment's runs are gathered once; each method stacks the same features, with the config's
`ensemble.prior`, estimated as `infer` does (`ensemble.prior_method`, `prior_features`). The pipeline
itself never reads answers.csv.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from restack import stack_inputs  # noqa: E402  (bench/, beside this script)

from competition.artifacts import read_table  # noqa: E402
from competition.config import load_config  # noqa: E402
from competition.ensemble.stacking import stack  # noqa: E402
from competition.ensemble.submission import build_submission, expected_image_ids  # noqa: E402
from competition.leaderboard import score_by_usage  # noqa: E402

METHODS = ("auto", "best_single", "mean", "rank_blend", "logistic")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--answers", help="answers.csv (ImageId,answer,Usage) of a development set")
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    gathered, oof, test, fold_features = stack_inputs(cfg)  # as infer
    answers = read_table(args.answers) if args.answers else None
    expected = expected_image_ids(cfg, gathered.index)
    rows = []
    for method in METHODS:
        ensemble = dataclasses.replace(cfg.ensemble, method=method, estimator_params={})
        start = time.perf_counter()
        result = stack(oof, test, ensemble, cfg.seed, fold_features)
        row = {"method": method, "seconds": time.perf_counter() - start,
               "chosen": result.stacker.get("auto", {}).get("chosen", ""),
               "oof_macro_f1": result.cv["oof_macro_f1"], "oof_auroc": result.cv["oof_auroc"],
               "test_share": result.prior.get("test_share"), "predicted_defects": int(result.test["answer"].sum())}
        if answers is not None:
            submission = build_submission(expected, result.test.set_index("image_id")["answer"])
            row.update(score_by_usage(submission, answers))
        rows.append(row)
    print(f"{cfg.experiment}: {len(gathered.models)} models ({', '.join(m.name for m in gathered.models)}), "
          f"prior {cfg.ensemble.prior}")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
