"""Does the pretraining monitor track real defects? Prints, for random init and for given weights,
the monitor's AUROC (held-out normals vs painted copies) beside the same k-NN score's
out-of-fold AUROC on the REAL labeled training images (reference: the training folds' normals;
queries: the held-out fold's normals and real defects).

    python bench/pretrain_knn.py --config configs/default.yaml --set paths.data=/tmp/small \
        --set paths.work=/tmp/ssl_runs --weights /tmp/ssl_runs/pretrain [--threads 1]

Needs `python -m competition folds` with the same config first. Uses labels: a measurement
for choosing defaults, never something pretraining itself reads.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import timm
import torch

from competition.config import load_config
from competition.data.images import read_image
from competition.folds import load_index, read_folds
from competition.metrics import auroc
from competition.pretrain import (
    backbone_name,
    build_monitor_set,
    hold_image,
    knn_distance,
    monitor_auroc,
    pooled_features,
    whole_image_transform,
)
from competition.weights import load_local_weights


def real_defect_auroc(backbone, images, folds, cfg, device) -> tuple[float, list[float]]:
    """Pooled k-NN score, out of fold: (AUROC over all folds' predictions, per-fold AUROCs)."""
    p = cfg.pretrain
    to_tensor = whole_image_transform(p.image_size, cfg.augment.mean, cfg.augment.std)
    tensors = torch.stack([to_tensor(image=image)["image"] for image in images])
    features = pooled_features(backbone, tensors, device)
    labels = folds["label"].to_numpy().astype(int)
    scores = np.zeros(len(folds))
    per_fold = []
    for k in sorted(folds["fold"].unique()):
        val = (folds["fold"] == k).to_numpy().copy()
        reference = (~val) & (labels == 0)
        scores[val] = knn_distance(features[torch.from_numpy(reference)], features[torch.from_numpy(val)],
                                   p.monitor_k)
        per_fold.append(float(auroc(labels[val], scores[val])))
    return float(auroc(labels, scores)), per_fold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--weights", action="append", default=[],
                        help="weights file or folder (repeatable); random init is always measured")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    name = backbone_name(cfg)
    device = torch.device("cpu")
    index = load_index(cfg)
    folds = read_folds(cfg, index)
    images = [hold_image(read_image(path), cfg.pretrain.hold_size) for path in folds["path"]]
    normals = [image for image, label in zip(images, folds["label"]) if label == 0]
    monitor = build_monitor_set(normals, cfg.pretrain, cfg.augment.mean, cfg.augment.std, cfg.seed)
    print(f"{name} at {cfg.pretrain.image_size}px, k={cfg.pretrain.monitor_k}; {len(folds)} labeled images "
          f"({int(folds['label'].sum())} defects), {folds['fold'].nunique()} folds")
    print(f"{'weights':<60} {'monitor':>8} {'real OOF':>9}  per fold")
    for weights in [False, *args.weights]:
        began = time.perf_counter()
        torch.manual_seed(cfg.seed)
        backbone = timm.create_model(name, pretrained=False, num_classes=0)
        used = load_local_weights(backbone, weights, name)
        painted = monitor_auroc(backbone, monitor, device)
        real, per_fold = real_defect_auroc(backbone, images, folds, cfg, device)
        label = str(used) if used else f"random init (seed {cfg.seed})"
        print(f"{label:<60} {painted:8.4f} {real:9.4f}  {' '.join(f'{v:.3f}' for v in per_fold)}"
              f"  ({time.perf_counter() - began:.0f}s)")


if __name__ == "__main__":
    main()
