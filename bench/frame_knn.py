"""Probe: how far does a whole image's nearest training frame tell its label, without looking at any defect?

bsdata_tiles' README names two residues of its conversion: consecutive frames of one spindle position fall in train and
test alike, and soiling still correlates slightly with the label. A score that sees only the whole image's look
measures how much of the label those carry: each image's standardised grey (or colour) thumbnail, and its distance to
the nearest training normal minus its distance to the nearest training defect (nearest-neighbour rule, Cover and Hart
1967). Out of fold, a held-out fold is compared with the other folds' images; the test set with each fold's training
folds, the fold models' scores averaged. Prints OOF and test AUROC per thumbnail size; `--save` writes the
`bench/patch_llr_probe.py --save` layout (z-scored on each fold's held-out normals), for `bench/probe_blend.py`.

    python bench/frame_knn.py ../shared/datasets/bsdata_tiles runs/bench-real/bsdata_tiles-real/runs \
        [--save /tmp/pb/knn.csv]

Reads `answers.csv` beside `test/` (a bench script; the pipeline never does).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from competition.config import load_config
from competition.data.images import read_image
from competition.metrics import auroc

sys.path.insert(0, str(Path(__file__).parent))
from patch_llr_probe import score_frames, split_frames, write_scores, zscored  # noqa: E402  (a sibling bench script)

SIZES = [(13, 16), (26, 32), (52, 64), (104, 128)]  # (height, width) of the thumbnail


def thumbnails(images: list[np.ndarray], size: tuple[int, int], colour: bool) -> torch.Tensor:
    """(N, D): each image area-resized to `size`, grey unless `colour`, standardised on its own values."""
    x = torch.stack([torch.from_numpy(image if colour else image.mean(-1, keepdims=True)).permute(2, 0, 1)
                     for image in images])
    x = torch.cat([F.interpolate(x[i:i + 1], size=size, mode="area") for i in range(len(x))]).flatten(1)
    return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)


def nearest_rule(queries: torch.Tensor, reference: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """Distance to the nearest reference normal minus distance to the nearest reference defect."""
    distance = torch.cdist(queries, reference).numpy()
    return distance[:, labels == 0].min(1) - distance[:, labels == 1].min(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("work", help="a run's paths.work: its folds.csv is used")
    parser.add_argument("--config", default="configs/real.yaml")
    parser.add_argument("--save", default=None, metavar="CSV", help="the 52x64 grey scores, for probe_blend.py")
    args = parser.parse_args()
    cfg = load_config(args.config, [f"paths.data={args.data}", f"paths.work={args.work}"])
    train, test, y_test = split_frames(cfg, args.data, args.work)
    decoded = [np.asarray(read_image(p), np.float32) / 255.0 for p in list(train["path"]) + list(test["path"])]
    labels, fold_of = train["label"].to_numpy().astype(int), train["fold"].to_numpy()
    saved = []
    for size in SIZES:
        for colour in (False, True):
            described = thumbnails(decoded, size, colour)
            if size == (52, 64) and not colour:
                grey = described  # the nearest-frame count below reads these
            train_x, test_x = described[:len(train)], described[len(train):]
            oof, test_scores = np.zeros(len(train)), []
            for k in np.unique(fold_of):
                held = fold_of == k
                oof[held] = nearest_rule(train_x[held], train_x[~held], labels[~held])
                test_scores.append(nearest_rule(test_x, train_x[~held], labels[~held]))
                if args.save and size == (52, 64) and not colour:
                    # the same score under both of probe_blend.py's column names
                    z_held, z_test = zscored({"probe": oof[held]}, {"probe": test_scores[-1]}, labels[held])
                    saved.extend(score_frames(k, train["image_id"][held], labels[held],
                                              {**z_held, "padim": z_held["probe"]}, test["image_id"], y_test,
                                              {**z_test, "padim": z_test["probe"]}))
            print(f"{size[0]}x{size[1]} {'colour' if colour else 'grey  '}  OOF AUROC {auroc(labels, oof):.3f}  "
                  f"test AUROC {auroc(y_test, np.mean(test_scores, 0)):.3f}", flush=True)
    nearest_is_defect = nearest_rule(grey[len(train):], grey[:len(train)], labels) > 0
    print("a training defect is the nearest training frame (52x64 grey) of "
          f"{nearest_is_defect[y_test == 1].mean():.0%} of the test defects and "
          f"{nearest_is_defect[y_test == 0].mean():.0%} of the test normals")
    if args.save:
        write_scores(saved, args.save)


if __name__ == "__main__":
    main()
