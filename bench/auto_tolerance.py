"""What `ensemble.auto_tolerance` submits: finished runs re-stacked at several tolerances, with the candidate auto
chooses and the Private macro-F1 of its submission (`answers.csv` beside `test/`; a bench script, the pipeline never
reads it). Nothing is written.

    python bench/auto_tolerance.py --tolerances 0 0.005 0.01 0.02 \
        --run ../shared/datasets/deeppcb configs/real.yaml runs/bench-real/deeppcb-real-p5/runs real 42 \
        --run input/synthetic configs/default.yaml runs/bench-real/small-default/runs default 42
"""
from __future__ import annotations

import argparse
from pathlib import Path

from competition.config import load_config
from competition.ensemble.gather import gather
from competition.ensemble.stacking import level2_features, share_fold_features, stack
from competition.leaderboard import read_answers, score_by_usage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs=5, action="append", required=True,
                        metavar=("DATA", "CONFIG", "WORK", "EXPERIMENT", "SEED"))
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.0, 0.005, 0.01, 0.02])
    args = parser.parse_args()
    for data, config, work, experiment, seed in args.run:
        cfg = load_config(config, [f"paths.data={data}", f"paths.work={work}", f"experiment={experiment}",
                                   f"seed={seed}", "ensemble.method=auto"])
        gathered = gather(cfg)
        oof, test = level2_features(gathered.models, cfg.ensemble.normalise, gathered.folds, gathered.test_ids)
        fold_features = share_fold_features(gathered.models, cfg.ensemble, gathered.test_ids)
        answers = read_answers(Path(data) / "answers.csv")
        cells = []
        for tolerance in args.tolerances:
            cfg.ensemble.auto_tolerance = tolerance
            result = stack(oof, test, cfg.ensemble, cfg.seed, fold_features)
            submission = result.test.rename(columns={"image_id": "ImageId"})[["ImageId", "answer"]]
            private = score_by_usage(submission, answers)["Private"]
            cells.append(f"{tolerance:g}: {result.stacker['auto']['chosen']} {private:.3f}")
        print(f"{Path(data).name} {experiment} seed {seed}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
