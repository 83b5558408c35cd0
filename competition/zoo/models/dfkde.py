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
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from competition.zoo.api import AnomalyModel, BackboneParams, ImageSet, ValidationSet
from competition.zoo.components.features import shared_extractor, with_backbone_statistics
from competition.zoo.components.pca import fit_pca
from competition.zoo.registry import register


@dataclass
class DFKDEParams(BackboneParams):
    layer: int = 4
    n_components: int = 16
    scale: bool = True  # divide by the largest training norm after PCA (anomalib's feature scaling)


class GaussianKDE(nn.Module):
    """-log density of a Gaussian KDE with a full bandwidth matrix, computed in whitened coordinates.

    Fitted state, buffers registered empty: the whitening matrix, the whitened training vectors and
    the log normalising constant.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("whitening", torch.empty(0, 0))  # (d, d): x -> x @ whitening has identity bandwidth
        self.register_buffer("points", torch.empty(0, 0))  # training vectors, whitened
        self.register_buffer("log_norm", torch.zeros((), dtype=torch.float64))  # log(n (2 pi)^(d/2) sqrt(det H))

    def fit(self, points: torch.Tensor) -> GaussianKDE:
        n, d = points.shape
        factor = n ** (-1.0 / (d + 4))  # Scott's rule
        cov = torch.cov(points.double().T).reshape(d, d) + 1e-10 * torch.eye(d, dtype=torch.float64)
        bandwidth = cov * factor ** 2
        chol = torch.linalg.cholesky(bandwidth)
        whitening = torch.linalg.inv(chol).T  # (x @ W)(x @ W)^T = x H^-1 x^T
        log_det = 2.0 * torch.log(torch.diagonal(chol)).sum()
        log_norm = math.log(n) + 0.5 * d * math.log(2 * math.pi) + 0.5 * float(log_det)
        self.whitening = whitening.float()
        self.points = points.float() @ self.whitening
        self.log_norm = torch.tensor(log_norm, dtype=torch.float64)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d2 = torch.cdist(x @ self.whitening, self.points) ** 2
        return -(torch.logsumexp(-0.5 * d2, dim=1) - float(self.log_norm))


class DFKDEModel(nn.Module):
    """Pooled feature vectors -> PCA -> scaling -> -log KDE density (the image score).

    Fitted state, buffers registered empty: the PCA mean and components, the scale and the KDE.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("pca_mean", torch.empty(0))
        self.register_buffer("pca_components", torch.empty(0, 0))
        self.register_buffer("max_norm", torch.ones((), dtype=torch.float64))
        self.register_buffer("backbone_statistics", torch.empty(0))  # BatchNorm statistics of a healthy random backbone
        self.kde = GaussianKDE()

    def reduce(self, vectors: torch.Tensor) -> torch.Tensor:
        return (vectors - self.pca_mean) @ self.pca_components / float(self.max_norm)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.kde(self.reduce(vectors))


class DFKDE(AnomalyModel):
    family = "dfkde"
    has_maps = False
    params_class = DFKDEParams
    params: DFKDEParams
    export_unsupported = ("not yet written as one scoring module: its scoring pools every image's vector "
                          "first, then runs the KDE over the whole set")

    @classmethod
    def extractor_layers(cls, params: DFKDEParams) -> tuple[int, ...]:
        return (params.layer,)

    def build_model(self) -> DFKDEModel:
        return DFKDEModel()

    def _vectors(self, images: ImageSet, desc: str, model: DFKDEModel, fit: bool = False) -> torch.Tensor:
        layer = self.params.layer
        extractor = shared_extractor(self.params.backbone, self.extractor_layers(self.params), self.settings)
        with_backbone_statistics(extractor, model, self.batchnorm_images(images) if fit else None)
        out = None
        for idx, maps in extractor.extract(images, desc=desc):
            (m,) = extractor.select(maps, [layer])
            pooled = m.mean((2, 3))
            if out is None:
                out = torch.empty(len(images), pooled.shape[1])
            out[torch.as_tensor(idx)] = pooled
        return out

    def _fit(self, images: ImageSet, validation: ValidationSet | None) -> None:
        model = self.build_model()
        vectors = self._vectors(images, "dfkde fit", model, fit=True)
        k = min(int(self.params.n_components), vectors.shape[0] - 1, vectors.shape[1])
        model.pca_mean, model.pca_components, _ = fit_pca(vectors, max(k, 1))
        reduced = model.reduce(vectors)
        if self.params.scale:
            max_norm = float(torch.linalg.vector_norm(reduced, dim=1).max().clamp(min=1e-12))
            model.max_norm = torch.tensor(max_norm, dtype=torch.float64)
            reduced = reduced / max_norm
        model.kde.fit(reduced)
        self.model = model.to(self.device)
        self.fit_info = {"components": int(model.pca_components.shape[1]), "n_images": int(vectors.shape[0])}

    @torch.inference_mode()
    def _predict(self, images: ImageSet, with_maps: bool):
        scores = self.model(self._vectors(images, "dfkde score", self.model).to(self.device)).double().cpu().numpy()
        maps = None
        if with_maps:
            size = self.settings.image_size
            maps = np.broadcast_to(scores[:, None, None], (len(scores), size, size)).astype(np.float32)
        return scores, maps


register("dfkde-resnet18", DFKDE,
         "DFKDE: resnet18 layer4 global average, PCA to 16, Gaussian KDE (Scott bandwidth), -log density")
