"""DFKDE: Deep Feature Kernel Density Estimation (anomalib's model).

A backbone layer (resnet18 layer4) average-pooled over the whole image is the feature vector;
PCA fitted on the normal images reduces it to `n_components` (16), scaled by the largest norm of
the training vectors; a Gaussian kernel density with Scott's bandwidth (bandwidth matrix = data
covariance * n^(-2/(d+4)), as scipy.stats.gaussian_kde) over the training vectors gives the image
score -log density. The model is global: it has no anomaly map, so its maps are its score spread
uniformly (`has_maps = False`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from competition.zoo.base import AnomalyModel, ImageSet, ValidationSet
from competition.zoo.dfm import fit_pca
from competition.zoo.features import shared_extractor
from competition.zoo.registry import register


class GaussianKDE(nn.Module):
    """-log density of a Gaussian KDE with a full bandwidth matrix, computed in whitened coordinates."""

    def __init__(self, whitened_points: torch.Tensor, whitening: torch.Tensor, log_norm: float):
        super().__init__()
        self.register_buffer("whitening", whitening)  # (d, d): x -> x @ whitening has identity bandwidth
        self.register_buffer("points", whitened_points)  # training vectors, whitened
        self.log_norm = log_norm  # log of (n * (2 pi)^(d/2) * sqrt(det H))

    @classmethod
    def fit(cls, points: torch.Tensor) -> "GaussianKDE":
        n, d = points.shape
        factor = n ** (-1.0 / (d + 4))  # Scott's rule
        cov = torch.cov(points.double().T).reshape(d, d) + 1e-10 * torch.eye(d, dtype=torch.float64)
        bandwidth = cov * factor ** 2
        chol = torch.linalg.cholesky(bandwidth)
        whitening = torch.linalg.inv(chol).T  # (x @ W)(x @ W)^T = x H^-1 x^T
        log_det = 2.0 * torch.log(torch.diagonal(chol)).sum()
        log_norm = math.log(n) + 0.5 * d * math.log(2 * math.pi) + 0.5 * float(log_det)
        whitening = whitening.float()
        return cls(points.float() @ whitening, whitening, log_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d2 = torch.cdist(x @ self.whitening, self.points) ** 2
        return -(torch.logsumexp(-0.5 * d2, dim=1) - self.log_norm)


class DFKDE(AnomalyModel):
    family = "dfkde"
    has_maps = False
    DEFAULTS = {
        "backbone": "resnet18",
        "layer": 4,
        "n_components": 16,
        "scale": True,  # divide by the largest training norm after PCA (anomalib's feature scaling)
    }

    def __init__(self, settings=None, **params):
        super().__init__(settings, **params)
        self.pca: tuple[torch.Tensor, torch.Tensor] | None = None
        self.max_norm = 1.0
        self.kde: GaussianKDE | None = None

    def _vectors(self, images: ImageSet, desc: str) -> torch.Tensor:
        extractor = shared_extractor(self.backbone, [self.layer], self.settings)
        out = None
        for idx, maps in extractor.extract(images, desc=desc):
            (m,) = extractor.select(maps, [self.layer])
            pooled = m.mean((2, 3))
            if out is None:
                out = torch.empty(len(images), pooled.shape[1])
            out[torch.as_tensor(idx)] = pooled
        return out

    def _reduce(self, vectors: torch.Tensor) -> torch.Tensor:
        mean, components = self.pca
        return (vectors - mean) @ components / self.max_norm

    def _fit(self, images: ImageSet, validation: ValidationSet | None) -> None:
        vectors = self._vectors(images, "dfkde fit")
        k = min(int(self.n_components), vectors.shape[0] - 1, vectors.shape[1])
        mean, components, _ = fit_pca(vectors, max(k, 1))
        self.pca = (mean, components)
        self.max_norm = 1.0
        reduced = self._reduce(vectors)
        if self.scale:
            self.max_norm = float(torch.linalg.vector_norm(reduced, dim=1).max().clamp(min=1e-12))
            reduced = reduced / self.max_norm
        self.kde = GaussianKDE.fit(reduced)
        self.fit_info = {"components": int(components.shape[1]), "n_images": int(vectors.shape[0])}

    @torch.inference_mode()
    def _predict(self, images: ImageSet, with_maps: bool):
        scores = self.kde(self._reduce(self._vectors(images, "dfkde score"))).double().numpy()
        maps = None
        if with_maps:
            size = self.settings.image_size
            maps = np.broadcast_to(scores[:, None, None], (len(scores), size, size)).astype(np.float32)
        return scores, maps

    def fitted_state(self) -> dict:
        return {"pca_mean": self.pca[0], "pca_components": self.pca[1], "max_norm": self.max_norm,
                "kde_points": self.kde.points, "kde_whitening": self.kde.whitening, "kde_log_norm": self.kde.log_norm}

    def load_fitted_state(self, state: dict) -> None:
        self.pca = (state["pca_mean"], state["pca_components"])
        self.max_norm = float(state["max_norm"])
        self.kde = GaussianKDE(state["kde_points"], state["kde_whitening"], float(state["kde_log_norm"]))


register("dfkde-resnet18", DFKDE,
         "DFKDE: resnet18 layer4 global average, PCA to 16, Gaussian KDE (Scott bandwidth), -log density")
