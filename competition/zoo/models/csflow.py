"""CS-Flow (Rudolph, Wehrbein, Rosenhahn, Wandt 2022, "Fully Convolutional Cross-Scale-Flows for
Image-based Defect Detection", WACV): the image at three resolutions (S, S/2, S/4) through one frozen
backbone layer, and a single normalizing flow over the three feature maps jointly, whose coupling
subnets exchange information across scales (`components.flow_blocks.CrossScaleCoupling`). Trained
by maximum likelihood on normal images: the loss is the negative log-likelihood of all latents,
the log-dets of the three scales summed, per dimension (the reference code's normalisation).

Score (paper and reference code): the mean over every position, channel and scale of z^2 / 2.
Map (paper): the finest scale's per-position mean_c z^2 / 2, bilinearly upsampled to the image.

The paper extracts EfficientNet-B5 features (ImageNet weights, 304 channels at stride 32, 768 px
input); here the backbone is any timm model with the run's local weights or a random init with
calibrated BatchNorm statistics, like every zoo flow. timm exposes EfficientNet-B5's stride-32
features only after its last stage (512 channels), so the paper entry uses those. Not in the paper
(`standardise`, on in the CPU entry): each scale's features are standardised per channel with the
training normals' mean and std, a fixed affine map in front of the flow, so that a few epochs start
from a sensible Gaussian instead of raw feature magnitudes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from competition.zoo.api import BackboneParams, unit_tensor
from competition.zoo.components.features import create_backbone
from competition.zoo.components.flow_blocks import CrossScaleCoupling, CrossScaleFlow, FrozenFeatures
from competition.zoo.registry import register
from competition.zoo.trained import TrainedAnomalyModel, TrainParams


@dataclass
class CSFlowParams(TrainParams, BackboneParams):
    # Reference code: Adam lr 2e-4, eps 1e-4, weight decay 1e-5, gradient norm clipped to 1, batch 16,
    # 4 coupling blocks (kernels 3, 3, 3, 5), 1024 hidden channels, clamp 3, 240 epochs.
    # Defaults here are CPU-sized: 8 epochs, 128 hidden channels, lr 2e-3.
    epochs: int = 8
    batch_size: int = 8
    optimizer: Literal["adamw", "adam", "sgd"] = "adam"
    lr: float = 2.0e-3
    weight_decay: float = 1.0e-5
    adam_eps: float = 1.0e-4
    grad_clip: float = 1.0
    layer: int = 2  # timm feature index: resnet18 layer2 (stride 8: 16, 8 and 4 positions a side at 128 px)
    n_scales: int = 3
    coupling_blocks: int = 4
    kernel_sizes: tuple[int, ...] = (3, 3, 3, 5)  # one per coupling block
    hidden_channels: int = 128
    clamp: float = 3.0  # the paper's alpha: log-scales stay in (-alpha, alpha)
    # standardise each scale's features per channel with the training normals' mean and std (not in the paper)
    standardise: bool = True


class CSFlowModel(nn.Module):
    """Images in [0, 1] -> latents of the three scales (finest first) and the summed log|det J|."""

    def __init__(self, features: FrozenFeatures, n_scales: int = 3, coupling_blocks: int = 4,
                 kernel_sizes: Sequence[int] = (3, 3, 3, 5), hidden_channels: int = 1024, clamp: float = 3.0,
                 seed: int = 0):
        super().__init__()
        if len(features.channels) != 1:
            raise ValueError(f"csflow reads one backbone layer, got {len(features.channels)}")
        if len(kernel_sizes) != coupling_blocks:
            raise ValueError(f"csflow: kernel_sizes has {len(kernel_sizes)} entries for {coupling_blocks} "
                             "coupling_blocks; give one kernel size per block")
        self.features = features
        self.n_scales = n_scales
        self.flow = CrossScaleFlow([
            CrossScaleCoupling(features.channels[0], n_scales, hidden_channels, kernel_sizes[k], clamp, seed=seed + k)
            for k in range(coupling_blocks)])
        # Per scale and channel: a fixed affine map in front of the flow (identity unless `standardise` fits it).
        self.register_buffer("feature_mean", torch.zeros(n_scales, features.channels[0]))
        self.register_buffer("feature_std", torch.ones(n_scales, features.channels[0]))

    def scale_features(self, images: Tensor) -> list[Tensor]:
        """The backbone layer of the image at sizes S, S/2, S/4, ... (nearest resize, as the reference)."""
        height, width = (int(n) for n in images.shape[-2:])
        out = []
        for s in range(self.n_scales):
            scaled = images if s == 0 else F.interpolate(images, size=(height >> s, width >> s))
            out.append(self.features(scaled)[0])
        return out

    @torch.no_grad()
    def standardise(self, batches: Sequence[Tensor]) -> None:
        """Set the fixed per-scale, per-channel mean and std from image batches (training normals)."""
        total, total_sq, count = 0.0, 0.0, 0
        for images in batches:
            scales = [f.double() for f in self.scale_features(images)]
            features = torch.stack([f.mean((2, 3)) for f in scales])  # (scales, B, C)
            squares = torch.stack([f.pow(2).mean((2, 3)) for f in scales])
            total, total_sq, count = total + features.sum(1), total_sq + squares.sum(1), count + len(images)
        mean = total / count
        std = (total_sq / count - mean ** 2).clamp_min(0).sqrt()
        self.feature_mean.copy_(mean.float())
        # Channels (nearly) constant on the normals get a floor: else any other value there is a huge z.
        self.feature_std.copy_(torch.maximum(std, 0.01 * std.mean(1, keepdim=True)).clamp_min(1e-6).float())

    def encode(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        features = self.scale_features(images)
        with torch.autocast(images.device.type, enabled=False):  # the flow in float32: exp and log-dets
            return self.flow([(f.float() - mean[:, None, None]) / std[:, None, None]
                              for f, mean, std in zip(features, self.feature_mean, self.feature_std)])

    @staticmethod
    def loss(latents: Sequence[Tensor], log_det: Tensor) -> Tensor:
        """Negative log-likelihood per dimension, up to a constant: mean_b(0.5 ||z||^2 - log|det J|) / D."""
        z = torch.cat([z.flatten(1) for z in latents], dim=1)
        return torch.mean(0.5 * (z ** 2).sum(1) - log_det) / z.shape[1]

    @staticmethod
    def image_scores(latents: Sequence[Tensor]) -> Tensor:
        """(B,): mean of z^2 / 2 over every position, channel and scale."""
        return 0.5 * torch.cat([z.flatten(1) for z in latents], dim=1).pow(2).mean(1)

    @staticmethod
    def anomaly_map(latents: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        """(B, H, W): the finest scale's mean_c z^2 / 2, bilinearly upsampled."""
        finest = 0.5 * latents[0].pow(2).mean(1, keepdim=True)
        return F.interpolate(finest, size=size, mode="bilinear", align_corners=False)[:, 0]

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(scores (B,), maps (B, H, W)) at the input's size."""
        latents, _ = self.encode(images)
        return self.image_scores(latents), self.anomaly_map(latents, tuple(images.shape[-2:]))


# ---------------------------------------------------------------- the zoo model

class CSFlow(TrainedAnomalyModel):
    family = "csflow"
    params_class = CSFlowParams
    params: CSFlowParams

    def build_model(self) -> nn.Module:
        p = self.params
        backbone = create_backbone(p.backbone, (p.layer,), self.settings.backbone_weights, self.settings.seed,
                                   init=self.settings.backbone_init,
                                   padding=self.settings.backbone_padding)
        return CSFlowModel(FrozenFeatures(backbone), n_scales=p.n_scales, coupling_blocks=p.coupling_blocks,
                           kernel_sizes=p.kernel_sizes, hidden_channels=p.hidden_channels, clamp=p.clamp,
                           seed=self.settings.seed)

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        p = self.params
        if p.optimizer != "adam":
            return super().build_optimizer(params)
        return torch.optim.Adam(params, lr=p.lr, betas=tuple(p.betas), eps=p.adam_eps, weight_decay=p.weight_decay)

    def before_training(self, normals: np.ndarray) -> None:
        if not self.params.standardise:
            return
        step = self.settings.batch_size
        self.model.standardise([unit_tensor(normals[i:i + step]).to(self.device) for i in range(0, len(normals), step)])

    def training_step(self, batch: dict[str, Tensor]) -> Tensor:
        latents, log_det = self.model.encode(batch["image"])
        return self.model.loss(latents, log_det)

    def score_batch(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(images)

    def scoring_module(self) -> nn.Module:
        self._check_fitted()
        return self.model.eval()  # its forward is the scoring: [0, 1] images -> (scores, maps)


register("csflow-resnet18", CSFlow,
         "CS-Flow: cross-scale flow (4 blocks, 128 hidden) on resnet18 layer2 of the image at 3 scales, "
         "mean z^2 score (CPU budget: 8 of 240 epochs, lr 2e-3)")
register("csflow-paper", CSFlow,
         "CS-Flow as in the paper: efficientnet_b5 stride-32 features at 3 scales, 4 blocks, 1024 hidden, "
         "Adam 2e-4, 240 epochs (GPU)",
         backbone="efficientnet_b5", layer=4, hidden_channels=1024, epochs=240, batch_size=16, lr=2.0e-4,
         standardise=False)
