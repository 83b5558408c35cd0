"""Reverse Distillation (Deng & Li, CVPR 2022, "Anomaly Detection via Reverse Distillation from
One-Class Embedding").

A frozen ResNet encoder (teacher) gives layer1..layer3; the trainable one-class bottleneck (OCBE)
fuses them (multi-scale feature fusion: layer1 through two stride-2 3x3 convs, layer2 through one,
concatenated with layer3) and compresses them with a ResNet stage (the one-class embedding); a
student decoder, a mirror-image ResNet whose stride-2 blocks upsample with 2x2 transposed convs,
reconstructs the three encoder maps from that embedding. Loss: sum over scales of the mean over
the batch of 1 - cos(teacher, student), each map flattened to one vector (the reference code).
Anomaly map: sum over scales of the per-position 1 - cos, upsampled to the image, Gaussian
smoothed (sigma 4); image score: its maximum.

Offline, the encoder is the shared extractor's backbone with `backbone_weights` (by default
`zoo.backbone_weights`) or a seeded random initialisation (the paper uses ImageNet weights).
ResNet-style timm backbones only.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1, conv3x3

from competition.preprocess import IMAGENET_MEAN, IMAGENET_STD
from competition.zoo.api import BackboneParams
from competition.zoo.components.features import create_backbone
from competition.zoo.components.frozen import WithFrozenParts, freeze
from competition.zoo.components.maps import gaussian_blur_maps
from competition.zoo.components.normalise import ImageNormalise
from competition.zoo.registry import register
from competition.zoo.trained import TrainedAnomalyModel, TrainParams


@dataclass
class ReverseDistillationParams(TrainParams, BackboneParams):
    # The paper: Adam lr 0.005, betas (0.5, 0.999), batch 16, 200 epochs, 256 px, wide_resnet50_2.
    epochs: int = 200
    batch_size: int = 16
    optimizer: Literal["adamw", "adam", "sgd"] = "adam"
    lr: float = 0.005
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    oce_blocks: int = 2  # blocks of the one-class embedding stage (reference: 2 for resnet18, 3 for WRN-50)
    decoder_blocks: tuple[int, ...] = (2, 2, 2)  # blocks per decoder stage, deep to shallow (resnet18: 2, 2, 2)
    width_per_group: int = 64  # bottleneck width (128 for wide resnets)
    map_sigma: float = 4.0


def _conv_bn_relu(inplanes: int, planes: int) -> nn.Sequential:
    return nn.Sequential(conv3x3(inplanes, planes, 2), nn.BatchNorm2d(planes), nn.ReLU(inplace=True))


class OneClassBottleneck(nn.Module):
    """OCBE: multi-scale feature fusion, then a stride-2 ResNet stage as the one-class embedding."""

    def __init__(self, channels: Sequence[int], expansion: int, blocks: int, width_per_group: int = 64):
        super().__init__()
        c1, c2, c3 = channels
        self.fuse_first = nn.Sequential(_conv_bn_relu(c1, c2), _conv_bn_relu(c2, c3))
        self.fuse_second = _conv_bn_relu(c2, c3)
        block = BasicBlock if expansion == 1 else Bottleneck
        planes = 2 * c3 // expansion  # resnet layer4 width: 512 planes
        downsample = nn.Sequential(conv1x1(3 * c3, planes * expansion, 2), nn.BatchNorm2d(planes * expansion))
        extra = {} if block is BasicBlock else {"base_width": width_per_group}
        stage = [block(3 * c3, planes, 2, downsample, **extra)]
        stage += [block(planes * expansion, planes, **extra) for _ in range(1, blocks)]
        self.embed = nn.Sequential(*stage)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        fused = torch.cat([self.fuse_first(features[0]), self.fuse_second(features[1]), features[2]], dim=1)
        return self.embed(fused)


class DecoderBasicBlock(nn.Module):
    """BasicBlock run backwards: a stride-2 block upsamples with a 2x2 transposed conv."""
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, upsample: nn.Module | None = None, **_):
        super().__init__()
        self.conv1 = (nn.ConvTranspose2d(inplanes, planes, 2, stride=2, bias=False) if stride == 2
                      else conv3x3(inplanes, planes))
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.upsample = upsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.upsample is None else self.upsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class DecoderBottleneck(nn.Module):
    """Bottleneck run backwards: the middle 3x3 conv becomes a 2x2 transposed conv when stride is 2."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, upsample: nn.Module | None = None,
                 width_per_group: int = 64):
        super().__init__()
        width = int(planes * (width_per_group / 64.0))
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = (nn.ConvTranspose2d(width, width, 2, stride=2, bias=False) if stride == 2
                      else conv3x3(width, width))
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.upsample = upsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.upsample is None else self.upsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ReverseResNetDecoder(nn.Module):
    """The student: three upsampling stages mirroring the encoder's layer3, layer2, layer1."""

    def __init__(self, channels: Sequence[int], expansion: int, blocks: Sequence[int], width_per_group: int = 64):
        super().__init__()
        block = DecoderBasicBlock if expansion == 1 else DecoderBottleneck
        inplanes = 2 * channels[2]
        stages = []
        for out_channels, n_blocks in zip(reversed(channels), blocks):
            planes = out_channels // expansion
            upsample = nn.Sequential(nn.ConvTranspose2d(inplanes, planes * expansion, 2, stride=2, bias=False),
                                     nn.BatchNorm2d(planes * expansion))
            stage = [block(inplanes, planes, 2, upsample, width_per_group=width_per_group)]
            stage += [block(planes * expansion, planes, width_per_group=width_per_group) for _ in range(1, n_blocks)]
            stages.append(nn.Sequential(*stage))
            inplanes = planes * expansion
        self.stages = nn.ModuleList(stages)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, embedding: Tensor) -> list[Tensor]:
        outputs, x = [], embedding
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs[::-1]  # shallow to deep, like the encoder's maps


class ReverseDistillationModel(WithFrozenParts):
    """[0, 1] images -> frozen encoder maps and the decoder's reconstruction of them; forward: (scores, maps)."""

    frozen_parts = ("encoder",)

    def __init__(self, encoder: nn.Module, bottleneck: nn.Module, decoder: nn.Module, map_sigma: float = 4.0,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.normalise = ImageNormalise(mean, std)
        self.encoder = freeze(encoder)
        self.bottleneck = bottleneck
        self.decoder = decoder
        self.map_sigma = map_sigma

    def encode_decode(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        with torch.no_grad():
            teacher = [f.float() for f in self.encoder(self.normalise(images))]
        student = [f.float() for f in self.decoder(self.bottleneck(teacher))]
        return teacher, student

    @staticmethod
    def loss(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> Tensor:
        return sum(torch.mean(1 - F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1))
                   for t, s in zip(teacher, student))

    def anomaly_map(self, teacher: Sequence[Tensor], student: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        maps = sum(F.interpolate((1 - F.cosine_similarity(t, s, dim=1))[:, None], size=size, mode="bilinear",
                                 align_corners=False) for t, s in zip(teacher, student))
        return gaussian_blur_maps(maps[:, 0], self.map_sigma)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        teacher, student = self.encode_decode(images)
        maps = self.anomaly_map(teacher, student, tuple(images.shape[-2:]))
        return maps.flatten(1).amax(1), maps


def reverse_distillation_parts(model: TrainedAnomalyModel) -> tuple[nn.Module, nn.Module, nn.Module, list[int]]:
    """The frozen layer1-3 encoder, one-class bottleneck and reverse decoder of `model`'s params (backbone,
    oce_blocks, decoder_blocks, width_per_group), and the encoder's channels: Reverse Distillation's and
    UniNet's student frame."""
    p, settings = model.params, model.settings
    encoder = create_backbone(p.backbone, (1, 2, 3), settings.backbone_weights, settings.seed,
                              init=settings.backbone_init,
                              padding=settings.backbone_padding)
    channels = list(encoder.feature_info.channels())
    expansion = channels[0] // 64
    if expansion not in (1, 4) or channels != [channels[0], 2 * channels[0], 4 * channels[0]]:
        raise ValueError(f"{model.family}: backbone {p.backbone!r} has layer1-3 channels {channels}; "
                         "a ResNet-style backbone (resnet18/34/50, wide_resnet50_2) is needed")
    bottleneck = OneClassBottleneck(channels, expansion, int(p.oce_blocks), int(p.width_per_group))
    decoder = ReverseResNetDecoder(channels, expansion, [int(b) for b in p.decoder_blocks], int(p.width_per_group))
    return encoder, bottleneck, decoder, channels


class ReverseDistillation(TrainedAnomalyModel):
    family = "reverse-distillation"
    params_class = ReverseDistillationParams
    params: ReverseDistillationParams

    def build_model(self) -> nn.Module:
        encoder, bottleneck, decoder, _ = reverse_distillation_parts(self)
        return ReverseDistillationModel(encoder, bottleneck, decoder, float(self.params.map_sigma),
                                        self.settings.mean, self.settings.std)

    def training_step(self, batch: dict[str, Tensor]) -> Tensor:
        teacher, student = self.model.encode_decode(batch["image"])
        return self.model.loss(teacher, student)

    def score_batch(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(images)

    def scoring_module(self) -> nn.Module:
        self._check_fitted()
        return self.model.eval()  # its forward is the scoring: [0, 1] images -> (scores, maps)

    def fit_summary(self) -> dict:
        weights = self.settings.backbone_weights
        return {"encoder_weights": str(weights) if weights else f"random init (seed {self.settings.seed})"}


register("reverse-distillation-resnet18", ReverseDistillation,
         "Reverse Distillation: resnet18 encoder, OCBE bottleneck, reverse-resnet decoder (CPU-sized: 10 epochs)",
         epochs=10)
register("reverse-distillation-wide-resnet50", ReverseDistillation,
         "Reverse Distillation as in the paper: wide_resnet50_2 encoder, 3 OCE blocks, 200 epochs (GPU)",
         backbone="wide_resnet50_2", oce_blocks=3, decoder_blocks=(3, 4, 6), width_per_group=128)
