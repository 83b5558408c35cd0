"""FRE (Ndiour, Ahuja & Tickoo, "FRE: A Fast Method For Anomaly Detection And Segmentation", BMVC 2023).

A backbone layer's map (resnet18 layer3), average-pooled by `pool` x `pool` and flattened, is the
image's feature vector x, as in DFM. Instead of DFM's closed-form PCA, FRE learns the linear subspace
with a shallow tied autoencoder, x_hat = W^T (W x + b_e) + b_d (the decoder is the encoder's
transpose), trained by gradient descent (Adam, mean squared error) on the normal images' features, which
scales to feature sizes where an eigendecomposition would not. The feature reconstruction error
||x - x_hat||^2 is the image score; per pooled position (summed over the channels) it is the map,
upsampled to the image. Defaults follow the paper's reference implementation (anomalib's `Fre`):
latent dimension 220, 2 x 2 pooling, Adam lr 1e-3, 220 epochs of batch 32, Xavier-uniform W, zero biases.

Deviations from the paper:
- backbone resnet18 (layer3, 256 channels) instead of an ImageNet-pretrained resnet50 (layer3,
  1024 channels): the product runs offline and on CPUs, so the backbone is the zoo's shared resnet18
  (random init with healthy BatchNorm statistics by default, or local / self-supervised weights via
  `backbone_weights`), whose cached features DFM, PaDiM and PatchCore share;
- a latent dimension of at least the number of fit images lets the autoencoder span every training
  vector (as PCA would); with few normals, lower `latent_dim`;
- `blur_sigma` (default 0: none, as the reference) optionally smooths the upsampled map.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from competition.zoo.api import AnomalyModel, BackboneParams, ImageSet, ValidationSet
from competition.zoo.components.feature_training import SizedOnLoad, fit_on_rows
from competition.zoo.components.features import (
    BackboneScorer,
    FeatureExtractor,
    score_from_features,
    shared_extractor,
    with_backbone_statistics,
)
from competition.zoo.components.maps import SmoothedMaps
from competition.zoo.models.dfm import PooledFeatures, pooled_rows
from competition.zoo.registry import register


@dataclass
class FREParams(BackboneParams):
    layer: int = 3
    pool: int = 2  # average-pooling kernel (and stride) before flattening
    latent_dim: int = 220
    epochs: int = 220
    batch_size: int = 32
    lr: float = 1.0e-3
    blur_sigma: float = 0.0

    def __post_init__(self) -> None:
        for key in ("pool", "latent_dim", "epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"fre: {key} must be at least 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ValueError(f"fre: lr must be positive, got {self.lr}")
        if self.blur_sigma < 0:
            raise ValueError(f"fre: blur_sigma must be 0 (no smoothing) or positive, got {self.blur_sigma}")


class TiedLinearAutoencoder(SizedOnLoad):
    """x -> W^T (W x + b_e) + b_d: one weight matrix W (latent, input) shared by encoder and decoder.

    Its shape is the features' (known once fitted): `initialise` sizes it, loading takes the saved one.
    """

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(0, 0))
        self.encoder_bias = nn.Parameter(torch.empty(0))
        self.decoder_bias = nn.Parameter(torch.empty(0))

    def initialise(self, input_dim: int, latent_dim: int, generator: torch.Generator) -> None:
        weight = torch.empty(latent_dim, input_dim)
        bound = math.sqrt(6.0 / (latent_dim + input_dim))  # Xavier uniform, as the reference
        weight.uniform_(-bound, bound, generator=generator)
        self.weight = nn.Parameter(weight)
        self.encoder_bias = nn.Parameter(torch.zeros(latent_dim))
        self.decoder_bias = nn.Parameter(torch.zeros(input_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight, self.encoder_bias), self.weight.T, self.decoder_bias)


class FREModel(nn.Module):
    """Pooled features (B, C, h, w) -> (scores (B,), feature reconstruction error maps (B, h, w))."""

    def __init__(self):
        super().__init__()
        self.autoencoder = TiedLinearAutoencoder()
        self.register_buffer("backbone_statistics", torch.empty(0))  # BatchNorm statistics of a healthy random backbone

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, c, h, w = pooled.shape  # the batch stays symbolic (-1) for traced graphs
        x = pooled.flatten(1)
        error_map = ((x - self.autoencoder(x)).reshape(-1, c, h, w) ** 2).sum(1)
        return error_map.flatten(1).sum(1), error_map


class FRE(AnomalyModel):
    family = "fre"
    params_class = FREParams
    params: FREParams

    @classmethod
    def extractor_layers(cls, params: FREParams) -> tuple[int, ...]:
        return (params.layer,)

    def build_model(self) -> FREModel:
        return FREModel()

    def _extractor(self) -> FeatureExtractor:
        return shared_extractor(self.params.backbone, self.extractor_layers(self.params), self.settings)

    def _head(self) -> SmoothedMaps:
        return SmoothedMaps(self._pooling(self.model), self.settings.image_size, float(self.params.blur_sigma))

    def _pooling(self, head: nn.Module) -> PooledFeatures:
        # non-overlapping pooling (stride = kernel), as the reference
        return PooledFeatures(head, self.params.pool, stride=self.params.pool)

    def _fit(self, images: ImageSet, validation: ValidationSet | None) -> None:
        p = self.params
        model = self.build_model()
        extractor = with_backbone_statistics(self._extractor(), model, self.batchnorm_images(images))
        rows = pooled_rows(extractor, images, p.layer, p.pool, p.pool, "fre features").to(self.device)
        latent = min(int(p.latent_dim), rows.shape[1])
        model.autoencoder.initialise(rows.shape[1], latent, torch.Generator().manual_seed(self.settings.seed))
        model.to(self.device)
        optimizer = torch.optim.Adam(model.autoencoder.parameters(), lr=float(p.lr))

        def step(indices: torch.Tensor) -> torch.Tensor:
            batch = rows[indices.to(self.device)]
            return F.mse_loss(model.autoencoder(batch), batch)

        result = fit_on_rows(self, model, optimizer, len(rows), p.batch_size, p.epochs, step)
        self.model = model.eval()
        losses = [row["train_loss"] for row in result.history if "train_loss" in row]
        self.fit_info = {"feature_dim": int(rows.shape[1]), "latent_dim": latent, "epochs_run": len(losses),
                         "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
                         "resumed_from_epoch": result.resumed_after}

    @torch.inference_mode()
    def _predict(self, images: ImageSet, with_maps: bool):
        extractor = with_backbone_statistics(self._extractor(), self.model)
        head = self._head()

        def score_batch(feats):
            return head([f.to(self.device) for f in extractor.select(feats, [self.params.layer])])

        return score_from_features(extractor, images, self.settings.image_size, with_maps, "fre score", score_batch)

    def scoring_module(self) -> BackboneScorer:
        self._check_fitted()
        extractor = with_backbone_statistics(self._extractor(), self.model)
        return BackboneScorer(extractor, [self.params.layer], self._head()).eval()


register("fre-resnet18", FRE,
         "FRE: tied linear autoencoder (220-d) trained on resnet18 layer3 2x2-pooled features, reconstruction error")
register("fre-ssl", FRE,
         "FRE (layer3, 220-d tied autoencoder) on the experiment's self-supervised backbone (make pretrain)",
         backbone_weights="ssl")
