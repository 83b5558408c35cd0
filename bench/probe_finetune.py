"""Probe: does fine-tuning the random network under the defect probe rank bsdata_tiles better than the probe alone?

The zoo's defect probe (`padim-resnet18-layer1-probe`) is a linear probe: a logistic regression over the frozen
layer1 features of a healthy random resnet18 and their PaDiM distance. Here, per fold, that probe is fitted first
(`lp`, as the zoo entry does for one network), and then the network's stem and layer1 are trained under it (`ft`):
linear probing then fine-tuning (Kumar and others, "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution", ICLR 2022), starting from the probe so the features are not distorted by a random head.
- The head is the probe's 1x1 logistic layer over (layer1 features, PaDiM distance), its standardisation fixed; the
  distance is the frozen network's, fixed per image. BatchNorm stays in eval mode with the zoo's statistics.
- Loss per batch (defect images and fit normals): class-balanced BCE on cells (mask cells positive, each defect
  image's cells sharing one image's weight; cells outside the mask widened by one cell negative) plus BCE on each
  image's largest logit, the image score's ranking. An L2 pull to the random weights (L2-SP, Li and others,
  ICML 2018) keeps the features near the ones the probe chose from.
Scores are the probe's: logit maps upsampled, blurred and maxed, z-scored on the fold's held-out normals. Prints
held-out and test AUROC per fold and of the fold-averaged test scores; `--save` writes them for
`bench/probe_blend.py --column probe` (the fine-tuned scores) or `--column lp`.

    python bench/probe_finetune.py ../shared/datasets/bsdata_tiles runs/bench-real/bsdata_tiles-real/runs \
        --save /tmp/pb/ft.csv

Reads `answers.csv` beside `test/` (a bench script; the pipeline never does).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.ndimage import binary_dilation
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from competition.config import load_config
from competition.metrics import auroc
from competition.preprocess import Geometry
from competition.zoo.api import ImageSet
from competition.zoo.components.features import with_backbone_statistics
from competition.zoo.models.padim import mask_cells
from competition.zoo.registry import build_from_config
from competition.zoo.validation import defect_masks

sys.path.insert(0, str(Path(__file__).parent))
from patch_llr_probe import (  # noqa: E402  (a sibling bench script)
    MODEL,
    mahalanobis2,
    position_gaussians,
    score_frames,
    smoothed_maxima,
    split_frames,
    write_scores,
    zscored,
)


class Layer1(nn.Module):
    """A timm resnet's stem and layer1, copied out of a features-only backbone: (B, 3, S, S) -> (B, 64, S/4, S/4)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*(copy.deepcopy(getattr(backbone, name))
                                    for name in ("conv1", "bn1", "act1", "maxpool", "layer1")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def canvases(images: ImageSet, settings) -> torch.Tensor:
    """Every image of `images` fitted to the zoo's canvas and normalised, in order: (N, 3, S, S)."""
    out = [None] * len(images)
    for idx, batch in images.loader(settings, batch_size=32):
        for j, i in enumerate(idx):
            out[int(i)] = batch[j]
    return torch.stack(out)


@torch.no_grad()
def layer1_maps(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    trunk.eval()
    return torch.cat([trunk(b) for b in x.split(32)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("work", help="a run's paths.work: its folds.csv is used")
    parser.add_argument("--config", default="configs/real.yaml")
    parser.add_argument("--folds", type=int, nargs="*", default=None)
    parser.add_argument("--draw", type=int, default=0, help="the random network (PaDiM's draw K)")
    parser.add_argument("--C", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--sp", type=float, default=1e-2, help="L2-SP strength: the pull to the random weights")
    parser.add_argument("--image-loss", type=float, default=1.0, help="weight of the BCE on each image's max logit")
    parser.add_argument("--defects-per-batch", type=int, default=4)
    parser.add_argument("--normals-per-batch", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", default=None, metavar="CSV")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(args.config, [f"paths.data={args.data}", f"paths.work={args.work}", *args.set])
    train, test, y_test = split_frames(cfg, args.data, args.work)
    labels = train["label"].to_numpy().astype(int)

    padim = build_from_config(MODEL if args.draw == 0 else f"{MODEL}@{args.draw}", cfg)
    test_set = ImageSet.from_frame(test)
    stats = test_set if cfg.zoo.batchnorm_images == "test" else ImageSet.from_frame(train[train.label == 0])
    extractor = with_backbone_statistics(padim._extractor(), padim.build_model(), stats)
    extractor._use_statistics()
    random_trunk = Layer1(extractor.model).float()
    settings = padim.settings
    x_train, x_test = canvases(ImageSet.from_frame(train), settings), canvases(test_set, settings)
    f_train, f_test = layer1_maps(random_trunk, x_train), layer1_maps(random_trunk, x_test)
    check = extractor.select(extractor.forward(x_test[:4]), [1])[0]
    assert torch.allclose(check, f_test[:4], atol=2e-2, rtol=2e-2), "the copied layer1 is not the zoo's"
    _, d, h, w = f_train.shape
    geometry = Geometry(image_size=cfg.zoo.image_size, resize=cfg.zoo.resize)
    cells = [None if m is None else mask_cells(m, geometry, (h, w)).numpy() for m in defect_masks(train)]
    margins = [None if c is None else binary_dilation(c, iterations=1) for c in cells]
    sigma = float(padim.params.blur_sigma)
    flat = lambda f: f.flatten(2).transpose(1, 2)  # noqa: E731  (N, P, d)

    rows, saved, test_z = [], [], {"lp": [], "probe": []}

    def fold_row(k: int) -> dict:
        started = time.time()
        fit = np.flatnonzero((train["fold"] != k).to_numpy() & (labels == 0))
        held = np.flatnonzero((train["fold"] == k).to_numpy())
        defects = [i for i in np.flatnonzero((train["fold"] != k).to_numpy() & (labels == 1)) if cells[i] is not None]
        mu, inv, _ = position_gaussians(flat(f_train[fit]))

        def distances(f: torch.Tensor) -> torch.Tensor:  # (N, d, h, w) -> (N, 1, h, w)
            return torch.cat([mahalanobis2(flat(b), mu, inv).clamp(min=0).sqrt() for b in f.split(32)]
                             ).reshape(-1, 1, h, w)

        dist_train, dist_test = distances(f_train), distances(f_test)
        # the linear probe, as the zoo entry fits it: cells of (features, distance), images weighing alike
        z_train = torch.cat([f_train, dist_train], 1)
        pos = [flat(z_train[i:i + 1])[0][cells[i].reshape(-1)] for i in defects]
        neg = [flat(z_train[fit])[:, ::16].reshape(-1, d + 1)] + [
            flat(z_train[i:i + 1])[0][~margins[i].reshape(-1)][::8] for i in defects]
        xs = torch.cat(pos + neg)
        ys = np.r_[np.ones(sum(len(p) for p in pos)), np.zeros(sum(len(n) for n in neg))]
        weights = np.ones(len(ys))
        pos_weight = np.concatenate([np.full(len(p), 1.0 / len(p)) for p in pos])
        weights[:len(pos_weight)] = pos_weight * len(pos_weight) / pos_weight.sum()
        mean_x, std_x = xs.mean(0), xs.std(0) + 1e-6
        clf = LogisticRegression(C=args.C, class_weight="balanced", max_iter=2000)
        clf.fit(((xs - mean_x) / std_x).numpy(), ys, sample_weight=weights)

        head = nn.Conv2d(d + 1, 1, 1)
        with torch.no_grad():
            weight = torch.from_numpy(clf.coef_[0]).float() / std_x
            head.weight.copy_(weight.view(1, -1, 1, 1))
            head.bias.fill_(float(clf.intercept_[0]) - float((weight * mean_x).sum()))

        def logits(trunk: nn.Module, x: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
            return head(torch.cat([trunk(x), dist], 1))[:, 0]

        @torch.no_grad()
        def score(trunk: nn.Module, x: torch.Tensor, dist: torch.Tensor) -> np.ndarray:
            trunk.eval()
            return smoothed_maxima(torch.cat([logits(trunk, xb, db) for xb, db in zip(x.split(32), dist.split(32))]),
                                   cfg.zoo.image_size, sigma)

        with torch.no_grad():  # the linear probe reads the random network's maps, already computed
            lp = {"held": smoothed_maxima(head(z_train[held])[:, 0], cfg.zoo.image_size, sigma),
                  "test": smoothed_maxima(head(torch.cat([f_test, dist_test], 1))[:, 0], cfg.zoo.image_size, sigma)}
        # fine-tuning under the probe
        trunk = copy.deepcopy(random_trunk)
        anchor = [p.detach().clone() for p in trunk.parameters()]
        for p in trunk.parameters():
            p.requires_grad_(True)
        params = list(trunk.parameters()) + list(head.parameters())
        optimizer = torch.optim.Adam(params, lr=args.lr)
        rng = np.random.default_rng(k)
        steps = int(np.ceil(len(fit) / args.normals_per_batch))
        target = torch.zeros(len(train), h, w)
        valid = torch.ones(len(train), h, w)
        for i in defects:
            target[i] = torch.from_numpy(cells[i]).float()
            valid[i] = torch.from_numpy(cells[i] | ~margins[i]).float()
        progress = tqdm(range(args.epochs * steps), desc=f"fold {k} fine-tuning", leave=False)
        for _ in progress:
            trunk.eval()  # BatchNorm keeps the zoo's statistics; the weights still train
            batch = np.r_[rng.choice(defects, args.defects_per_batch, replace=False),
                          rng.choice(fit, args.normals_per_batch, replace=False)]
            out = logits(trunk, x_train[batch], dist_train[batch])
            t, v = target[batch], valid[batch]
            is_pos = (t > 0) & (v > 0)
            is_neg = (t == 0) & (v > 0)
            # positives: each defect image's cells share one image's weight; both classes weigh half
            per_image = is_pos.flatten(1).sum(1).clamp(min=1).float()
            w_pos = is_pos.float() / per_image.view(-1, 1, 1) / max(int((per_image > 0).sum()), 1)
            w_neg = is_neg.float() / is_neg.sum().clamp(min=1)
            cell_loss = (F.binary_cross_entropy_with_logits(out, t, reduction="none") * (w_pos + w_neg)).sum() / 2
            image_loss = F.binary_cross_entropy_with_logits(out.flatten(1).amax(1), torch.from_numpy(
                labels[batch]).float(), pos_weight=torch.tensor(args.normals_per_batch / args.defects_per_batch))
            sp = sum(((p - a) ** 2).sum() for p, a in zip(trunk.parameters(), anchor))
            loss = cell_loss + args.image_loss * image_loss + args.sp * sp
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            progress.set_postfix(cell=f"{cell_loss.item():.3f}", image=f"{image_loss.item():.3f}",
                                 sp=f"{sp.item():.2f}")
        ft = {"held": score(trunk, x_train[held], dist_train[held]), "test": score(trunk, x_test, dist_test)}
        y_held = labels[held]
        row = {"fold": k, "defects": len(defects), "seconds": round(time.time() - started)}
        for name, s in (("lp", lp), ("probe", ft)):
            row[f"{name}_held"] = auroc(y_held, s["held"])
            row[f"{name}_test"] = auroc(y_test, s["test"])
        z_held, z_test = zscored({"lp": lp["held"], "probe": ft["held"]}, {"lp": lp["test"], "probe": ft["test"]},
                                 y_held)
        for name, v in z_test.items():
            test_z[name].append(v)
        saved.extend(score_frames(k, train["image_id"].to_numpy()[held], y_held, z_held, test["image_id"], y_test,
                                  z_test))
        return row

    for k in sorted(train["fold"].unique()) if args.folds is None else args.folds:
        rows.append(fold_row(k))
        print(pd.DataFrame([rows[-1]]).round(3).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    print(table.round(3).to_string(index=False))
    print("mean held-out AUROC of the folds: " + ", ".join(f"{name} {table[f'{name}_held'].mean():.4f}"
                                                          for name in ("lp", "probe")))
    print("fold-averaged test AUROC: " + ", ".join(f"{name} {auroc(y_test, np.mean(v, 0)):.4f}"
                                                   for name, v in test_z.items()))
    if args.save:
        write_scores(saved, args.save)


if __name__ == "__main__":
    main()
