"""DFM: Deep Feature Modeling (Ahuja et al., "Probabilistic Modeling of Deep Features for
Out-of-Distribution and Adversarial Detection", 2019), as set up for anomaly detection in anomalib.

A backbone layer's map (resnet18 layer3), average-pooled by `pool` x `pool` and flattened, is the
image's feature vector. PCA fitted on the normal images keeps `pca_level` of the variance (a
fraction) or that many components (an integer). Two scores: `nll`, the Gaussian negative
log-likelihood in PCA space, up to constants the Mahalanobis distance sum_j z_j^2 / lambda_j
(the paper's probabilistic model); `fre`, the feature reconstruction error ||x - W W^T x||^2. The
map is the reconstruction error per pooled position (summed over channels), upsampled, for both.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from competition.zoo.base import AnomalyModel, ImageSet, ValidationSet, gaussian_blur_maps, upsample_maps
from competition.zoo.features import shared_extractor
from competition.zoo.registry import register


def fit_pca(x: torch.Tensor, level: float | int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean (D,), components (D, k), variances (k,)) of rows `x`; `level` < 1 keeps that variance share, >= 1 that many."""
    x = x.double()
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    variances = s ** 2 / max(x.shape[0] - 1, 1)
    if float(level) < 1.0:
        share = torch.cumsum(variances, 0) / variances.sum().clamp(min=1e-30)
        k = int(torch.searchsorted(share, torch.tensor(float(level), dtype=share.dtype))) + 1
    else:
        k = int(level)
    k = max(1, min(k, int((variances > 1e-12 * variances.max()).sum())))
    return mean.float(), vh[:k].T.float(), variances[:k].float()


class DeepFeatureModel(nn.Module):
    """Pooled features -> (nll or fre scores, reconstruction-error maps on the pooled grid)."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, variances: torch.Tensor, score_type: str):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("components", components)
        self.register_buffer("variances", variances)
        self.score_type = score_type

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = pooled.shape
        centred = pooled.reshape(b, -1) - self.mean
        z = centred @ self.components
        residual = centred - z @ self.components.T
        error_map = (residual.reshape(b, c, h, w) ** 2).sum(1)
        if self.score_type == "nll":
            scores = (z ** 2 / self.variances).sum(1)
        else:
            scores = error_map.flatten(1).sum(1)
        return scores, error_map


class DFM(AnomalyModel):
    family = "dfm"
    DEFAULTS = {
        "backbone": "resnet18",
        "layer": 3,
        "pool": 4,  # average-pooling kernel before flattening (anomalib's pooling_kernel_size)
        "pca_level": 0.97,  # variance share kept (< 1) or number of components (>= 1)
        "score_type": "fre",  # fre (feature reconstruction error, anomalib's default) | nll (Gaussian in PCA space)
        "blur_sigma": 4.0,
    }

    def __init__(self, settings=None, **params):
        super().__init__(settings, **params)
        if self.score_type not in ("nll", "fre"):
            raise ValueError(f"dfm: score_type must be 'nll' or 'fre', got {self.score_type!r}")
        self.model: DeepFeatureModel | None = None

    def _pooled(self, extractor, maps: list[torch.Tensor]) -> torch.Tensor:
        (m,) = extractor.select(maps, [self.layer])
        k = min(int(self.pool), m.shape[-1], m.shape[-2])
        return F.avg_pool2d(m, k) if k > 1 else m

    def _fit(self, images: ImageSet, validation: ValidationSet | None) -> None:
        extractor = shared_extractor(self.backbone, [self.layer], self.settings)
        rows = torch.empty(0)
        shape = None
        for idx, maps in extractor.extract(images, desc="dfm fit"):
            pooled = self._pooled(extractor, maps)
            if shape is None:
                shape = pooled.shape[1:]
                rows = torch.empty(len(images), pooled[0].numel())
            rows[torch.as_tensor(idx)] = pooled.flatten(1)
        mean, components, variances = fit_pca(rows, self.pca_level)
        self.model = DeepFeatureModel(mean, components, variances, self.score_type).to(self.device)
        self.fit_info = {"feature_dim": int(rows.shape[1]), "components": int(components.shape[1])}

    @torch.inference_mode()
    def _predict(self, images: ImageSet, with_maps: bool):
        extractor = shared_extractor(self.backbone, [self.layer], self.settings)
        size = self.settings.image_size
        scores = np.zeros(len(images))
        maps = np.zeros((len(images), size, size), np.float32) if with_maps else None
        for idx, feats in extractor.extract(images, desc="dfm score"):
            batch_scores, error_map = self.model(self._pooled(extractor, [f.to(self.device) for f in feats]))
            scores[idx] = batch_scores.cpu().numpy()
            if with_maps:
                maps[idx] = gaussian_blur_maps(upsample_maps(error_map, size), float(self.blur_sigma)).cpu().numpy()
        return scores, maps

    def fitted_state(self) -> dict:
        return {"mean": self.model.mean.cpu(), "components": self.model.components.cpu(),
                "variances": self.model.variances.cpu()}

    def load_fitted_state(self, state: dict) -> None:
        self.model = DeepFeatureModel(state["mean"], state["components"], state["variances"],
                                      self.score_type).to(self.device)


register("dfm-resnet18", DFM,
         "DFM on resnet18 layer3 (4x4-pooled), PCA to 97% variance, feature reconstruction error")
register("dfm-resnet18-nll", DFM,
         "DFM on resnet18 layer3 (4x4-pooled), PCA to 97% variance, Gaussian NLL in PCA space",
         score_type="nll")
