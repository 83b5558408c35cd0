"""Probe: do a test image's nearest normal training frames tell its defects apart better than PaDiM does?

bsdata_tiles' README warns that consecutive frames of one spindle position fall in both train and test, so most test
images have a near-twin among the training normals. Two scores use that, each fitted on every training normal and
measured on the test set (no folds: a first look, not a zoo entry):
- `template`: the pixel difference to the K nearest normal frames (grey levels, each image minus its Gaussian
  background of sigma 8 px so lighting drifts cancel), the per-pixel minimum over the K, smoothed, then maxed;
- `spade`: SPADE's second stage (Cohen and Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid Correspondences",
  2020) on layer1 of the zoo's random network: each cell's distance to the nearest cell of the K nearest normal
  images, searched within WINDOW cells of its own position (frames of one position are nearly aligned), the images
  chosen by their layer1 features average-pooled to a GRID x GRID layout.
PaDiM on the same layer1 features is printed beside them, with both scores' rank correlation and rank blends.

    python bench/nearest_frames.py ../shared/datasets/bsdata_tiles

Reads `answers.csv` beside `test/` (a bench script; the pipeline never does).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from competition.config import load_config
from competition.data.images import read_image
from competition.folds import load_index
from competition.zoo.api import ImageSet
from competition.zoo.components.features import with_backbone_statistics
from competition.zoo.components.maps import gaussian_blur_maps, upsample_maps
from competition.zoo.registry import build_from_config

sys.path.insert(0, str(Path(__file__).parent))
from patch_llr_probe import mahalanobis2, position_gaussians, test_labels  # noqa: E402  (a sibling bench script)

MODEL = "padim-resnet18-layer1"


def grey(path: str, size: tuple[int, int]) -> np.ndarray:
    image = np.asarray(read_image(path), np.float32).mean(-1)
    image = np.asarray(F.interpolate(torch.from_numpy(image)[None, None], size=size[::-1],
                                                       mode="bilinear", align_corners=False)[0, 0])
    return image / 255.0


def template_scores(queries: np.ndarray, normals: np.ndarray, k: int, sigma: float) -> np.ndarray:
    """(Q, H, W), (N, H, W) grey images -> (Q,) maxima of the smoothed minimum difference to the k nearest."""
    def describe(a: np.ndarray) -> np.ndarray:  # a 64x52 thumbnail, standardised: finds the same position's frames
        small = F.interpolate(torch.from_numpy(a)[:, None], size=(52, 64), mode="bilinear", align_corners=False)
        small = small.flatten(1)
        return ((small - small.mean(1, keepdim=True)) / (small.std(1, keepdim=True) + 1e-6)).numpy()

    nearest = torch.cdist(torch.from_numpy(describe(queries)), torch.from_numpy(describe(normals)))
    nearest = nearest.topk(k, largest=False).indices.numpy()
    flat = lambda a: a - gaussian_filter(a, 8)  # noqa: E731
    normals_flat = np.stack([flat(a) for a in normals])
    out = []
    for q, idx in zip(queries, nearest):
        difference = np.abs(flat(q)[None] - normals_flat[idx]).min(0)
        out.append(gaussian_filter(difference, sigma).max())
    return np.array(out)


def spade_maps(queries: torch.Tensor, normals: torch.Tensor, k: int, grid: int, window: int) -> torch.Tensor:
    """(Q, C, H, W), (N, C, H, W) features -> (Q, H, W) distances to the nearest cell of the k nearest normals,
    within `window` cells of the same position."""
    nearest = torch.cdist(F.adaptive_avg_pool2d(queries, grid).flatten(1),
                          F.adaptive_avg_pool2d(normals, grid).flatten(1)).topk(k, largest=False).indices
    _, _, h, w = queries.shape
    maps = []
    for q, idx in zip(queries, nearest):
        gallery = F.pad(normals[idx], (window,) * 4, mode="replicate")
        best = torch.full((h, w), float("inf"))
        for dy in range(2 * window + 1):
            for dx in range(2 * window + 1):
                shifted = gallery[:, :, dy:dy + h, dx:dx + w]
                best = torch.minimum(best, ((shifted - q[None]) ** 2).sum(1).min(0).values)
        maps.append(best.sqrt())
    return torch.stack(maps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("--config", default="configs/real.yaml")
    parser.add_argument("--k", type=int, default=3, help="nearest normal frames per image (template)")
    parser.add_argument("--spade-k", type=int, default=5, help="nearest normal images per image (spade)")
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"paths.data={args.data}", "paths.work=runs/bench-nearest-frames", *args.set])
    index = load_index(cfg)
    normals = index[(index["split"] == "train") & (index["label"] == 0)].reset_index(drop=True)
    test = index[index["split"] == "test"].reset_index(drop=True)
    y_test = test_labels(args.data, test)

    size = (141, 115)  # half of a 282x230 tile: the template's pixels
    scores = {"template": template_scores(np.stack([grey(p, size) for p in test["path"]]),
                                          np.stack([grey(p, size) for p in normals["path"]]), args.k, 1.0)}

    test_set = ImageSet.from_frame(test)
    padim = build_from_config(MODEL, cfg)
    extractor = with_backbone_statistics(padim._extractor(), padim.build_model(), test_set)
    extractor.cache_dir = None

    def features(images: ImageSet) -> torch.Tensor:
        out = [None] * len(images)
        with torch.no_grad():
            for idx, maps in extractor.extract(images, desc="layer1"):
                for j, i in enumerate(idx):
                    out[int(i)] = extractor.select(maps, [1])[0][j].float()
        return torch.stack(out)

    normal_features, test_features = features(ImageSet.from_frame(normals)), features(test_set)
    sigma = float(padim.params.blur_sigma)
    smoothed_max = lambda m: gaussian_blur_maps(upsample_maps(m, cfg.zoo.image_size), sigma).amax((1, 2)).numpy()  # noqa: E731
    scores["spade"] = smoothed_max(spade_maps(test_features, normal_features, args.spade_k, args.grid, args.window))
    _, _, h, w = normal_features.shape
    mean, inverse, _ = position_gaussians(normal_features.flatten(2).transpose(1, 2))
    distances = torch.cat([mahalanobis2(b.flatten(2).transpose(1, 2), mean, inverse)
                           for b in test_features.split(32)]).clamp_min(0).sqrt().reshape(-1, h, w)
    scores["padim"] = smoothed_max(distances)

    for name, s in scores.items():
        line = f"{name:9s} test AUROC {roc_auc_score(y_test, s):.3f}"
        if name != "padim":
            rho = np.corrcoef(rankdata(s), rankdata(scores["padim"]))[0, 1]
            blend = lambda wt, s=s: (1 - wt) * rankdata(scores["padim"]) + wt * rankdata(s)  # noqa: E731
            blends = ", ".join(f"{wt:.2f}: {roc_auc_score(y_test, blend(wt)):.3f}" for wt in (0.25, 0.5))
            line += f"; rank correlation with padim {rho:.2f}; rank blends with padim (its weight) {blends}"
        print(line)


if __name__ == "__main__":
    main()
