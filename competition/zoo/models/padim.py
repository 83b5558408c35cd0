"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework", ICPR 2021).

Each position of the layer1 grid gets an embedding: layer1, layer2 and layer3 maps concatenated
(deeper maps repeated to layer1's grid, nearest neighbour, as the paper's embedding concat), then a
fixed random subset of d channels (d = 100 for resnet18). Per position, a Gaussian N(mu_ij,
Sigma_ij) over the normal images, with Ledoit-Wolf shrinkage (the default here: it did better on
the small set, where a fold fits ~320 images against d = 100) or Sigma_ij + eps*I (eps = 0.01,
the paper's). The map is the Mahalanobis distance at each position, upsampled and smoothed with a
Gaussian of sigma 4; the image score is the map's maximum. Moments are accumulated batch by batch
(float32 products of shifted features, float64 sums), so fitting never holds every image's features at once.

Deviation, entry `padim-resnet18-layer1`: layer1 alone (all its 64 channels), not the paper's layer1-3. The
paper's features are ImageNet-trained; offline the backbone is often a random network, whose deeper layers
carry less about the input. On bsdata_tiles, three random resnet18s scored out of fold 0.835, 0.740 and 0.726
with layer1-3, 0.897, 0.764 and 0.747 with layer1-2, and 0.896, 0.815 and 0.779 with layer1 alone (README,
"PaDiM's layers on a random network").

Addition, entry `padim-resnet18-layer1-probe` (`defect_probe: true`; not in the paper, which never sees a defect):
the training folds' real defects and their masks teach a class-balanced logistic regression on each patch's
embedding and its PaDiM distance (L2, `probe_c`), defect cells (the mask max-pooled onto the feature grid)
against normal cells (`probe_negatives` random cells of every fit normal, and the defect images' cells outside
their mask widened by `probe_margin` cells). Its logit replaces the distance as the map, smoothed and maxed as
PaDiM's. A defect without a mask (image label only) gives its `weak_cells` cells of largest PaDiM distance as
positives, the mixed supervision of Bozic et al. (2021). A random network's layer1 carries the pitting, but the
per-position Gaussians weigh every direction of normal variation alike; 24 masked defects say which directions
matter. On bsdata_tiles' two fold sets it lifted the fold models' averaged test AUROC from 0.820 to 0.908 and
0.888 to 0.927 (`python bench/patch_llr_probe.py`; README "A defect probe on PaDiM's features").

Entries `padim-resnet18-layer1-probe3` and `-probe5` (`probe_draws: 3`, `5`): one probe over several random networks
side by side, this entry's draw and the next ones, each with its own BatchNorm statistics and PaDiM Gaussians (the
first three are those of `padim-resnet18-layer1`, `@1` and `@2`, whose cached features it reads); the probe sees
each network's 64 features and distance. Without pretrained weights a random network is one random view of the
input; more networks give the probe more features to choose from. On the same two fold sets, one, three and five
networks: 0.908, 0.928, 0.937 and 0.927, 0.941, 0.950 (`python bench/patch_llr_probe.py ... --draws 0 1 2 3 4
--per-draw`; README "One probe over several random networks").

`probe_weighting: images` (the default): each defect image's positive cells share one image's weight, so a speck of a
few cells counts as much as a large pit; the image score is one cell's, so a missed speck costs as much as a missed
pit. Every cell alike (`cells`) let the large pits dominate: on bsdata_tiles the five-network probe's averaged test
AUROC went 0.956 -> 0.961 and 0.944 -> 0.950 (`bench/patch_llr_probe.py --image-weight`; README "Each defect image
weighs alike").

Addition, `score_background` (entry `padim-resnet18-layer1-bg`, weight 1; not in the paper): the image score is the
smoothed map's maximum less that weight times the map's mean, a peak over its own image's level, so a surface that is
anomalous all over (soiled, lit differently) ranks below one spot. On bsdata_tiles' two fold sets PaDiM's test AUROC
0.904 -> 0.919 and 0.835 -> 0.852; the probe's gained on one and lost on the other, so the probe entries keep the
maximum (README "The map less its own level"). `padim-resnet18-layer1-probe5-bg` (weight 0.5) is probe5 so scored,
a stack member beside probe5: on both fold sets the stack's test AUROC rose 0.964 -> 0.970 and 0.953 -> 0.962.
The weight and `blur_sigma` only score (`scoring_params`), so beside probe5 in `zoo.models` it takes probe5's fitted
folds rather than fitting the same Gaussians and probe again (zoo.runner.fitted_twin).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from competition.classifier.segdec import dilate_masks
from competition.preprocess import Geometry, fit_mask_to_canvas
from competition.zoo.api import DRAW_SEED_STRIDE, AnomalyModel, BackboneParams, DefectSet, ImageSet, ValidationSet
from competition.zoo.components.features import (
    BackboneScorer,
    ExtractorGroup,
    score_from_features,
    shared_extractor,
    with_backbone_statistics,
)
from competition.zoo.components.maps import SmoothedMaps
from competition.zoo.registry import register


@dataclass
class PaDiMParams(BackboneParams):
    layers: tuple[int, ...] = (1, 2, 3)
    n_channels: int = 100  # d: random channel subset (100 for resnet18, 550 for wide_resnet50_2 in the paper)
    # ledoit_wolf (the better one on the small set) | epsilon (Sigma + eps*I, the paper)
    shrinkage: Literal["ledoit_wolf", "epsilon"] = "ledoit_wolf"
    epsilon: float = 0.01
    blur_sigma: float = 4.0
    # the image score: the smoothed map's maximum less this times the map's mean (module docstring; 0, the paper's
    # maximum alone)
    score_background: float = 0.0
    # the supervised probe (module docstring): off keeps the paper's unsupervised PaDiM
    defect_probe: bool = False
    probe_c: float = 0.1  # inverse L2 strength of the logistic regression (0.01-1 measured alike on bsdata_tiles)
    probe_negatives: int = 256  # random normal cells per fit image (and per defect image, outside its mask)
    probe_margin: int = 1  # cells around a mask that are neither positive nor negative
    weak_cells: int = 16  # positives of a defect without a mask: its cells of largest PaDiM distance
    # how the positive cells weigh: `images`, each defect image's cells together as much as any other image's (a
    # speck of 4 cells counts as much as a 400-cell pit); `cells`, every cell alike, so large defects dominate
    probe_weighting: Literal["images", "cells"] = "images"
    # random networks the probe reads side by side: this entry's draw and the next ones (draw + 1, ...), each with
    # its own PaDiM Gaussians; the probe sees every network's embedding and distance (module docstring)
    probe_draws: int = 1

    def __post_init__(self):
        if float(self.score_background) < 0:
            raise ValueError(f"score_background weighs the map's mean off its maximum, 0 or more; got "
                             f"{self.score_background}")
        if int(self.probe_draws) < 1:
            raise ValueError(f"probe_draws counts the networks the probe reads, 1 or more; got {self.probe_draws}")
        if int(self.probe_draws) > 1 and not self.defect_probe:
            raise ValueError("probe_draws > 1 reads several networks for the defect probe; set defect_probe: true")


def padim_embedding(maps: list[torch.Tensor], channels: torch.Tensor) -> torch.Tensor:
    """Maps of several layers -> (B, d, h, w): concatenated on the first grid, channel subset taken.

    `channels` index the concatenation (sorted, as PaDiM keeps them). Each layer's chosen channels are taken
    before its map is repeated onto the first grid: nearest-neighbour repetition acts per channel, so this
    is the concatenate-then-select of the paper, without repeating the (mostly dropped) deep channels,
    which took over half of a 256-pixel fit.
    """
    size = maps[0].shape[-2:]
    channels = channels.to(maps[0].device)
    parts, start = [], 0
    for m in maps:
        stop = start + m.shape[1]
        own = channels[(channels >= start) & (channels < stop)] - start
        start = stop
        if own.numel() == 0:
            continue
        m = m.index_select(1, own)
        parts.append(m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="nearest"))
    return torch.cat(parts, dim=1)


def mask_cells(mask: np.ndarray, geometry: Geometry, grid: tuple[int, int]) -> torch.Tensor:
    """A defect mask at its image's size -> (h, w) bool: the cells of the feature grid that hold a marked pixel
    once the mask takes the image's path onto the canvas."""
    canvas, _ = fit_mask_to_canvas((np.asarray(mask) > 0).astype(np.uint8), geometry)
    return F.adaptive_max_pool2d(torch.from_numpy(canvas.astype(np.float32))[None, None], grid)[0, 0] > 0


class PaDiMModel(nn.Module):
    """Backbone maps -> (B, h, w) Mahalanobis distance maps to per-position Gaussians, or with a defect probe
    the probe's logit maps.

    Fitted state, buffers registered empty: the random channel subset, and per position the mean
    (P, d) and inverse covariance (P, d, d); the probe's weights over (embedding, distance) standardised by
    its feature mean and scale, and its bias (empty without a probe). A probe over several networks keeps
    the further networks' PaDiMs in `draws`; its maps are then each network's layers in turn.
    """

    def __init__(self, further_draws: int = 0):
        super().__init__()
        self.draws = nn.ModuleList(PaDiMModel() for _ in range(further_draws))
        self.register_buffer("channels", torch.empty(0, dtype=torch.long))
        self.register_buffer("mean", torch.empty(0, 0))
        self.register_buffer("inv_cov", torch.empty(0, 0, 0))
        self.register_buffer("backbone_statistics", torch.empty(0))  # BatchNorm statistics of a healthy random backbone
        for name in ("probe_weight", "probe_mean", "probe_scale", "probe_bias"):
            self.register_buffer(name, torch.empty(0))

    def set_gaussians(self, mean: torch.Tensor, inv_cov: torch.Tensor) -> None:
        self.mean = mean.float()
        self.inv_cov = inv_cov.float()

    def embed(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return padim_embedding(maps, self.channels)

    def distances(self, embedding: torch.Tensor) -> torch.Tensor:
        _, d, h, w = embedding.shape  # the batch stays symbolic (-1) for traced graphs
        # position-major and contiguous, so each position's quadratic form is one batched matmul: 3x faster on
        # the CPU than the einsum over the (B, P, d) view it replaced
        delta = (embedding.reshape(-1, d, h * w).permute(2, 0, 1) - self.mean[:, None]).contiguous()  # (P, B, d)
        m2 = (torch.bmm(delta, self.inv_cov) * delta).sum(-1).clamp(min=0)  # (P, B)
        return m2.sqrt().T.reshape(-1, h, w)

    def set_probe(self, weight: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, bias: float) -> None:
        self.probe_weight, self.probe_mean, self.probe_scale = weight.float(), mean.float(), scale.float()
        self.probe_bias = torch.tensor([float(bias)])

    def _networks_parts(self, maps: list[torch.Tensor]):
        """Maps of every network the probe reads, each network's layers in turn -> per network, its (B, d, h, w)
        embedding and (B, 1, h, w) PaDiM distance, this one's first, then `draws`'."""
        networks = [self, *self.draws]
        per = len(maps) // len(networks)
        for k, padim in enumerate(networks):
            embedding = padim.embed(maps[k * per:(k + 1) * per])
            yield embedding, padim.distances(embedding)[:, None]

    def probe_features(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """(B, c, h, w): each network's embedding and PaDiM distance, side by side (the probe's inputs)."""
        return torch.cat([part for parts in self._networks_parts(maps) for part in parts], 1)

    def probe_logits(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """(B, h, w) logits of the defect probe: its weights over the standardised `probe_features`, folded
        into one 1x1 convolution per part, so the standardised features are never held."""
        weight = self.probe_weight / self.probe_scale
        logits = self.probe_bias - (weight * self.probe_mean).sum()
        start = 0
        for parts in self._networks_parts(maps):
            for part in parts:
                stop = start + part.shape[1]
                logits = logits + F.conv2d(part, weight[start:stop].view(1, -1, 1, 1))[:, 0]
                start = stop
        return logits

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        if self.probe_weight.numel() == 0:
            return self.distances(self.embed(maps))
        return self.probe_logits(maps)


def ledoit_wolf_shrinkage(emp_cov: torch.Tensor, fourth: torch.Tensor, n: int) -> torch.Tensor:
    """Ledoit-Wolf shrinkage per position (as sklearn.covariance.ledoit_wolf_shrinkage, batched).

    emp_cov: (P, d, d) covariance with 1/n; fourth: (P,) sum over samples of ||x - mu||^4.
    """
    p = emp_cov.shape[-1]
    trace = torch.diagonal(emp_cov, dim1=-2, dim2=-1).sum(-1)
    mu = trace / p
    delta_ = (emp_cov ** 2).sum((-2, -1))  # ||emp_cov||_F^2
    beta = (fourth / n - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * trace + p * mu ** 2) / p
    beta = torch.minimum(beta, delta)
    return torch.where(delta > 0, beta / delta, torch.zeros_like(delta))


class PaDiM(AnomalyModel):
    family = "padim"
    params_class = PaDiMParams
    scoring_params = ("blur_sigma", "score_background")  # the head's (`_head`); the Gaussians and probe never read them
    params: PaDiMParams

    @classmethod
    def extractor_layers(cls, params: PaDiMParams) -> tuple[int, ...]:
        return tuple(params.layers)

    @classmethod
    def extractor_draws(cls, params: PaDiMParams) -> int:
        return int(params.probe_draws)

    @property
    def uses_defects(self) -> bool:  # the defect probe trains on the training folds' labelled defects
        return bool(self.params.defect_probe)

    def build_model(self) -> PaDiMModel:
        return PaDiMModel(further_draws=int(self.params.probe_draws) - 1)

    def _extractor(self, network: int = 0):
        """The shared extractor of this entry's network, or of the `network`-th one after it (the probe's)."""
        settings = dataclasses.replace(self.settings, seed=self.settings.seed + DRAW_SEED_STRIDE * network)
        return shared_extractor(self.params.backbone, self.extractor_layers(self.params), settings)

    def _networks(self, model: PaDiMModel, fit_images: ImageSet | None = None) -> ExtractorGroup:
        """Every network `model` reads (this entry's, then the probe's further ones), each with its BatchNorm
        statistics: estimated on `fit_images` when given and kept in its PaDiM (`model` or `model.draws`)."""
        networks = [model, *model.draws]
        return ExtractorGroup([with_backbone_statistics(self._extractor(k), padim, fit_images)
                               for k, padim in enumerate(networks)])

    def _embeddings(self, model: PaDiMModel, extractor, images: ImageSet, desc: str):
        """(B, P, d) float32 embeddings, position-major within each image."""
        for idx, maps in extractor.extract(images, desc=desc):
            yield idx, model.embed(extractor.select(maps, self.params.layers)).flatten(2).transpose(1, 2)

    def _fit(self, images: ImageSet, validation: ValidationSet | None, defects: DefectSet | None = None) -> None:
        p = self.params
        model = self.build_model()
        networks = self._networks(model, self.batchnorm_images(images))
        infos = [self._fit_gaussians(padim, extractor, images)
                 for padim, extractor in zip([model, *model.draws], networks.extractors)]
        self.fit_info = infos[0]
        if p.defect_probe:
            self._fit_probe(model, networks, images, defects)
        self.model = model.to(self.device)

    def _fit_gaussians(self, model: PaDiMModel, extractor, images: ImageSet) -> dict:
        """PaDiM's fit of `model` on `images` through `extractor`: channel subset (seeded by the network's
        seed) and per-position Gaussians. Returns the fit's figures."""
        p = self.params
        total = sum(c for c, i in zip(extractor.channels, extractor.layers) if i in p.layers)
        d = min(int(p.n_channels), total)
        generator = torch.Generator().manual_seed(extractor.settings.seed)
        model.channels = torch.sort(torch.randperm(total, generator=generator)[:d]).values
        # moments of the features shifted by the first batch's mean (so they are nearly centred and float32
        # products lose nothing to cancellation), each batch's in float32 matmuls, summed in float64
        n, shift, shifted_sum, outer = 0, None, None, None
        for _, emb in self._embeddings(model, extractor, images, "padim fit"):
            if shift is None:
                shift = emb.mean(0)  # (P, d)
                shifted_sum = torch.zeros(shift.shape, dtype=torch.float64)
                outer = torch.zeros(*shift.shape, d, dtype=torch.float64)
            x = (emb - shift).transpose(0, 1).contiguous()  # (P, B, d)
            shifted_sum += x.sum(1)
            outer += torch.bmm(x.transpose(1, 2), x)
            n += x.shape[1]
        shifted_mean = shifted_sum / n
        mean = shift.double() + shifted_mean
        scatter = outer - n * shifted_mean[:, :, None] * shifted_mean[:, None, :]  # sum of centred outer products
        eye = torch.eye(d, dtype=torch.float64)
        if p.shrinkage == "epsilon":
            cov = scatter / max(n - 1, 1) + float(p.epsilon) * eye
            shrink = None
        else:
            # Ledoit-Wolf needs sum ||x - mu||^4 per position: a second pass over the (cached) features
            fourth = torch.zeros(mean.shape[0], dtype=torch.float64)
            for _, emb in self._embeddings(model, extractor, images, "padim fit (Ledoit-Wolf pass)"):
                centred = emb.double() - mean[None]
                fourth += ((centred ** 2).sum(-1) ** 2).sum(0)
            emp = scatter / n
            shrink = ledoit_wolf_shrinkage(emp, fourth, n)
            mu = torch.diagonal(emp, dim1=-2, dim2=-1).mean(-1)
            cov = (1 - shrink)[:, None, None] * emp + (shrink * mu)[:, None, None] * eye
        model.set_gaussians(mean, torch.linalg.inv(cov))
        info = {"n_channels": d, "positions": int(mean.shape[0]), "n_images": n}
        if shrink is not None:
            info["mean_shrinkage"] = float(shrink.mean())
        return info

    def _cells(self, model: PaDiMModel, extractors: ExtractorGroup, images: ImageSet, desc: str):
        """Per image of `images`: its index, (P, c) rows of `probe_features` (each network's embedding and PaDiM
        distance), and the grid (h, w)."""
        for idx, maps in extractors.extract(images, desc=desc):
            features = model.probe_features(extractors.select(maps, self.params.layers))
            rows = features.flatten(2).transpose(1, 2)
            for j, i in enumerate(idx):
                yield int(i), rows[j], tuple(features.shape[-2:])

    def _fit_probe(self, model: PaDiMModel, extractors: ExtractorGroup, images: ImageSet,
                   defects: DefectSet | None) -> None:
        """The defect probe (module docstring): logistic regression of defect cells against normal cells."""
        from sklearn.linear_model import LogisticRegression

        p = self.params
        if defects is None or len(defects) == 0:
            raise ValueError(f"{self.family}: defect_probe trains on labelled defects, and this fold has none; "
                             "use an entry without the probe (e.g. padim-resnet18-layer1)")
        generator = torch.Generator().manual_seed(self.settings.seed + 1)
        negatives, positives = [], []

        def sample(rows: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
            pool = torch.arange(len(rows)) if allowed is None else torch.nonzero(allowed).flatten()
            pick = torch.randperm(len(pool), generator=generator)[:int(p.probe_negatives)]
            return rows[pool[torch.sort(pick).values]]

        distance = model.channels.numel()  # the column of this network's PaDiM distance
        for _, rows, _ in self._cells(model, extractors, images, "padim probe (normals)"):
            negatives.append(sample(rows))
        weak = 0
        for i, rows, grid in self._cells(model, extractors, defects.images, "padim probe (defects)"):
            mask = defects.masks[i]
            cells = None if mask is None else mask_cells(mask, self.settings.geometry, grid)
            if cells is None or not cells.any():
                weak += 1
                top = rows[:, distance].topk(min(int(p.weak_cells), len(rows))).indices
                positives.append(rows[top])
                continue
            positives.append(rows[cells.flatten()])
            margin = dilate_masks(cells[None, None].float(), int(p.probe_margin))[0, 0] > 0
            negatives.append(sample(rows, ~margin.flatten()))
        pos, neg = torch.cat(positives).float(), torch.cat(negatives).float()
        x = torch.cat([pos, neg])
        mean, scale = x.mean(0), x.std(0).clamp(min=1e-6)
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        weight = np.ones(len(y))
        if p.probe_weighting == "images":  # each image's cells share one image's weight; the positives' total stays
            per_cell = np.concatenate([np.full(len(rows), 1.0 / len(rows)) for rows in positives])
            weight[:len(pos)] = per_cell * len(pos) / per_cell.sum()
        probe = LogisticRegression(C=float(p.probe_c), class_weight="balanced", max_iter=2000)
        probe.fit(((x - mean) / scale).numpy(), y, sample_weight=weight)
        model.set_probe(torch.from_numpy(probe.coef_[0]), mean, scale, float(probe.intercept_[0]))
        self.fit_info.update({"probe_positive_cells": len(pos), "probe_negative_cells": len(neg),
                              "probe_defects": len(defects), "probe_weak_defects": weak,
                              "probe_networks": 1 + len(model.draws)})

    def _head(self) -> SmoothedMaps:
        return SmoothedMaps(self.model, self.settings.image_size, float(self.params.blur_sigma),
                            float(self.params.score_background))

    def _scoring_extractor(self):
        """The fitted model's extractor, its BatchNorm statistics restored: this network's, or the group of the
        networks a probe over several draws reads."""
        if len(self.model.draws):
            return self._networks(self.model)
        return with_backbone_statistics(self._extractor(), self.model)

    @torch.inference_mode()
    def _predict(self, images: ImageSet, with_maps: bool):
        extractor = self._scoring_extractor()
        head = self._head()

        def score_batch(feats):
            return head([f.to(self.device) for f in extractor.select(feats, self.params.layers)])

        return score_from_features(extractor, images, self.settings.image_size, with_maps, "padim score",
                                   score_batch)

    def scoring_module(self) -> BackboneScorer:
        self._check_fitted()
        return BackboneScorer(self._scoring_extractor(), self.params.layers, self._head()).eval()


register("padim-resnet18", PaDiM,
         "PaDiM on resnet18 layer1-3, 100 random channels, per-position Gaussian (Ledoit-Wolf shrinkage), Mahalanobis")
register("padim-resnet18-eps", PaDiM,
         "PaDiM on resnet18 layer1-3 as in the paper: each position's covariance + 0.01 I", shrinkage="epsilon")
register("padim-resnet18-layer1", PaDiM,
         "PaDiM on resnet18 layer1 alone (all 64 channels): the features a random network keeps informative",
         layers=(1,))
register("padim-resnet18-layer1-bg", PaDiM,
         "PaDiM on resnet18 layer1 alone, the image score its map's maximum less the map's mean (peak over the image's "
         "own level)", layers=(1,), score_background=1.0)
register("padim-resnet18-layer1-probe", PaDiM,
         "PaDiM on resnet18 layer1 + a logistic patch probe trained on the training folds' real defects (masks where "
         "known): its logit is the map",
         layers=(1,), defect_probe=True)
register("padim-resnet18-layer1-probe3", PaDiM,
         "the defect probe over three random resnet18s side by side (this draw and the next two): each network's "
         "layer1 and PaDiM distance", layers=(1,), defect_probe=True, probe_draws=3)
register("padim-resnet18-layer1-probe5", PaDiM,
         "the defect probe over five random resnet18s side by side (this draw and the next four)",
         layers=(1,), defect_probe=True, probe_draws=5)
register("padim-resnet18-layer1-probe5-bg", PaDiM,
         "the five-network defect probe, its image score the map's maximum less half the map's mean (a stack member "
         "beside probe5)", layers=(1,), defect_probe=True, probe_draws=5, score_background=0.5)
register("padim-wide-resnet50", PaDiM,
         "PaDiM as in the paper's best setting: wide_resnet50_2 layer1-3, 550 random channels, + 0.01 I (slow on CPU)",
         backbone="wide_resnet50_2", n_channels=550, shrinkage="epsilon")
register("padim-ssl", PaDiM,
         "PaDiM (layer1-3, 100 random channels) on the experiment's self-supervised backbone (make pretrain)",
         backbone_weights="ssl")
