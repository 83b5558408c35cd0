"""CFA (Lee, Lee & Song, "CFA: Coupled-hypersphere-based Feature Adaptation for Target-Oriented Anomaly
Localization", IEEE Access 2022), after the authors' reference implementation (sungwool/CFA_for_anomaly_localization).

Patch descriptor: the frozen backbone's layer1..layer3 maps, each 3 x 3 average-pooled (stride 1) and
bilinearly upsampled to layer1's grid, concatenated (448 channels for resnet18), then a trainable
1 x 1 coord-conv (the two coordinate channels in [-1, 1] appended) to 448 / `gamma_d` channels: phi(p).
Memory bank: the hypersphere centres are memorised before training, as the reference does: phi of
every normal image through the untrained descriptor, averaged over the normals position by position
(one centre per grid position); with `gamma_c` > 1 k-means compresses them to positions / gamma_c.
The centres then stay fixed. Loss (soft boundary, nu = 1e-3): with d the squared distances of a
patch to its K + J nearest centres, attraction (1/nu) mean(max(0, d_1..K - r^2)) pulls it inside
the radius r of its K nearest, repulsion (1/nu) mean(max(0, r^2 - d_K+1..K+J - alpha)) pushes the
J next ones out beyond r^2 - alpha; r (from 1e-5) trains with the descriptor by Adam (lr 1e-3,
weight decay 5e-4, amsgrad), 30 epochs of batch 4. Score per patch: the softmin-weighted squared
distance to the nearest centre, softmin(d_1..K)_1 * d_1; the map is upsampled and smoothed with a
Gaussian of sigma 4; the image score is its maximum.

Deviations from the paper:
- backbone resnet18 by default (the reference's `res18` option) rather than the paper's headline
  wide_resnet50_2 (`cfa-wide-resnet50` has it), random init with healthy BatchNorm statistics or
  local / self-supervised weights instead of ImageNet weights: the product runs offline on CPUs;
- the repulsion reads the J distances after the K nearest (the paper's definition); the reference
  indexes them from J, the same for its K = J = 3;
- the frozen features are extracted once through the zoo's feature cache (float16) and the
  descriptor trains on them: the reference recomputes them every epoch, the same numbers without
  augmentation; the maps are not min-max rescaled over the test set (the runner normalises scores).
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
from competition.zoo.registry import register


@dataclass
class CFAParams(BackboneParams):
    layers: tuple[int, ...] = (1, 2, 3)
    gamma_d: int = 1  # descriptor compression: output channels = input channels // gamma_d
    gamma_c: int = 1  # memory bank compression: positions // gamma_c centres (k-means when > 1)
    num_nearest: int = 3  # K: centres a patch is attracted to, and the softmin's neighbours
    num_hard_negatives: int = 3  # J: the next-nearest centres it is pushed away from
    radius: float = 1.0e-5  # initial hypersphere radius r (trained)
    alpha: float = 0.1  # repulsion margin
    nu: float = 1.0e-3  # soft-boundary weight: the losses are scaled by 1 / nu
    epochs: int = 30
    batch_size: int = 4
    lr: float = 1.0e-3
    weight_decay: float = 5.0e-4
    blur_sigma: float = 4.0

    def __post_init__(self) -> None:
        for key in ("gamma_d", "gamma_c", "num_nearest", "epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"cfa: {key} must be at least 1, got {getattr(self, key)}")
        if self.num_hard_negatives < 0:
            raise ValueError(f"cfa: num_hard_negatives must be 0 or more, got {self.num_hard_negatives}")
        for key in ("radius", "nu", "lr"):
            if not getattr(self, key) > 0:
                raise ValueError(f"cfa: {key} must be positive, got {getattr(self, key)}")
        if self.alpha < 0 or self.weight_decay < 0 or self.blur_sigma < 0:
            raise ValueError(f"cfa: alpha, weight_decay and blur_sigma must be 0 or more, got {self.alpha}, "
                             f"{self.weight_decay}, {self.blur_sigma}")


def patch_features(maps: list[torch.Tensor]) -> torch.Tensor:
    """Backbone maps -> (B, sum C, h, w): each 3 x 3 average-pooled, upsampled to the first map's grid, concatenated."""
    size = maps[0].shape[-2:]
    pooled = [F.avg_pool2d(m, 3, 1, 1) for m in maps]
    return torch.cat([p if p.shape[-2:] == size else F.interpolate(p, size=size, mode="bilinear", align_corners=False)
                      for p in pooled], dim=1)


class CoordConvDescriptor(SizedOnLoad):
    """A 1 x 1 convolution over the features and two coordinate channels (x, y in [-1, 1]) (Liu et al.'s
    CoordConv, as the reference). Sized when fitted (`initialise`); loading takes the saved shape."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(0, 0))
        self.bias = nn.Parameter(torch.empty(0))

    def initialise(self, in_channels: int, out_channels: int, generator: torch.Generator) -> None:
        bound = 1.0 / math.sqrt(in_channels + 2)  # nn.Conv2d's default initialisation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels + 2).uniform_(-bound, bound,
                                                                                       generator=generator))
        self.bias = nn.Parameter(torch.empty(out_channels).uniform_(-bound, bound, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(x.shape[0], 1, h, w)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(x.shape[0], 1, h, w)
        return F.conv2d(torch.cat([x, xs, ys], dim=1), self.weight[:, :, None, None], self.bias)


class CFAModel(nn.Module):
    """Backbone maps -> (B, h, w) patch scores: softmin-weighted squared distance to the nearest centres.

    Fitted state: the descriptor's weights and the radius (trained), the memorised centres (M, D)
    (a buffer registered empty) and the healthy random backbone's BatchNorm statistics.
    """

    def __init__(self, num_nearest: int = 3, num_hard_negatives: int = 3, radius: float = 1e-5, alpha: float = 0.1,
                 nu: float = 1e-3):
        super().__init__()
        self.descriptor = CoordConvDescriptor()
        self.radius = nn.Parameter(torch.tensor([float(radius)]))
        self.register_buffer("centres", torch.empty(0, 0))
        self.register_buffer("backbone_statistics", torch.empty(0))
        self.num_nearest, self.num_hard_negatives = int(num_nearest), int(num_hard_negatives)
        self.alpha, self.nu = float(alpha), float(nu)

    def describe(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """phi(p): (B, D, h, w)."""
        return self.descriptor(patch_features(maps))

    def nearest_distances(self, phi: torch.Tensor, k: int) -> torch.Tensor:
        """(B, h * w, k) squared distances of every patch to its k nearest centres, ascending."""
        patches = phi.flatten(2).transpose(1, 2)  # (B, P, D)
        distances = ((patches ** 2).sum(-1, keepdim=True) + (self.centres ** 2).sum(-1)
                     - 2.0 * patches @ self.centres.T)
        return torch.topk(distances, min(k, self.centres.shape[0]), dim=-1, largest=False).values

    def loss(self, phi: torch.Tensor) -> dict[str, torch.Tensor]:
        k = self.num_nearest
        d = self.nearest_distances(phi, k + self.num_hard_negatives)
        r2 = self.radius ** 2
        attraction = torch.relu(d[..., :k] - r2).mean() / self.nu
        repulsion = (torch.relu(r2 - d[..., k:] - self.alpha).mean() / self.nu if d.shape[-1] > k
                     else torch.zeros((), device=d.device))
        return {"loss": attraction + repulsion, "attraction": attraction, "repulsion": repulsion}

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        phi = self.describe(maps)
        d = self.nearest_distances(phi, self.num_nearest)
        scores = F.softmin(d, dim=-1)[..., 0] * d[..., 0]
        return scores.reshape(-1, phi.shape[-2], phi.shape[-1])


class CFA(AnomalyModel):
    family = "cfa"
    params_class = CFAParams
    params: CFAParams

    @classmethod
    def extractor_layers(cls, params: CFAParams) -> tuple[int, ...]:
        return tuple(params.layers)

    def build_model(self) -> CFAModel:
        p = self.params
        return CFAModel(p.num_nearest, p.num_hard_negatives, p.radius, p.alpha, p.nu)

    def _extractor(self) -> FeatureExtractor:
        return shared_extractor(self.params.backbone, self.extractor_layers(self.params), self.settings)

    def _head(self) -> SmoothedMaps:
        return SmoothedMaps(self.model, self.settings.image_size, float(self.params.blur_sigma))

    @torch.no_grad()
    def _memorise_centres(self, model: CFAModel, maps: list[torch.Tensor]) -> torch.Tensor:
        """The untrained descriptor's phi averaged over the normals, one centre per position (M, D)."""
        total = None
        for start in range(0, len(maps[0]), self.settings.batch_size):
            batch = [m[start:start + self.settings.batch_size].to(self.device).float() for m in maps]
            phi = model.describe(batch).double().sum(0)
            total = phi if total is None else total + phi
        centres = (total / len(maps[0])).flatten(1).T.float()  # (h * w, D)
        if self.params.gamma_c > 1:
            from sklearn.cluster import KMeans

            clusters = max(1, centres.shape[0] // int(self.params.gamma_c))
            kmeans = KMeans(n_clusters=clusters, max_iter=3000, n_init=10, random_state=self.settings.seed)
            centres = torch.from_numpy(kmeans.fit(centres.cpu().numpy()).cluster_centers_).float()
        return centres.to(self.device)

    def _fit(self, images: ImageSet, validation: ValidationSet | None) -> None:
        p = self.params
        model = self.build_model()
        extractor = with_backbone_statistics(self._extractor(), model, self.batchnorm_images(images))
        maps = [m.half() for m in extractor.select(extractor.extract_all(images, desc="cfa features"), p.layers)]
        channels = sum(m.shape[1] for m in maps)
        model.descriptor.initialise(channels, max(1, channels // int(p.gamma_d)),
                                    torch.Generator().manual_seed(self.settings.seed))
        model.to(self.device)
        model.centres = self._memorise_centres(model, maps)
        optimizer = torch.optim.Adam(model.parameters(), lr=float(p.lr), weight_decay=float(p.weight_decay),
                                     amsgrad=True)

        def step(indices: torch.Tensor) -> dict[str, torch.Tensor]:
            batch = [m[indices].to(self.device).float() for m in maps]
            return model.loss(model.describe(batch))

        result = fit_on_rows(self, model, optimizer, len(images), p.batch_size, p.epochs, step)
        self.model = model.eval()
        losses = [row["train_loss"] for row in result.history if "train_loss" in row]
        self.fit_info = {"descriptor_channels": int(model.descriptor.weight.shape[0]),
                         "centres": int(model.centres.shape[0]), "radius": float(model.radius.detach().abs()),
                         "epochs_run": len(losses), "first_loss": losses[0] if losses else None,
                         "final_loss": losses[-1] if losses else None, "resumed_from_epoch": result.resumed_after}

    @torch.inference_mode()
    def _predict(self, images: ImageSet, with_maps: bool):
        extractor = with_backbone_statistics(self._extractor(), self.model)
        head = self._head()

        def score_batch(feats):
            return head([f.to(self.device) for f in extractor.select(feats, self.params.layers)])

        return score_from_features(extractor, images, self.settings.image_size, with_maps, "cfa score", score_batch)

    def scoring_module(self) -> BackboneScorer:
        self._check_fitted()
        extractor = with_backbone_statistics(self._extractor(), self.model)
        return BackboneScorer(extractor, self.params.layers, self._head()).eval()


register("cfa-resnet18", CFA,
         "CFA: coord-conv patch descriptor on resnet18 layer1-3, coupled-hypersphere loss to memorised centres "
         "(CPU budget: 10 of 30 epochs)", epochs=10)
register("cfa-wide-resnet50", CFA,
         "CFA as in the paper's headline setting: wide_resnet50_2 layer1-3 (1792-d descriptor), 30 epochs "
         "(slow on CPU)", backbone="wide_resnet50_2")
register("cfa-ssl", CFA,
         "CFA (resnet18 layer1-3) on the experiment's self-supervised backbone (make pretrain; CPU budget: 10 of "
         "30 epochs)", backbone_weights="ssl", epochs=10)
