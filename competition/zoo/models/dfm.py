"""DFM: Deep Feature Modeling (Ahuja et al., "Probabilistic Modeling of Deep Features for
Out-of-Distribution and Adversarial Detection", 2019), as set up for anomaly detection in anomalib.

A backbone layer's map (resnet18 layer3), average-pooled `pool` x `pool` and flattened, is the
image's feature vector. The pooling has stride `pool_stride`: 1 (default) keeps the layer's grid
("same" padding, odd `pool`), so the map still localises (8 x 8 positions at 128 px); anomalib pools
with stride = kernel (4), which leaves a 2 x 2 grid at 128 px (`pool_stride: 4`). PCA fitted on the
normal images keeps `pca_level` of the variance (a fraction) or that many components (an integer).
Two image scores: `nll`, the Gaussian negative log-likelihood in PCA space, up to constants the
Mahalanobis distance sum_j z_j^2 / lambda_j (the paper's probabilistic model); `fre`, the feature
reconstruction error ||x - W W^T x||^2 (summed over the whole pooled map). The map is the
reconstruction error per pooled position (summed over channels), upsampled, for both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from competition.zoo.api import AnomalyModel, BackboneParams, ImageSet, ValidationSet
from competition.zoo.components.features import (
    BackboneScorer,
    score_from_features,
    shared_extractor,
    with_backbone_statistics,
)
from competition.zoo.components.maps import SmoothedMaps
from competition.zoo.components.pca import fit_pca
from competition.zoo.registry import register


@dataclass
class DFMParams(BackboneParams):
    layer: int = 3
    pool: int = 3  # average-pooling kernel before flattening (anomalib's pooling_kernel_size is 4)
    pool_stride: int = 1  # 1: same-size grid (odd pool); = pool: anomalib's non-overlapping pooling
    pca_level: int | float = 0.97  # variance share kept (< 1) or number of components (>= 1)
    score_type: Literal["fre", "nll"] = "fre"  # fre (feature reconstruction error, anomalib's default) | nll
    blur_sigma: float = 4.0


class DFMModel(nn.Module):
    """Pooled features -> (nll or fre scores, reconstruction-error maps on the pooled grid).

    Fitted state, buffers registered empty: the PCA mean, components and variances.
    """

    def __init__(self, score_type: str = "fre"):
        super().__init__()
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("components", torch.empty(0, 0))
        self.register_buffer("variances", torch.empty(0))
        self.register_buffer("backbone_statistics", torch.empty(0))  # BatchNorm statistics of a healthy random backbone
        self.score_type = score_type

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, c, h, w = pooled.shape  # the batch stays symbolic (-1) for traced graphs
        centred = pooled.flatten(1) - self.mean
        z = centred @ self.components
        residual = centred - z @ self.components.T
        error_map = (residual.reshape(-1, c, h, w) ** 2).sum(1)
        if self.score_type == "nll":
            scores = (z ** 2 / self.variances).sum(1)
        else:
            scores = error_map.flatten(1).sum(1)
        return scores, error_map


def pool_map(m: torch.Tensor, pool: int, stride: int) -> torch.Tensor:
    """Average pooling `pool` x `pool` with `stride`; stride 1 pads to keep the grid (padding not counted).
    With stride > 1 the kernel is at most the map's side."""
    if stride == 1:
        if pool % 2 == 0:
            raise ValueError(f"dfm: pool_stride 1 keeps the grid only with an odd pool, got pool {pool}")
        return F.avg_pool2d(m, pool, stride=1, padding=pool // 2, count_include_pad=False) if pool > 1 else m
    k = min(pool, int(m.shape[-1]), int(m.shape[-2]))  # ints: constants in a traced graph
    return F.avg_pool2d(m, k, stride=min(stride, k)) if k > 1 else m


def pooled_rows(extractor, images: ImageSet, layer: int, pool: int, stride: int, desc: str) -> torch.Tensor:
    """(N, C * h * w): each image's `layer` map pooled by `pool_map` and flattened, in image order (the fit
    data of DFM's PCA and FRE's autoencoder)."""
    rows = torch.empty(0)
    for idx, maps in extractor.extract(images, desc=desc):
        (m,) = extractor.select(maps, [layer])
        pooled = pool_map(m, int(pool), int(stride)).flatten(1)
        if rows.numel() == 0:
            rows = torch.empty(len(images), pooled.shape[1])
        rows[torch.as_tensor(idx)] = pooled
    return rows


class PooledFeatures(nn.Module):
    """The layer's map average-pooled (`pool_map`), then `model`."""

    def __init__(self, model: nn.Module, pool: int, stride: int = 1):
        super().__init__()
        self.model = model
        self.pool = int(pool)
        self.stride = int(stride)

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        (m,) = maps
        return self.model(pool_map(m, self.pool, self.stride))


class DFM(AnomalyModel):
    family = "dfm"
    params_class = DFMParams
    params: DFMParams

    @classmethod
    def extractor_layers(cls, params: DFMParams) -> tuple[int, ...]:
        return (params.layer,)

    def build_model(self) -> DFMModel:
        return DFMModel(self.params.score_type)

    def _extractor(self):
        return shared_extractor(self.params.backbone, self.extractor_layers(self.params), self.settings)

    def _head(self) -> SmoothedMaps:
        pooled = PooledFeatures(self.model, self.params.pool, self.params.pool_stride)
        return SmoothedMaps(pooled, self.settings.image_size, float(self.params.blur_sigma))

    def _fit(self, images: ImageSet, validation: ValidationSet | None) -> None:
        model = self.build_model()
        extractor = with_backbone_statistics(self._extractor(), model, self.batchnorm_images(images))
        p = self.params
        rows = pooled_rows(extractor, images, p.layer, p.pool, p.pool_stride, "dfm fit")
        model.mean, model.components, model.variances = fit_pca(rows, self.params.pca_level)
        self.model = model.to(self.device)
        self.fit_info = {"feature_dim": int(rows.shape[1]), "components": int(model.components.shape[1])}

    @torch.inference_mode()
    def _predict(self, images: ImageSet, with_maps: bool):
        extractor = with_backbone_statistics(self._extractor(), self.model)
        head = self._head()

        def score_batch(feats):
            return head([f.to(self.device) for f in extractor.select(feats, [self.params.layer])])

        return score_from_features(extractor, images, self.settings.image_size, with_maps, "dfm score",
                                   score_batch)

    def scoring_module(self) -> BackboneScorer:
        self._check_fitted()
        extractor = with_backbone_statistics(self._extractor(), self.model)
        return BackboneScorer(extractor, [self.params.layer], self._head()).eval()


register("dfm-resnet18", DFM,
         "DFM on resnet18 layer3 (3x3 stride-1 pooled, full grid), PCA to 97% variance, feature reconstruction error")
register("dfm-resnet18-nll", DFM,
         "DFM on resnet18 layer3 (3x3 stride-1 pooled, full grid), PCA to 97% variance, Gaussian NLL in PCA space",
         score_type="nll")
