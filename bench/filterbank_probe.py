"""Probe: are PaDiM's layer1 features of a random network better than a fixed filter bank? One fold, test AUROC.

Per-position Gaussians (as PaDiM: one per cell of a stride-4 grid, shrunk by 0.1 toward a scaled identity) over
30 hand-made channels of each 256-px square image: colour means and variances, and the energy of 12 Gabor
filters (3 scales x 4 orientations) with its local spread, pooled over 4x4 pixels. The score is the maximum of
the smoothed Mahalanobis map, as PaDiM's. With `--against RUN/fold0/test.csv` it prints the rank correlation
with that model's test scores and the AUROC of rank blends.

    python bench/filterbank_probe.py ../shared/datasets/bsdata_tiles WORK/folds.csv --fold 0 \
        --against WORK/real/padim-resnet18-layer1/fold0/test.csv

Reads `answers.csv` beside `test/` (a bench script; the pipeline never does).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import rankdata, spearmanr
from sklearn.metrics import roc_auc_score

SIZE, STRIDE, SHRINK = 256, 4, 0.1


def gabor_bank() -> list[np.ndarray]:
    kernels = []
    for sigma, wavelength in [(1.5, 4), (3, 8), (5, 14)]:
        for theta in np.arange(4) * np.pi / 4:
            for phase in (0, np.pi / 2):  # even and odd: their squared sum is the energy
                k = cv2.getGaborKernel((int(6 * sigma) | 1,) * 2, sigma, theta, wavelength, 0.7, phase)
                k -= k.mean()
                kernels.append(k / np.abs(k).sum())
    return kernels


KERNELS = [torch.from_numpy(k).float()[None, None] for k in gabor_bank()]


def load(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read {path}")
    return cv2.resize(image[:, :, ::-1], (SIZE, SIZE), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def features(paths: list[Path]) -> torch.Tensor:
    """(N, 30, 64, 64) filter-bank maps."""
    out = []
    for start in range(0, len(paths), 32):
        x = torch.from_numpy(np.stack([load(p) for p in paths[start:start + 32]])).permute(0, 3, 1, 2)
        gray = x.mean(1, keepdim=True)
        energy = torch.cat([F.conv2d(gray, k, padding=k.shape[-1] // 2) for k in KERNELS], 1)
        energy = energy.view(len(x), -1, 2, SIZE, SIZE).pow(2).sum(2).sqrt()
        mean, e_mean = F.avg_pool2d(x, STRIDE), F.avg_pool2d(energy, STRIDE)
        out.append(torch.cat([mean, F.avg_pool2d(x * x, STRIDE) - mean ** 2, e_mean,
                              (F.avg_pool2d(energy ** 2, STRIDE) - e_mean ** 2).clamp(min=0).sqrt()], 1))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("folds", type=Path, help="folds.csv of a run on DATA")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--against", type=Path, help="another model's test.csv of the same fold")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folds, answers = pd.read_csv(args.folds), pd.read_csv(args.data / "answers.csv")
    fit = folds[(folds["fold"] != args.fold) & (folds["label"] == 0)]
    held = folds[folds["fold"] == args.fold]
    train = features([args.data / "train" / p for p in fit["image_id"]])
    mu, sd = train.mean(0), train.std(0) + 1e-6
    z = ((train - mu) / sd).flatten(2).permute(2, 0, 1).double()  # (P, N, d)
    centre = z.mean(1, keepdim=True)
    cov = (z - centre).transpose(1, 2) @ (z - centre) / z.shape[1]
    scale = torch.diagonal(cov, dim1=1, dim2=2).mean(1)[:, None, None]
    inv = torch.linalg.inv((1 - SHRINK) * cov + SHRINK * scale * torch.eye(cov.shape[-1], dtype=torch.float64))
    inv, centre = inv.float(), centre.float()
    blur = torch.from_numpy(np.outer(*(cv2.getGaussianKernel(33, 4),) * 2)).float()[None, None]

    def score(paths: list[Path]) -> np.ndarray:
        f = features(paths)
        delta = ((f - mu) / sd).flatten(2).permute(2, 0, 1) - centre
        grid = ((delta @ inv) * delta).sum(-1).clamp(min=0).sqrt().T.reshape(len(f), 1, *f.shape[-2:])
        maps = F.conv2d(F.interpolate(grid, size=(SIZE, SIZE), mode="bilinear"), blur, padding=16)
        return maps.flatten(1).max(1).values.numpy()

    held_scores = score([args.data / "train" / p for p in held["image_id"]])
    test_paths = [next((args.data / "test" / "images").glob(f"{i}.*")) for i in answers["ImageId"]]
    test_scores = pd.Series(score(test_paths), index=answers["ImageId"])
    y = answers.set_index("ImageId")["answer"]
    print(f"fold {args.fold}: {train.shape[1]} channels, OOF AUROC {roc_auc_score(held['label'], held_scores):.3f}, "
          f"test AUROC {roc_auc_score(y, test_scores):.3f}")
    if args.against:
        other = pd.read_csv(args.against).set_index("image_id")["score"]
        ours = test_scores.loc[other.index]
        print(f"against {args.against}: test AUROC {roc_auc_score(y.loc[other.index], other):.3f}, "
              f"Spearman {spearmanr(ours, other)[0]:.3f}")
        for weight in (0.3, 0.5):
            blend = (1 - weight) * rankdata(other) + weight * rankdata(ours)
            auroc = roc_auc_score(y.loc[other.index], blend)
            print(f"  rank blend, filter bank weight {weight}: test AUROC {auroc:.3f}")


if __name__ == "__main__":
    main()
