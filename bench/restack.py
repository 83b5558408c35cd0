"""What the re-stacking bench scripts share: a finished experiment's level-2 inputs as `infer` builds them, the
answer key lined up with the test images, and a command line over several experiments of one work folder.
Only bench scripts read answers.csv; the package never does."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from competition.config import load_config  # noqa: E402
from competition.ensemble.gather import gather  # noqa: E402
from competition.ensemble.stacking import level2_features, share_fold_features  # noqa: E402
from competition.leaderboard import read_answers  # noqa: E402


def stack_inputs(cfg):
    """(gathered runs, OOF features, test features, each fold model's own test features), as `infer` stacks them."""
    gathered = gather(cfg)
    oof, test = level2_features(gathered.models, cfg.ensemble.normalise, gathered.folds, gathered.test_ids)
    return gathered, oof, test, share_fold_features(gathered.models, cfg.ensemble, gathered.test_ids)


def private_labels(answers: pd.DataFrame, image_ids) -> tuple[np.ndarray, np.ndarray, float]:
    """For test images in `image_ids` order: the Private mask, the Private labels, and the true defect share."""
    truth = answers.set_index("ImageId").loc[list(image_ids)]
    labels = truth["answer"].astype(int).to_numpy()
    private = (truth["Usage"] == "Private").to_numpy()
    return private, labels[private], float(labels.mean())


def experiments_main(description: str, row_of: Callable[[object, pd.DataFrame], dict[str, float]]) -> None:
    """`SCRIPT --data DATA --work WORK/runs [--config C] [--set K=V] EXPERIMENT...`: one row per experiment from
    `row_of(cfg, answers)`, then the mean of every column whose name holds "private"."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        rows.append({"experiment": experiment, **row_of(cfg, answers)})
    frame = pd.DataFrame(rows)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if len(frame) > 1:
        print("mean Private:", " ".join(f"{c} {frame[c].mean():.3f}" for c in frame if "private" in c))
