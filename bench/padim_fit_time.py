"""Seconds of one PaDiM fold at one thread: fit on fold K's training normals, then scoring fold K's images.

    .venv/bin/python bench/padim_fit_time.py CONFIG DATA WORK [--fold K] [key=value ...]
    .venv/bin/python bench/padim_fit_time.py configs/real.yaml ../shared/datasets/bsdata_tiles \
        runs/bench-real/bsdata_tiles-real-bf16/runs

The README's 31.0 -> 14.9 s (fit) and 3.9 -> 1.9 s (scoring) are this script at commit 3f80eea and at 53fb047,
with the run's feature cache already filled (so the seconds are PaDiM's own work, not the backbone's).
"""
from __future__ import annotations

import argparse
import time

from competition.config import load_config
from competition.folds import load_index, training_folds
from competition.runtime import configure_threads
from competition.zoo.api import ImageSet
from competition.zoo.registry import build_from_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("data")
    parser.add_argument("work")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("sets", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, [f"paths.data={args.data}", f"paths.work={args.work}", *args.sets])
    configure_threads(1)
    folds = training_folds(cfg, load_index(cfg))
    model = build_from_config("padim-resnet18", cfg)
    started = time.perf_counter()
    model.fit(ImageSet.from_frame(folds[(folds["fold"] != args.fold) & (folds["label"] == 0)]))
    fitted = time.perf_counter()
    model.score_samples(ImageSet.from_frame(folds[folds["fold"] == args.fold]))
    print(f"fit {fitted - started:.1f} s, scoring {time.perf_counter() - fitted:.1f} s")


if __name__ == "__main__":
    main()
