"""STFPM (Wang et al., BMVC 2021, "Student-Teacher Feature Pyramid Matching for Anomaly Detection").

A frozen teacher backbone and a student of the same architecture trained from scratch to match
the teacher's feature pyramid on normal images. Per layer both maps are L2-normalised along the
channels; the loss is sum_l 1/(2 h_l w_l) * ||t_l - s_l||^2 summed over the batch and positions
(the reference code's MSE with reduction="sum"). The anomaly map is, per layer, 1/2 ||t - s||^2 at
each position (= 1 - cos(t, s)), bilinearly upsampled to the image, multiplied over the layers
(the paper's product; "sum" optional); the image score is the map's maximum.

Offline, the teacher is the shared extractor's backbone with `backbone_weights` (local weights,
the experiment's own pretraining with "ssl", by default `zoo.backbone_weights`) or a seeded random
initialisation; with random weights it still detects texture anomalies, but a pretrained teacher
is what the paper assumes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from competition.preprocess import IMAGENET_MEAN, IMAGENET_STD
from competition.zoo.api import BackboneParams
from competition.zoo.components.features import create_backbone
from competition.zoo.components.frozen import WithFrozenParts, freeze
from competition.zoo.components.normalise import ImageNormalise
from competition.zoo.registry import register
from competition.zoo.trained import TrainedAnomalyModel, TrainParams


@dataclass
class STFPMParams(TrainParams, BackboneParams):
    # The paper: SGD lr 0.4, momentum 0.9, weight decay 1e-4, batch 32, 100 epochs, 256 px.
    epochs: int = 100
    batch_size: int = 32
    optimizer: Literal["adamw", "adam", "sgd"] = "sgd"
    lr: float = 0.4
    momentum: float = 0.9
    weight_decay: float = 1.0e-4
    layers: tuple[int, ...] = (1, 2, 3)  # resnet layer1..layer3 (the paper's conv2_x..conv4_x)
    map_combination: Literal["product", "sum"] = "product"  # product (paper) | sum


class STFPMModel(WithFrozenParts):
    """[0, 1] images -> teacher and student pyramids (training) or (scores, maps) (forward)."""

    frozen_parts = ("teacher",)

    def __init__(self, teacher: nn.Module, student: nn.Module, map_combination: str = "product",
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        if map_combination not in ("product", "sum"):
            raise ValueError(f"stfpm: map_combination must be 'product' or 'sum', got {map_combination!r}")
        self.normalise = ImageNormalise(mean, std)
        self.teacher = freeze(teacher)
        self.student = student
        self.map_combination = map_combination

    def pyramids(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        x = self.normalise(images)
        with torch.no_grad():
            teacher = [f.float() for f in self.teacher(x)]
        student = [f.float() for f in self.student(x)]
        return teacher, student

    @staticmethod
    def loss(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> Tensor:
        total = 0.0
        for t, s in zip(teacher, student):
            h, w = t.shape[-2:]
            total = total + 0.5 / (h * w) * ((F.normalize(t, dim=1) - F.normalize(s, dim=1)) ** 2).sum()
        return total

    def anomaly_map(self, teacher: Sequence[Tensor], student: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        maps = None
        for t, s in zip(teacher, student):
            layer = 0.5 * ((F.normalize(t, dim=1) - F.normalize(s, dim=1)) ** 2).sum(1, keepdim=True)
            layer = F.interpolate(layer, size=size, mode="bilinear", align_corners=False)
            if maps is None:
                maps = layer
            else:
                maps = maps * layer if self.map_combination == "product" else maps + layer
        return maps[:, 0]

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        teacher, student = self.pyramids(images)
        maps = self.anomaly_map(teacher, student, tuple(images.shape[-2:]))
        return maps.flatten(1).amax(1), maps


class STFPM(TrainedAnomalyModel):
    family = "stfpm"
    params_class = STFPMParams
    params: STFPMParams

    def build_model(self) -> nn.Module:
        p = self.params
        layers = tuple(int(i) for i in p.layers)
        teacher = create_backbone(p.backbone, layers, self.settings.backbone_weights, self.settings.seed,
                                  init=self.settings.backbone_init,
                                  padding=self.settings.backbone_padding)
        student = create_backbone(p.backbone, layers, False, self.settings.seed + 1, frozen=False,
                                  padding=self.settings.backbone_padding)
        student.train()
        return STFPMModel(teacher, student, p.map_combination, self.settings.mean, self.settings.std)

    def training_step(self, batch: dict[str, Tensor]) -> Tensor:
        teacher, student = self.model.pyramids(batch["image"])
        return self.model.loss(teacher, student)

    def score_batch(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(images)

    def scoring_module(self) -> nn.Module:
        self._check_fitted()
        return self.model.eval()  # its forward is the scoring: [0, 1] images -> (scores, maps)

    def fit_summary(self) -> dict:
        weights = self.settings.backbone_weights
        return {"teacher_weights": str(weights) if weights else f"random init (seed {self.settings.seed})"}


register("stfpm-resnet18", STFPM,
         "STFPM: resnet18 teacher/student feature-pyramid matching, layers 1-3 (CPU budget: 6 of 100 epochs)",
         epochs=6)
register("stfpm-resnet18-paper", STFPM,
         "STFPM with the paper's schedule: resnet18, SGD lr 0.4, 100 epochs (GPU)", epochs=100)
register("stfpm-ssl", STFPM,
         "STFPM with the experiment's self-supervised teacher (make pretrain; CPU budget: 12 of 100 epochs)",
         backbone_weights="ssl", epochs=12)
