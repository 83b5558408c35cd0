"""SuperSimpleNet (Rolih, Fučka & Skočaj, ICPR 2024, "SuperSimpleNet: Unifying Unsupervised and Supervised
Learning for Fast and Reliable Surface Defect Detection"; journal extension 2025, "No Label Left Behind: A
Unified Surface Defect Detection Model for all Supervision Regimes"), after the authors' code
(blaz-r/SuperSimpleNet, as anomalib ports it).

- Features: a frozen backbone's layer2 and layer3 maps, each bilinearly upscaled to twice layer2's grid,
  concatenated (layer2 + layer3 channels) and 3 x 3 average-pooled (stride 1): one feature per position
  at a quarter of the input's resolution.
- Adaptor: a trainable 1 x 1 convolution, channels kept.
- Synthetic anomalies (training only), in feature space: the batch is duplicated, and each copy gets a
  Perlin mask at the feature grid with probability `anomaly_probability` (0.5; thresholded at
  `perlin_threshold` 0.2, `painters._perlin_mask`, otherwise empty); inside it Gaussian noise
  N(0, `noise_std` = 0.015) is added to the adapted features and, with the journal's unadapted
  classification features (`adapt_class_features` False, its default), the same noise to the features
  the classification head reads. The mask is the segmentation target; the image label is "mask not empty".
- Segmentation head: 1 x 1 conv (1024) - BatchNorm - LeakyReLU(0.2) - 1 x 1 conv to one logit per position.
- Classification head: a 5 x 5 conv (128) - BatchNorm - ReLU over concat(features, seg map), global max
  and average pooled, with the seg map's max and average (gradient stopped into the seg head, the
  unsupervised setting), then a linear layer to one logit.
- Loss: sigmoid focal loss (gamma 4, no alpha) + truncated L1 (logits pushed below -0.5 on normal and
  above 0.5 on anomalous positions) on the seg map, focal loss on the class logit.
- Training: AdamW, adaptor lr 1e-4 (weight decay 1e-2, AdamW's default), heads lr 2e-4 (weight decay
  1e-5), batch 32, 300 epochs, lr x0.4 at 80 % and 90 %; no gradient clipping (unsupervised).
- Scoring: score = the classification head's logit (the paper's score); map = the seg head's logits,
  bilinearly upsampled to the image and smoothed by a Gaussian of sigma 4.

Deviations from the paper:
- backbone: resnet18 by default (the CPU entries), random init with healthy BatchNorm statistics or local /
  self-supervised weights (`zoo.backbone_weights`, "ssl"), never ImageNet weights: the product runs
  offline; `supersimplenet-paper` has the paper's wide_resnet50_2, with whatever weights the run gives;
- epochs: the CPU entries train a few of the paper's 300 epochs (their descriptions say how many);
- the best epoch is kept by the validation AUROC inside the training folds, as every trained zoo model
  (`competition.zoo.trained`); the paper keeps the last epoch;
- the Perlin masks are the project's (`competition.data.painters`: rotated Perlin noise of 2^0..2^5
  periods, redrawn until non-empty) drawn on the feature grid, rather than the reference's unrotated
  power-of-two noise resized to it;
- the Gaussian smoothing kernel reaches 4 sigma (the zoo's `gaussian_blur_maps`), the reference's 3 sigma;
- only the unsupervised mode is implemented: the supervised and mixed modes (training on labelled defects
  with their masks, no stopped gradient, gradient clipping at 1) are not implemented yet.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from competition.preprocess import IMAGENET_MEAN, IMAGENET_STD
from competition.zoo.api import BackboneParams, unit_tensor
from competition.zoo.components.features import create_backbone
from competition.zoo.components.frozen import WithFrozenParts, freeze
from competition.zoo.components.maps import gaussian_blur_maps, upsample_maps
from competition.zoo.components.normalise import ImageNormalise
from competition.zoo.registry import register
from competition.zoo.trained import TrainedAnomalyModel, TrainParams


@dataclass
class SuperSimpleNetParams(TrainParams, BackboneParams):
    # The paper: AdamW, adaptor lr 1e-4, heads lr 2e-4 (weight decay 1e-5), batch 32, 300 epochs,
    # lr x0.4 at 80 % and 90 %.
    epochs: int = 300
    batch_size: int = 32
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1.0e-4  # the adaptor's
    weight_decay: float = 1.0e-2  # the adaptor's (AdamW's default in the reference)
    head_lr: float = 2.0e-4  # the segmentation and classification heads'
    head_weight_decay: float = 1.0e-5
    schedule: Literal["constant", "warmup_cosine", "multistep"] = "multistep"
    milestones: tuple[float, ...] = (0.8, 0.9)
    gamma: float = 0.4
    layers: tuple[int, ...] = (2, 3)  # resnet layer2 and layer3
    upscale: int = 2  # features at this multiple of the first layer's grid
    patch_size: int = 3  # neighbourhood average pooling
    noise_std: float = 0.015
    perlin_threshold: float = 0.2
    anomaly_probability: float = 0.5  # share of the duplicated samples that get a Perlin mask
    seg_hidden: int = 1024
    cls_channels: int = 128
    cls_kernel: int = 5
    adapt_class_features: bool = False  # True: the ICPR version (the class head reads the adapted features)
    focal_gamma: float = 4.0
    truncation: float = 0.5  # truncated L1 margin on the seg logits
    blur_sigma: float = 4.0

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "upscale", "patch_size", "seg_hidden", "cls_channels", "cls_kernel"):
            if getattr(self, key) < 1:
                raise ValueError(f"supersimplenet: {key} must be at least 1, got {getattr(self, key)}")
        if self.patch_size % 2 == 0 or self.cls_kernel % 2 == 0:
            raise ValueError(f"supersimplenet: patch_size and cls_kernel must be odd, got {self.patch_size} and "
                             f"{self.cls_kernel}")
        if len(self.layers) < 1:
            raise ValueError("supersimplenet: layers needs at least one backbone layer, e.g. [2, 3]")
        if not 0.0 <= self.anomaly_probability <= 1.0:
            raise ValueError(f"supersimplenet: anomaly_probability must lie in [0, 1], got {self.anomaly_probability}")
        for key in ("lr", "head_lr"):
            if not getattr(self, key) > 0:
                raise ValueError(f"supersimplenet: {key} must be positive, got {getattr(self, key)}")
        for key in ("noise_std", "truncation", "focal_gamma", "blur_sigma", "head_weight_decay"):
            if getattr(self, key) < 0:
                raise ValueError(f"supersimplenet: {key} must be 0 or more, got {getattr(self, key)}")


def focal_loss_with_logits(logits: Tensor, target: Tensor, gamma: float = 4.0) -> Tensor:
    """Sigmoid focal loss (Lin et al. 2017) without the alpha balance, averaged over every element
    (torchvision's `sigmoid_focal_loss(alpha=-1, reduction="mean")`)."""
    logits, target = logits.float(), target.float()
    probability = torch.sigmoid(logits)
    cross_entropy = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = probability * target + (1 - probability) * (1 - target)
    return (cross_entropy * (1 - p_t) ** gamma).mean()


def truncated_l1_loss(logits: Tensor, target: Tensor, margin: float = 0.5) -> Tensor:
    """Normal positions' logits pushed below -margin, anomalous ones above +margin (each side averaged
    over its positions; an empty side adds nothing)."""
    logits = logits.float()
    normal, anomalous = logits[target == 0], logits[target > 0]
    loss = logits.new_zeros(())
    if normal.numel():
        loss = loss + torch.clamp(normal + margin, min=0).mean()
    if anomalous.numel():
        loss = loss + torch.clamp(margin - anomalous, min=0).mean()
    return loss


def _init_weights(module: nn.Module) -> None:
    # the reference: Xavier-normal convolution and linear weights, BatchNorm scales at 1
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_normal_(module.weight)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.constant_(module.weight, 1)


class SegmentationDetection(nn.Module):
    """The two heads: (seg features, class features) -> (seg logits (B, 1, h, w), class logits (B,))."""

    def __init__(self, channels: int, seg_hidden: int = 1024, cls_channels: int = 128, cls_kernel: int = 5,
                 stop_grad: bool = True):
        super().__init__()
        self.stop_grad = stop_grad
        self.seg_head = nn.Sequential(nn.Conv2d(channels, seg_hidden, 1), nn.BatchNorm2d(seg_hidden),
                                      nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(seg_hidden, 1, 1, bias=False))
        self.cls_conv = nn.Sequential(nn.Conv2d(channels + 1, cls_channels, cls_kernel, padding=cls_kernel // 2),
                                      nn.BatchNorm2d(cls_channels), nn.ReLU(inplace=True))
        self.cls_fc = nn.Linear(2 * cls_channels + 2, 1)
        self.apply(_init_weights)

    def forward(self, seg_features: Tensor, cls_features: Tensor) -> tuple[Tensor, Tensor]:
        seg = self.seg_head(seg_features)
        seg_to_cls = seg.detach() if self.stop_grad else seg
        conv = self.cls_conv(torch.cat([cls_features, seg_to_cls], dim=1))
        pooled = torch.cat([conv.amax(dim=(2, 3)), conv.mean(dim=(2, 3)),
                            seg_to_cls.amax(dim=(2, 3)), seg_to_cls.mean(dim=(2, 3))], dim=1)
        return seg, self.cls_fc(pooled)[:, 0]


class SuperSimpleNetModel(WithFrozenParts):
    """[0, 1] images -> (scores (B,), maps (B, S, S)); `features`, `adaptor` and `heads` for training."""

    frozen_parts = ("backbone",)

    def __init__(self, backbone: nn.Module, channels: int, seg_hidden: int = 1024, cls_channels: int = 128,
                 cls_kernel: int = 5, adapt_class_features: bool = False, upscale: int = 2, patch_size: int = 3,
                 blur_sigma: float = 4.0, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.normalise = ImageNormalise(mean, std)
        self.backbone = freeze(backbone)
        self.adaptor = nn.Conv2d(channels, channels, 1)
        self.adaptor.apply(_init_weights)
        self.heads = SegmentationDetection(channels, seg_hidden, cls_channels, cls_kernel, stop_grad=True)
        self.adapt_class_features = bool(adapt_class_features)
        self.upscale, self.patch_size, self.blur_sigma = int(upscale), int(patch_size), float(blur_sigma)

    def features(self, images: Tensor) -> Tensor:
        """The frozen backbone's maps, upscaled to `upscale` x the first one's grid, concatenated, pooled."""
        with torch.no_grad():
            maps = [m.float() for m in self.backbone(self.normalise(images))]
            h, w = maps[0].shape[-2:]
            size = (h * self.upscale, w * self.upscale)
            joined = torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps], 1)
            return F.avg_pool2d(joined, self.patch_size, stride=1, padding=self.patch_size // 2)

    def feature_grid(self, image_size: int) -> tuple[int, int]:
        """(h, w) of `features` for square images of `image_size`."""
        device = self.adaptor.weight.device
        h, w = self.features(torch.zeros(1, 3, image_size, image_size, device=device)).shape[-2:]
        return int(h), int(w)

    def segment_and_classify(self, features: Tensor, adapted: Tensor) -> tuple[Tensor, Tensor]:
        return self.heads(adapted, adapted if self.adapt_class_features else features)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.features(images)
        seg, scores = self.segment_and_classify(features, self.adaptor(features))
        maps = gaussian_blur_maps(upsample_maps(seg[:, 0].float(), images.shape[-1]), self.blur_sigma)
        return scores.float(), maps


class SuperSimpleNet(TrainedAnomalyModel):
    family = "supersimplenet"
    params_class = SuperSimpleNetParams
    params: SuperSimpleNetParams

    def build_model(self) -> nn.Module:
        p = self.params
        layers = tuple(int(i) for i in p.layers)
        backbone = create_backbone(p.backbone, layers, self.settings.backbone_weights, self.settings.seed,
                                   init=self.settings.backbone_init)
        channels = sum(backbone.feature_info.channels())
        model = SuperSimpleNetModel(backbone, channels, int(p.seg_hidden), int(p.cls_channels), int(p.cls_kernel),
                                    bool(p.adapt_class_features), int(p.upscale), int(p.patch_size),
                                    float(p.blur_sigma), self.settings.mean, self.settings.std)
        # the Perlin masks' grid, known here in the main process (training samples may be drawn in workers)
        self._grid = model.feature_grid(self.settings.image_size)
        return model

    def parameters_to_train(self) -> list[nn.Parameter]:
        return list(self.model.adaptor.parameters()) + list(self.model.heads.parameters())

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        p = self.params
        groups = [{"params": list(self.model.adaptor.parameters()), "lr": p.lr, "weight_decay": p.weight_decay},
                  {"params": list(self.model.heads.parameters()), "lr": p.head_lr,
                   "weight_decay": p.head_weight_decay}]
        if p.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum)
        optimiser = torch.optim.AdamW if p.optimizer == "adamw" else torch.optim.Adam
        return optimiser(groups, lr=p.lr, betas=tuple(p.betas))

    def training_sample(self, image: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        """The image and the Perlin masks of its two copies at the feature grid, (2, h, w) in {0, 1}."""
        from competition.data.painters import _perlin_mask

        h, w = self._grid
        masks = np.zeros((2, h, w), np.float32)
        for copy in range(2):
            if rng.random() < float(self.params.anomaly_probability):
                masks[copy] = _perlin_mask(h, w, rng, threshold=float(self.params.perlin_threshold))
        return {"image": unit_tensor(self.augmented(image, rng)), "masks": torch.from_numpy(masks)}

    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        net, p = self.model, self.params
        features = net.features(batch["image"])
        adapted = net.adaptor(features)
        masks = batch["masks"].to(features.dtype)
        mask = torch.cat([masks[:, 0:1], masks[:, 1:2]])  # the two copies, stacked as the batch is duplicated
        noise = torch.randn((2 * len(features),) + tuple(features.shape[1:]), device=features.device) * p.noise_std
        noise = noise * mask
        features, adapted = torch.cat([features, features]) + noise, torch.cat([adapted, adapted]) + noise
        seg, logits = net.segment_and_classify(features, adapted)
        labels = mask.flatten(1).amax(1)
        seg_focal = focal_loss_with_logits(seg, mask, p.focal_gamma)
        seg_l1 = truncated_l1_loss(seg, mask, p.truncation)
        cls_focal = focal_loss_with_logits(logits, labels, p.focal_gamma)
        return {"loss": seg_focal + seg_l1 + cls_focal, "seg_focal": seg_focal, "seg_l1": seg_l1,
                "cls_focal": cls_focal}

    def score_batch(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(images)

    def scoring_module(self) -> nn.Module:
        self._check_fitted()
        return self.model.eval()  # its forward is the scoring: [0, 1] images -> (scores, maps)

    def fit_summary(self) -> dict[str, Any]:
        weights = self.settings.backbone_weights
        return {"backbone_weights": str(weights) if weights else f"random init (seed {self.settings.seed})",
                "supervision": "unsupervised (the supervised mode is not implemented)"}


register("supersimplenet-resnet18", SuperSimpleNet,
         "SuperSimpleNet: resnet18 layer2+3 upscaled, adaptor, Perlin-masked feature noise, seg + class heads "
         "(CPU budget: 10 of the paper's 300 epochs, batch 16)",
         epochs=10, batch_size=16)
register("supersimplenet-ssl", SuperSimpleNet,
         "SuperSimpleNet (resnet18 layer2+3) on the experiment's self-supervised backbone (make pretrain; CPU "
         "budget: 10 of the paper's 300 epochs, batch 16)",
         backbone_weights="ssl", epochs=10, batch_size=16)
register("supersimplenet-paper", SuperSimpleNet,
         "SuperSimpleNet as in the paper: wide_resnet50_2 layer2+3, AdamW 1e-4/2e-4, batch 32, 300 epochs (GPU)",
         backbone="wide_resnet50_2")
