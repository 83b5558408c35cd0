"""Probe: do the training folds' masked real defects sharpen PaDiM's patch scores on a random network's features?

PaDiM scores a patch by its Mahalanobis distance to the normals' Gaussian at that position; it never sees a defect.
This probe, per fold, adds what the ~24 training-fold defects and their masks say about the same layer1 features:
- `llr`: the log-likelihood ratio of a patch under one position-free Gaussian of the masked defect patches
  (Ledoit-Wolf) against PaDiM's Gaussian at its position;
- `probe`: a class-balanced logistic regression on the patch feature and its PaDiM distance, defect patches against
  normal patches (of the normals and of the defect images outside their dilated masks).
Maps are upsampled to the canvas and smoothed, and the image score is their maximum, as PaDiM's. Prints held-out
and test AUROC per fold and for the fold-averaged test scores (each fold's scores standardised on its held-out
normals), PaDiM's beside them, and rank blends with PaDiM.

    python bench/patch_llr_probe.py ../shared/datasets/bsdata_tiles runs/bench-real/bsdata_tiles-real-seed1/runs \
        --set seed=1

Reads `answers.csv` beside `test/` (a bench script; the pipeline never does).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_dilation, gaussian_filter
from scipy.stats import rankdata
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from competition.config import load_config
from competition.folds import load_index
from competition.leaderboard import read_answers
from competition.preprocess import Geometry
from competition.zoo.api import ImageSet
from competition.zoo.components.features import with_backbone_statistics
from competition.zoo.components.maps import gaussian_blur_maps, upsample_maps
from competition.zoo.models.padim import ledoit_wolf_shrinkage, mask_cells
from competition.zoo.registry import build_from_config
from competition.zoo.validation import defect_masks

MODEL = "padim-resnet18-layer1"


def lw_cov(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, d) -> mean, Ledoit-Wolf covariance (float64)."""
    x = x.double()
    mu = x.mean(0)
    c = x - mu
    emp = c.T @ c / len(x)
    fourth = ((c ** 2).sum(-1) ** 2).sum()
    s = ledoit_wolf_shrinkage(emp[None], fourth[None], len(x))[0]
    m = torch.diagonal(emp).mean()
    return mu, (1 - s) * emp + s * m * torch.eye(len(mu), dtype=torch.float64)


def position_gaussians(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, P, d) -> per position mean (P, d), inverse covariance (P, d, d), log-determinant (P,)."""
    x = feats.double()
    n = x.shape[0]
    mu = x.mean(0)
    c = (x - mu).transpose(0, 1)  # (P, N, d)
    emp = torch.bmm(c.transpose(1, 2), c) / n
    fourth = ((c ** 2).sum(-1) ** 2).sum(1)
    s = ledoit_wolf_shrinkage(emp, fourth, n)
    m = torch.diagonal(emp, dim1=-2, dim2=-1).mean(-1)
    cov = (1 - s)[:, None, None] * emp + (s * m)[:, None, None] * torch.eye(x.shape[-1], dtype=torch.float64)
    return mu.float(), torch.linalg.inv(cov).float(), torch.logdet(cov).float()


def mahalanobis2(feats: torch.Tensor, mu: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """(B, P, d) against per-position (P, d), (P, d, d) -> (B, P) squared distances."""
    delta = (feats - mu[None]).transpose(0, 1)  # (P, B, d)
    return (torch.bmm(delta, inv) * delta).sum(-1).T


def zscore(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return (scores - reference.mean()) / (reference.std() + 1e-12)


def test_labels(data: str | Path, test: pd.DataFrame) -> np.ndarray:
    """The answers of `test`'s images, in its order, from `answers.csv` beside `data`'s test/ (bench scripts only)."""
    truth = read_answers(Path(data) / "answers.csv").set_index("ImageId")["answer"].astype(int)
    return truth.loc[[Path(i).stem if i not in truth.index else i for i in test["image_id"]]].to_numpy()


def split_frames(cfg, data: str | Path, work: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """The training images with their fold (`work`'s folds.csv), the test images and their answers (bench only)."""
    index = load_index(cfg)
    folds = pd.read_csv(Path(work) / "folds.csv")
    train = index[index["split"] == "train"].merge(folds[["image_id", "fold"]], on="image_id")
    test = index[index["split"] == "test"].reset_index(drop=True)
    return train, test, test_labels(data, test)


def smoothed_reduce(coarse: torch.Tensor, size: int, sigma: float, reduce) -> np.ndarray:
    """(N, h, w) maps -> `reduce` of each map upsampled to the `size` canvas and blurred, as PaDiM's head
    (SmoothedMaps), flattened to (n, size * size)."""
    return torch.cat([reduce(gaussian_blur_maps(upsample_maps(c, size), sigma).flatten(1))
                      for c in coarse.split(64)]).numpy()


def smoothed_maxima(coarse: torch.Tensor, size: int, sigma: float) -> np.ndarray:
    """(N, h, w) maps -> (N,): upsampled to the `size` canvas, blurred and maxed, as PaDiM's head (SmoothedMaps)."""
    return smoothed_reduce(coarse, size, sigma, lambda fine: fine.amax(1))


def zscored(held: dict[str, np.ndarray], test: dict[str, np.ndarray], y_held: np.ndarray
            ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each score of a fold's held-out and test images standardised on the fold's held-out normals."""
    normals = {key: v[y_held == 0] for key, v in held.items()}
    return ({key: zscore(v, normals[key]) for key, v in held.items()},
            {key: zscore(v, normals[key]) for key, v in test.items()})


def score_frames(fold: int, held_ids, y_held: np.ndarray, z_held: dict[str, np.ndarray], test_ids,
                 y_test: np.ndarray, z_test: dict[str, np.ndarray]) -> list[pd.DataFrame]:
    """One fold's rows of `--save`'s file: its held-out images, then the test images."""
    return [pd.DataFrame({"split": "held", "fold": fold, "image_id": np.asarray(held_ids), "label": y_held, **z_held}),
            pd.DataFrame({"split": "test", "fold": fold, "image_id": np.asarray(test_ids), "label": y_test, **z_test})]


def write_scores(frames: list[pd.DataFrame], path: str | Path) -> None:
    """`--save`'s file (split, fold, image_id, label and z-scored score columns), as bench/probe_blend.py reads it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pd.concat(frames).to_csv(path, index=False)
    print(f"scores written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("work", help="a run's paths.work: its folds.csv and feature cache are used")
    parser.add_argument("--config", default="configs/real.yaml")
    parser.add_argument("--folds", type=int, nargs="*", default=None)
    parser.add_argument("--dilate", type=int, default=1, help="cells of margin around masks excluded from negatives")
    parser.add_argument("--C", type=float, default=0.1)
    parser.add_argument("--no-distance", action="store_true", help="the probe without PaDiM's distance")
    parser.add_argument("--weak", type=int, default=0,
                        help="ignore the masks: each defect's N cells of largest PaDiM distance are its positives")
    parser.add_argument("--context", action="store_true", help="add each cell's 3x3 mean to its feature")
    parser.add_argument("--draws", type=int, nargs="+", default=[0],
                        help="random networks whose layer1 features are concatenated (PaDiM and the probe see all)")
    parser.add_argument("--per-draw", action="store_true",
                        help="with several --draws: the probe gets each draw's own PaDiM distance (64-d Gaussians), "
                             "not the distance over the concatenation")
    parser.add_argument("--classifier", choices=["logistic", "hgb"], default="logistic",
                        help="the probe: logistic regression, or sklearn's histogram gradient boosting")
    parser.add_argument("--self-train", type=int, default=0,
                        help="rounds of self-training: the probe refits with its own confident test calls")
    parser.add_argument("--pseudo-defects", type=float, default=0.1,
                        help="self-training: the top share of test images taken as defects")
    parser.add_argument("--pseudo-normals", type=float, default=0.2,
                        help="self-training: the bottom share of test images taken as normals")
    parser.add_argument("--pseudo-cells", type=int, default=16,
                        help="self-training: a pseudo-defect's cells of largest probe logit taken as its positives")
    parser.add_argument("--image-weight", type=float, nargs="?", const=1.0, default=0.0, metavar="POWER",
                        help="a defect image's mask cells weigh n**-POWER each (n its cell count): 1 (the flag "
                             "alone) gives every image the same total, small defects counting as much as large ones")
    parser.add_argument("--hard-negatives", type=int, default=0,
                        help="rounds of hard-negative mining: each fit normal's --hard-cells cells of largest probe "
                             "logit join the negatives and the probe refits")
    parser.add_argument("--hard-cells", type=int, default=8)
    parser.add_argument("--transplants", type=int, default=0,
                        help="per training-fold defect, this many of its transplants onto random fit normals "
                             "(competition.data.transplant) join the positives through their moved masks")
    parser.add_argument("--layer2", action="store_true",
                        help="each draw's layer2, upsampled onto layer1's grid, as more probe features (PaDiM, llr "
                             "and the probe's distances stay on layer1); needs --set "
                             "zoo.params.padim-resnet18-layer1.layers=[1,2]")
    parser.add_argument("--highpass", type=float, default=0.0, metavar="SIGMA",
                        help="every image (BatchNorm statistics' too) minus its Gaussian blur of SIGMA pixels, "
                             "re-centred on mid-grey: lighting and soiling gradients out, local contrast kept")
    parser.add_argument("--flips", type=int, choices=[1, 2, 4], default=1,
                        help="each image also flipped (2: left-right; 4: and upside down, and both), its features "
                             "flipped back onto the image's grid: the normals' Gaussians and the probe fit on every "
                             "orientation, and held-out and test maps are averaged over them (--no-tta: not)")
    parser.add_argument("--no-tta", action="store_true", help="with --flips: score the unflipped images alone")
    parser.add_argument("--test-fit", action="store_true",
                        help="PaDiM's per-position Gaussians fitted on the unlabeled test images as well, "
                             "cross-fitted: each half of the test set is scored by the Gaussians of the fit normals "
                             "and the other half, the training images by those of the first half")
    parser.add_argument("--background", type=float, nargs="+", default=[], metavar="ALPHA",
                        help="also score each image by a map's maximum less ALPHA times the map's median "
                             "(probe_med{ALPHA}, padim_med{ALPHA}) or mean (probe_mean{ALPHA}, ...), on the blurred "
                             "canvas")
    parser.add_argument("--save", default=None, metavar="CSV",
                        help="write every image's scores: held-out ones by its fold's model, test ones by every fold "
                             "model, z-scored on that fold's held-out normals (bench/probe_blend.py reads two)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"paths.data={args.data}", f"paths.work={args.work}", *args.set])
    train, test, y_test = split_frames(cfg, args.data, args.work)

    def highpass(images: ImageSet) -> ImageSet:
        if not args.highpass:
            return images
        out = []
        for i in range(len(images)):
            image = images.read(i).astype(np.float32)
            background = gaussian_filter(image, (args.highpass, args.highpass, 0))
            out.append(np.clip(image - background + 128.0, 0, 255).astype(np.uint8))
        return ImageSet(out, [f"highpass{args.highpass}-{i}" for i in images.ids])

    test_set = highpass(ImageSet.from_frame(test))
    stats = test_set if cfg.zoo.batchnorm_images == "test" else highpass(ImageSet.from_frame(train[train.label == 0]))

    layer1_columns = [0]

    def features(images: ImageSet, cache: bool = True) -> torch.Tensor:
        """(N, d, h, w): layer1 of every asked draw, concatenated, then with --layer2 every draw's layer2 upsampled
        to layer1's grid (read from and written to the run's feature cache unless `cache` is off)."""
        per_draw, layer2 = [], []
        for k in args.draws:
            padim = build_from_config(MODEL if k == 0 else f"{MODEL}@{k}", cfg)
            extractor = with_backbone_statistics(padim._extractor(), padim.build_model(), stats)
            if not cache:
                extractor.cache_dir = None
            out, deeper = [None] * len(images), [None] * len(images)
            with torch.no_grad():
                for idx, maps in extractor.extract(images, desc=f"features (draw {k})"):
                    f = extractor.select(maps, [1])[0].float()
                    g = F.interpolate(extractor.select(maps, [2])[0].float(), size=f.shape[-2:], mode="bilinear",
                                      align_corners=False) if args.layer2 else None
                    for j, i in enumerate(idx):
                        out[int(i)] = f[j]
                        deeper[int(i)] = None if g is None else g[j]
            per_draw.append(torch.stack(out))
            if args.layer2:
                layer2.append(torch.stack(deeper))
        layer1_columns[0] = sum(f.shape[1] for f in per_draw)
        return torch.cat(per_draw + layer2, 1)

    orientations = [(), (1,), (0,), (0, 1)][:args.flips]  # flipped axes of an (H, W, 3) image
    if args.flips > 1 and (args.self_train or args.hard_negatives or args.transplants or args.weak):
        parser.error("--flips does not combine with --self-train, --hard-negatives, --transplants or --weak")
    if args.test_fit and (args.flips > 1 or args.self_train):
        parser.error("--test-fit does not combine with --flips or --self-train")

    def oriented_features(images: ImageSet) -> torch.Tensor:
        """(F * N, d, h, w): `features` of every orientation, flipped back onto the image's grid, orientation-major."""
        out = []
        for axes in orientations:
            flipped = images if not axes else ImageSet(
                [np.ascontiguousarray(np.flip(images.read(i), axes)) for i in range(len(images))],
                [f"flip{''.join(map(str, axes))}-{i}" for i in images.ids])
            f = features(flipped)
            out.append(f.flip([a - 2 for a in axes]) if axes else f)  # image axis 0/1 -> map axis -2/-1
        return out[0] if len(out) == 1 else torch.cat(out)

    n_train = len(train)
    n_views = len(orientations)
    views = lambda idx: np.concatenate([np.asarray(idx) + v * n_train for v in range(n_views)])  # noqa: E731
    train_feats = oriented_features(highpass(ImageSet.from_frame(train)))
    test_feats = oriented_features(test_set)
    if args.context:
        train_feats = torch.cat([train_feats, F.avg_pool2d(train_feats, 3, 1, 1, count_include_pad=False)], 1)
        test_feats = torch.cat([test_feats, F.avg_pool2d(test_feats, 3, 1, 1, count_include_pad=False)], 1)
    _, d, h, w = train_feats.shape
    # layer1's columns (every draw's, side by side) come first; PaDiM, llr and the distances read those alone
    d1 = layer1_columns[0]
    flat = lambda f: f.flatten(2).transpose(1, 2).contiguous()  # noqa: E731  (N, P, d)
    train_flat, test_flat = flat(train_feats), flat(test_feats)
    del train_feats, test_feats  # the (N, P, d) copies serve from here: one copy in memory, not two
    masks_full = defect_masks(train)
    cell_masks = [None if m is None else mask_cells(m, Geometry(image_size=cfg.zoo.image_size, resize=cfg.zoo.resize),
                                                    (h, w)).numpy() for m in masks_full]
    sigma = float(build_from_config(MODEL, cfg).params.blur_sigma)

    labels = train["label"].to_numpy().astype(int)
    rows = []
    score_keys = ("padim", "llr", "probe") + tuple(f"{key}_{kind}{a:g}" for key in ("padim", "probe")
                                                   for kind in ("med", "mean") for a in args.background)
    test_z = {k: [] for k in score_keys}
    saved = []  # --save's rows

    def fold_row(k: int) -> dict:
        fit = np.flatnonzero((train["fold"] != k).to_numpy() & (labels == 0))
        held = np.flatnonzero((train["fold"] == k).to_numpy())
        defects = np.flatnonzero((train["fold"] != k).to_numpy() & (labels == 1))
        width = d1 // len(args.draws)
        # PaDiM and llr over draw 0's features alone with --per-draw (the probe gets each draw's distance); over
        # the concatenation otherwise
        lead = width if args.per_draw else d1
        halves = np.array_split(np.random.default_rng(k).permutation(len(test_flat)), 2)  # --test-fit's halves

        def gaussians(extra: np.ndarray | None):
            """PaDiM's per-position Gaussians (lead features; each draw's with --per-draw) of the fit normals and
            the test images `extra`."""
            rows = train_flat[views(fit)] if extra is None else torch.cat([train_flat[views(fit)], test_flat[extra]])
            lead_g = position_gaussians(rows[..., :lead])
            return lead_g, [position_gaussians(rows[..., j * width:(j + 1) * width])[:2]
                            for j in range(len(args.draws))] if args.per_draw else []

        gaussian_sets = [gaussians(h_) for h_ in halves] if args.test_fit else [gaussians(None)]
        (mu, inv, logdet), per_draw = gaussian_sets[0]
        if args.weak:
            for i in defects:
                m2 = mahalanobis2(train_flat[i][None][..., :lead], mu, inv)[0]
                cells = np.zeros(h * w, bool)
                cells[m2.topk(args.weak).indices.numpy()] = True
                cell_masks[i] = cells.reshape(h, w)
        pos, neg, transplant_rows = [], [], []
        for i in defects:
            if cell_masks[i] is None:
                continue
            inside = cell_masks[i].reshape(-1)
            margin = binary_dilation(cell_masks[i], iterations=args.dilate).reshape(-1)
            for v in views([i]):
                pos.append(train_flat[v][inside])
                neg.append(train_flat[v][~margin][::8])
        normal_patches = train_flat[views(fit)][:, ::16].reshape(-1, d)
        cells_per_defect = [len(p) for p in pos]  # the real defects' positive cells, for the printout
        if args.transplants:
            # the training folds' defects moved onto fit normals: their moved mask cells are more positives
            from competition.data.transplant import DefectBank, transplant

            train_set = ImageSet.from_frame(train)
            rng = np.random.default_rng(1000 + k)
            bank = DefectBank.from_pairs((str(i), train_set.read(int(i)), masks_full[i]) for i in defects
                                         if masks_full[i] is not None)
            made, made_masks = [], []
            for _ in range(args.transplants * len(defects)):
                image, mask = transplant(train_set.read(int(rng.choice(fit))), rng, bank)
                made.append(image)
                made_masks.append(mask)
            made_feats = flat(features(ImageSet(made, [f"transplant{k}_{j}" for j in range(len(made))]), cache=False))
            for f_img, m in zip(made_feats, made_masks):
                cells = mask_cells(m, Geometry(image_size=cfg.zoo.image_size, resize=cfg.zoo.resize), (h, w)).numpy()
                if cells.any():
                    pos.append(f_img[cells.reshape(-1)])
                    transplant_rows.append((f_img, cells.reshape(-1)))
        # each positive cell weighs n**-POWER, n the cell count of its image (real or transplanted)
        pos_weight = np.concatenate([np.full(len(p), max(len(p), 1) ** -args.image_weight) for p in pos])
        pos = torch.cat(pos)
        d_mu, d_cov = lw_cov(pos[:, :lead])
        d_inv, d_logdet = torch.linalg.inv(d_cov).float(), torch.logdet(d_cov).float()

        def maps(feats: torch.Tensor, gaussian_set: int = 0) -> dict[str, torch.Tensor]:
            (mu, inv, logdet), per_draw = gaussian_sets[gaussian_set]
            out = {"padim": [], "llr": [], "probe": [], "m2": [], "dist": []}
            for b in range(0, len(feats), 32):
                x = feats[b:b + 32]
                m2 = mahalanobis2(x[..., :lead], mu, inv)
                dd = ((x[..., :lead] - d_mu.float()) @ d_inv * (x[..., :lead] - d_mu.float())).sum(-1)
                llr = 0.5 * (m2 + logdet[None]) - 0.5 * (dd + d_logdet)
                out["padim"].append(m2.clamp(min=0).sqrt())
                out["llr"].append(llr)
                out["m2"].append(m2)
                out["dist"].append(torch.stack([mahalanobis2(x[..., j * width:(j + 1) * width], g_mu, g_inv)
                                                .clamp(min=0).sqrt() for j, (g_mu, g_inv) in enumerate(per_draw)],
                                               -1) if per_draw else m2.clamp(min=0).sqrt()[..., None])
            return {key: torch.cat(v) for key, v in out.items() if v}

        train_maps = maps(train_flat)
        # the probe's training patches: defect cells, normal cells of the fit normals and of the defect images
        neg_all = torch.cat([normal_patches, torch.cat(neg)])
        dist = train_maps["dist"]
        dist_pos = torch.cat([dist[v][cell_masks[i].reshape(-1)] for i in defects if cell_masks[i] is not None
                              for v in views([i])]
                             + [maps(f_img[None])["dist"][0][cells] for f_img, cells in transplant_rows])
        dist_neg = torch.cat([dist[views(fit)][:, ::16].reshape(-1, dist.shape[-1])]
                             + [dist[v][~binary_dilation(cell_masks[i], iterations=args.dilate).reshape(-1)][::8]
                                for i in defects if cell_masks[i] is not None for v in views([i])])
        xs = torch.cat([torch.cat([pos, dist_pos], 1), torch.cat([neg_all, dist_neg], 1)])
        if args.no_distance:
            xs[:, d:] = 0
        ys = np.r_[np.ones(len(pos)), np.zeros(len(neg_all))]
        mean_x, std_x = xs.mean(0), xs.std(0) + 1e-6
        if args.classifier == "hgb":
            clf = HistGradientBoostingClassifier(max_iter=200, max_leaf_nodes=15, class_weight="balanced",
                                                 random_state=0)
        else:
            clf = LogisticRegression(C=args.C, class_weight="balanced", max_iter=2000)
        weights = np.ones(len(ys))
        weights[:len(pos)] = pos_weight * len(pos) / pos_weight.sum()  # all 1 at POWER 0
        clf.fit(((xs - mean_x) / std_x).numpy(), ys, sample_weight=weights)
        x_fit = torch.cat([train_flat[fit], train_maps["dist"][fit] * (0 if args.no_distance else 1)], -1)
        for _ in range(args.hard_negatives):
            # the normals' strongest cells decide their image scores: they join the negatives
            z_fit = ((x_fit - mean_x) / std_x).reshape(-1, x_fit.shape[-1]).numpy()
            logit_fit = torch.from_numpy(clf.decision_function(z_fit)).float().reshape(x_fit.shape[:-1])
            top = logit_fit.topk(args.hard_cells, dim=1).indices
            hard = torch.gather(x_fit, 1, top[..., None].expand(-1, -1, x_fit.shape[-1])).reshape(-1, x_fit.shape[-1])
            xs = torch.cat([xs, hard])
            ys = np.r_[ys, np.zeros(len(hard))]
            weights = np.r_[weights, np.ones(len(hard))]
            clf.fit(((xs - mean_x) / std_x).numpy(), ys, sample_weight=weights)

        def image_scores(feats: torch.Tensor, m: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
            """Orientation-major (F * n, P, d) -> each image's maps averaged over its orientations (the first alone
            with --no-tta), smoothed and maxed."""
            x = torch.cat([feats, m["dist"] * (0 if args.no_distance else 1)], -1)
            z = ((x - mean_x) / std_x).reshape(-1, x.shape[-1]).numpy()
            m["probe"] = torch.from_numpy(clf.decision_function(z)).float().reshape(x.shape[:-1])
            kept = 1 if args.no_tta else n_views
            out = {}
            for key in ("padim", "llr", "probe"):
                coarse = m[key].reshape(n_views, -1, h, w)[:kept].mean(0)
                if not args.background or key == "llr":
                    out[key] = smoothed_maxima(coarse, cfg.zoo.image_size, sigma)
                    continue
                # --background: the blurred canvas's maximum less ALPHA times its median and its mean (a soiled
                # image's map sits high everywhere, a pit is a peak), from one blur
                peak, median, mean = smoothed_reduce(coarse, cfg.zoo.image_size, sigma, lambda fine: torch.stack(
                    [fine.amax(1), fine.median(1).values, fine.mean(1)], 1)).T
                out[key] = peak
                out.update({f"{key}_med{a:g}": peak - a * median for a in args.background})
                out.update({f"{key}_mean{a:g}": peak - a * mean for a in args.background})
            return out

        held_scores = image_scores(train_flat[views(held)], {key: v[views(held)] for key, v in train_maps.items()})
        if args.test_fit:  # each half scored by the Gaussians fitted with the other half
            test_maps = {}
            for half, other in ((halves[0], 1), (halves[1], 0)):
                for key, v in maps(test_flat[half], other).items():
                    test_maps.setdefault(key, torch.zeros((len(test_flat),) + v.shape[1:]))[half] = v
        else:
            test_maps = maps(test_flat)
        test_scores = image_scores(test_flat, test_maps)
        row_extra = {}
        for r in range(args.self_train):
            # self-training: the test images the probe ranks highest give their strongest cells as defects, the
            # lowest ranked give random cells as normals; the probe refits on both beside its training cells
            order = np.argsort(test_scores["probe"])
            n_def = int(round(args.pseudo_defects * len(order)))
            n_nor = int(round(args.pseudo_normals * len(order)))
            picked_d, picked_n = order[len(order) - n_def:], order[:n_nor]
            row_extra[f"st{r}_def_right"] = float(y_test[picked_d].mean()) if n_def else float("nan")
            row_extra[f"st{r}_nor_right"] = float(1 - y_test[picked_n].mean()) if n_nor else float("nan")
            logits = test_maps["probe"]
            x_test = torch.cat([test_flat, test_maps["dist"] * (0 if args.no_distance else 1)], -1)
            extra_pos = torch.cat([x_test[i][logits[i].topk(args.pseudo_cells).indices] for i in picked_d]) \
                if n_def else x_test[:0, 0]
            extra_neg = x_test[picked_n][:, ::16].reshape(-1, x_test.shape[-1]) if n_nor else x_test[:0, 0]
            xs_r = torch.cat([xs, extra_pos, extra_neg])
            ys_r = np.r_[ys, np.ones(len(extra_pos)), np.zeros(len(extra_neg))]
            clf.fit(((xs_r - mean_x) / std_x).numpy(), ys_r,
                    sample_weight=np.r_[weights, np.ones(len(extra_pos) + len(extra_neg))])
            held_scores = image_scores(train_flat[held], {key: v[held] for key, v in train_maps.items()})
            test_scores = image_scores(test_flat, test_maps)
        y_held = labels[held]
        row = {"fold": k, "pos_patches": len(pos), "neg_patches": len(neg_all),
               "cells_per_defect": f"{min(cells_per_defect)}-{max(cells_per_defect)}", **row_extra}
        # every score standardised on this fold's held-out normals: the fold-averaged test scores and --save's
        z_held, z_test = zscored({key: held_scores[key] for key in test_z}, test_scores, y_held)
        kept = ("padim", "probe") + score_keys[3:]  # the columns of --save
        saved.extend(score_frames(k, train["image_id"].to_numpy()[held], y_held, {key: z_held[key] for key in kept},
                                  test["image_id"], y_test, {key: z_test[key] for key in kept}))
        for key in score_keys:
            row[f"{key}_held"] = roc_auc_score(y_held, held_scores[key])
            row[f"{key}_test"] = roc_auc_score(y_test, test_scores[key])
            test_z[key].append(z_test[key])
        for key in ("llr", "probe"):
            blend = rankdata(test_scores["padim"]) + rankdata(test_scores[key])
            row[f"padim+{key}_test"] = roc_auc_score(y_test, blend)
        return row

    for k in sorted(train["fold"].unique()) if args.folds is None else args.folds:
        rows.append(fold_row(k))
        print(pd.DataFrame([rows[-1]]).round(3).to_string(index=False), flush=True)
    print(pd.DataFrame(rows).round(3).to_string(index=False))
    mean = {key: np.mean(v, 0) for key, v in test_z.items()}
    print("fold-averaged test AUROC: " + ", ".join(f"{key} {roc_auc_score(y_test, v):.3f}" for key, v in mean.items()))
    table = pd.DataFrame(rows)
    print("mean held-out AUROC of the folds: " + ", ".join(f"{key} {table[f'{key}_held'].mean():.3f}"
                                                          for key in score_keys))
    for key in ("llr", "probe"):
        blend = rankdata(mean["padim"]) + rankdata(mean[key])
        print(f"rank blend padim+{key}: {roc_auc_score(y_test, blend):.3f}")
    if args.save:
        write_scores(saved, args.save)


if __name__ == "__main__":
    main()
