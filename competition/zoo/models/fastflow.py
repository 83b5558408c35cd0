"""FastFlow (Yu et al. 2021, "FastFlow: Unsupervised Anomaly Detection and Localization via 2D
Normalizing Flows"): one 2D flow per feature scale of a frozen backbone, coupling subnets that
alternate 3x3 and 1x1 convolutions, trained by maximum likelihood on normal images only.

Map and score follow anomalib's convention: per scale the likelihood exp(-0.5 * mean_c z^2), negated,
upsampled and averaged over scales; the image score is the map's maximum.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from competition.zoo.api import BackboneParams
from competition.zoo.components.features import create_backbone
from competition.zoo.components.flow_blocks import (
    AllInOneCoupling,
    FrozenFeatures,
    SequenceFlow,
    conv_subnet,
    likelihood_map,
)
from competition.zoo.registry import register
from competition.zoo.trained import TrainedAnomalyModel, TrainParams


@dataclass
class FastFlowParams(TrainParams, BackboneParams):
    # Paper/anomalib: Adam, lr 1e-3, weight decay 1e-5; epochs CPU-sized (the paper trains 500).
    epochs: int = 8
    batch_size: int = 8
    optimizer: Literal["adamw", "adam", "sgd"] = "adam"
    lr: float = 1.0e-3
    weight_decay: float = 1.0e-5
    layers: tuple[int, ...] = (1, 2, 3)  # timm feature indices: resnet layer1..layer3 (anomalib's choice for resnet18)
    flow_steps: int = 8
    hidden_ratio: float = 1.0  # subnet hidden channels / input channels
    conv3x3_only: bool = False
    clamp: float = 2.0  # soft clamp of the coupling log-scales


def fastflow_scale(channels: int, flow_steps: int, hidden_ratio: float, conv3x3_only: bool, clamp: float,
                   seed: int) -> SequenceFlow:
    """The flow of one scale: odd steps use 1x1 subnets unless `conv3x3_only` (paper, Sec. 3.3)."""
    blocks = []
    for step in range(flow_steps):
        kernel = 1 if step % 2 == 1 and not conv3x3_only else 3
        blocks.append(AllInOneCoupling(channels, conv_subnet(kernel, hidden_ratio), affine_clamping=clamp,
                                       permute_soft=False, seed=seed + step))
    return SequenceFlow(blocks)


class FastFlowModel(nn.Module):
    """Images in [0, 1] -> per-scale latents and log-dets (training) or image scores and maps (eval).

    Every scale's features are standardised by a LayerNorm over (C, h, w) without affine
    parameters: trainable ones sit outside the flow's Jacobian, so the likelihood could be raised
    without bound just by shrinking them (anomalib trains them; we do not).
    """

    def __init__(self, features: FrozenFeatures, flow_steps: int = 8, hidden_ratio: float = 1.0,
                 conv3x3_only: bool = False, clamp: float = 2.0, seed: int = 0):
        super().__init__()
        self.features = features
        self.flows = nn.ModuleList([
            fastflow_scale(c, flow_steps, hidden_ratio, conv3x3_only, clamp, seed=seed + 1000 * i)
            for i, c in enumerate(features.channels)])

    def encode(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(latents z per scale, log|det J| per scale, each (B,))."""
        latents, log_dets = [], []
        features = self.features(images)
        with torch.autocast(images.device.type, enabled=False):  # flows in float32: exp and log-dets
            for feature, flow in zip(features, self.flows):
                shape = [int(n) for n in feature.shape[1:]]  # ints: a traced graph keeps them as constants
                z, log_det = flow(F.layer_norm(feature.float(), shape))
                latents.append(z)
                log_dets.append(log_det)
        return latents, log_dets

    @staticmethod
    def loss(latents: Sequence[Tensor], log_dets: Sequence[Tensor]) -> Tensor:
        """Negative log-likelihood up to a constant: sum over scales of mean_b(0.5 ||z||^2 - log|det J|)."""
        return sum(torch.mean(0.5 * (z ** 2).flatten(1).sum(1) - log_det) for z, log_det in zip(latents, log_dets))

    @staticmethod
    def anomaly_map(latents: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        """(B, H, W): mean over scales of -exp(-0.5 mean_c z^2), bilinearly upsampled; in [-1, 0]."""
        return -likelihood_map(latents, size)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(scores (B,), maps (B, H, W)) at the input's size."""
        latents, _ = self.encode(images)
        maps = self.anomaly_map(latents, tuple(images.shape[-2:]))
        return maps.flatten(1).amax(1), maps


# ---------------------------------------------------------------- the zoo model

class FastFlow(TrainedAnomalyModel):
    family = "fastflow"
    params_class = FastFlowParams
    params: FastFlowParams

    def build_model(self) -> nn.Module:
        p = self.params
        backbone = create_backbone(p.backbone, p.layers, self.settings.backbone_weights, self.settings.seed,
                                   init=self.settings.backbone_init,
                                   padding=self.settings.backbone_padding)
        return FastFlowModel(FrozenFeatures(backbone), flow_steps=p.flow_steps, hidden_ratio=p.hidden_ratio,
                             conv3x3_only=p.conv3x3_only, clamp=p.clamp, seed=self.settings.seed)

    def training_step(self, batch: dict[str, Tensor]) -> Tensor:
        latents, log_dets = self.model.encode(batch["image"])
        return self.model.loss(latents, log_dets)

    def score_batch(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(images)

    def scoring_module(self) -> nn.Module:
        self._check_fitted()
        return self.model.eval()  # its forward is the scoring: [0, 1] images -> (scores, maps)


register("fastflow-resnet18", FastFlow,
         "FastFlow: 2D normalizing flows (8 steps, 3x3/1x1 subnets) on resnet18 layer1-3, max of -likelihood map "
         "(CPU budget: 8 of 500 epochs)")
