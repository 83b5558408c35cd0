"""STFPM (Wang et al., BMVC 2021, "Student-Teacher Feature Pyramid Matching for Anomaly Detection").

A frozen teacher backbone and a student of the same architecture trained from scratch to match
the teacher's feature pyramid on normal images. Per layer both maps are L2-normalised along the
channels; the loss is sum_l 1/(2 h_l w_l) * ||t_l - s_l||^2 summed over the batch and positions
(the reference code's MSE with reduction="sum"). The anomaly map is, per layer, 1/2 ||t - s||^2 at
each position (= 1 - cos(t, s)), bilinearly upsampled to the image, multiplied over the layers
(the paper's product; "sum" optional); the image score is the map's maximum.

Offline, the teacher is the shared extractor's backbone with `zoo.backbone_weights` (local
weights) or a seeded random initialisation; with random weights it still detects texture
anomalies, but a pretrained teacher is what the paper assumes.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from competition.zoo.features import create_backbone
from competition.zoo.registry import register
from competition.zoo.trained import ImageNormalise, TrainedAnomalyModel, train_defaults


class STFPMNetwork(nn.Module):
    """[0, 1] images -> teacher and student pyramids (training) or (scores, maps) (forward)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, map_combination: str = "product",
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
        super().__init__()
        if map_combination not in ("product", "sum"):
            raise ValueError(f"stfpm: map_combination must be 'product' or 'sum', got {map_combination!r}")
        self.normalise = ImageNormalise(mean, std)
        self.teacher = teacher
        self.student = student
        self.map_combination = map_combination
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True) -> "STFPMNetwork":
        super().train(mode)
        self.teacher.eval()  # frozen: BatchNorm statistics stay the teacher's
        return self

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
    # The paper: SGD lr 0.4, momentum 0.9, weight decay 1e-4, batch 32, 100 epochs, 256 px.
    DEFAULTS = {
        **train_defaults(epochs=100, batch_size=32, optimizer="sgd", lr=0.4, momentum=0.9, weight_decay=1.0e-4),
        "backbone": "resnet18",
        "layers": (1, 2, 3),  # resnet layer1..layer3 (the paper's conv2_x..conv4_x)
        "map_combination": "product",  # product (paper) | sum
    }

    def build_network(self) -> nn.Module:
        layers = tuple(int(i) for i in self.layers)
        teacher = create_backbone(self.backbone, layers, self.settings.backbone_weights, self.settings.seed)
        student = create_backbone(self.backbone, layers, False, self.settings.seed + 1, frozen=False)
        student.train()
        return STFPMNetwork(teacher, student, self.map_combination, self.settings.mean, self.settings.std)

    def training_step(self, batch: dict[str, Tensor]) -> Tensor:
        teacher, student = self.network.pyramids(batch["image"])
        return self.network.loss(teacher, student)

    def score_batch(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.network(images)

    def fit_summary(self) -> dict:
        weights = self.settings.backbone_weights
        return {"teacher_weights": str(weights) if weights else f"random init (seed {self.settings.seed})"}


register("stfpm-resnet18", STFPM,
         "STFPM: resnet18 teacher/student feature-pyramid matching, layers 1-3 (CPU-sized: 6 epochs)",
         epochs=6)
register("stfpm-resnet18-paper", STFPM,
         "STFPM with the paper's schedule: resnet18, SGD lr 0.4, 100 epochs (GPU)", epochs=100)
