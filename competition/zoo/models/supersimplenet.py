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

Supervised / mixed mode (`supervised`, the `supersimplenet-supervised*` entries; the reference's
supervised setting, as the journal's mixed supervision): the model `uses_defects`, so the runner passes
it the training folds' real defects with their masks (never the held-out fold's; a `zoo.validation_share`
of them is kept back for the validation set, `zoo.runner.fit_fold`). Every epoch sees the normals, each
real defect once (`defect_sample`) and, on a `painted_share` of the normals, an image-space defect with
its mask: transplanted from a masked training defect (`data.transplant`, a `transplant_share` of them)
or painted (`data.anomalies.random_anomaly` over `painted_kinds`). The ground truth goes to the feature
grid as the reference does (bilinear, then >= 0.5); the Perlin-masked feature noise is added only
outside it (the reference's "overlap" off), and the target is the defect plus the noise; the loss is the
unsupervised one on the seg map (focal + truncated L1) and the class logit (focal). A defect whose
mask is unknown has its image label only: the class loss counts it, the seg loss leaves it out (the
journal's weak labels). As the reference's supervised config: no stopped gradient into the seg head,
gradient clipping at 1, Perlin threshold 0.6, horizontal and vertical flips (`augment`).
`train_backbone` (`supersimplenet-supervised-e2e`) trains the backbone too, at `backbone_lr`, its
BatchNorm in train mode: offline there are no ImageNet weights to keep frozen, so the backbone is either
the experiment's self-supervised one (`-ssl`) or learnt end to end.

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
- supervised: the image-space transplanted and painted defects are this project's addition (the paper
  trains on the labelled defects and its feature noise alone); the real defects are sampled once per
  epoch each, not rebalanced; `train_backbone` is an addition for the offline setting (the paper's
  backbone is always frozen); a tiled run trains on the defect tiles its mask marks and leaves out
  the defects without a mask (which of their tiles shows the defect is unknown).
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
    # The supervised / mixed mode: labelled defects too (the runner passes the training folds' real ones).
    supervised: bool = False
    painted_share: float = 0.25  # supervised: share of normal samples given an image-space defect ...
    transplant_share: float = 0.5  # ... moved from a real masked defect for this share of them (when there is one)
    painted_kinds: tuple[str, ...] = ()  # ... painted of these kinds otherwise (() = random_anomaly's own mix)
    train_backbone: bool = False  # end to end: the backbone is trained too, at backbone_lr
    backbone_lr: float = 1.0e-4

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
        for key in ("painted_share", "transplant_share"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"supersimplenet: {key} must lie in [0, 1], got {getattr(self, key)}")
        if not self.backbone_lr > 0:
            raise ValueError(f"supersimplenet: backbone_lr must be positive, got {self.backbone_lr}")
        from competition.config import PAINTED_KINDS

        unknown = [kind for kind in self.painted_kinds if kind not in PAINTED_KINDS]
        if unknown:
            raise ValueError(f"supersimplenet: painted_kinds {unknown} not allowed; () or some of "
                             f"{', '.join(PAINTED_KINDS)} (transplanted defects come with transplant_share)")


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
                 blur_sigma: float = 4.0, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 stop_grad: bool = True, train_backbone: bool = False):
        super().__init__()
        self.normalise = ImageNormalise(mean, std)
        self.train_backbone = bool(train_backbone)
        self.backbone = backbone if self.train_backbone else freeze(backbone)
        if self.train_backbone:
            self.frozen_parts = ()  # end to end: the backbone trains, its BatchNorm statistics too
        self.adaptor = nn.Conv2d(channels, channels, 1)
        self.adaptor.apply(_init_weights)
        self.heads = SegmentationDetection(channels, seg_hidden, cls_channels, cls_kernel, stop_grad=stop_grad)
        self.adapt_class_features = bool(adapt_class_features)
        self.upscale, self.patch_size, self.blur_sigma = int(upscale), int(patch_size), float(blur_sigma)

    def features(self, images: Tensor) -> Tensor:
        """The backbone's maps, upscaled to `upscale` x the first one's grid, concatenated, pooled (with
        gradients only for a backbone trained end to end)."""
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            maps = [m.float() for m in self.backbone(self.normalise(images))]
            h, w = maps[0].shape[-2:]
            size = (h * self.upscale, w * self.upscale)
            joined = torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps], 1)
            return F.avg_pool2d(joined, self.patch_size, stride=1, padding=self.patch_size // 2)

    def feature_grid(self, image_size: int) -> tuple[int, int]:
        """(h, w) of `features` for square images of `image_size` (the backbone's statistics untouched)."""
        device = self.adaptor.weight.device
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            h, w = self.features(torch.zeros(1, 3, image_size, image_size, device=device)).shape[-2:]
        self.backbone.train(was_training)
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

    @property
    def uses_defects(self) -> bool:  # the supervised / mixed mode trains on the training folds' labelled defects
        return bool(self.params.supervised)

    def build_model(self) -> nn.Module:
        p = self.params
        layers = tuple(int(i) for i in p.layers)
        backbone = create_backbone(p.backbone, layers, self.settings.backbone_weights, self.settings.seed,
                                   frozen=not p.train_backbone, init=self.settings.backbone_init,
                                   padding=self.settings.backbone_padding)
        channels = sum(backbone.feature_info.channels())
        # supervised: the class head's gradient reaches the seg head (the reference's stop_grad False)
        model = SuperSimpleNetModel(backbone, channels, int(p.seg_hidden), int(p.cls_channels), int(p.cls_kernel),
                                    bool(p.adapt_class_features), int(p.upscale), int(p.patch_size),
                                    float(p.blur_sigma), self.settings.mean, self.settings.std,
                                    stop_grad=not p.supervised, train_backbone=bool(p.train_backbone))
        # the Perlin masks' grid, known here in the main process (training samples may be drawn in workers)
        self._grid = model.feature_grid(self.settings.image_size)
        return model

    def parameters_to_train(self) -> list[nn.Parameter]:
        trained = list(self.model.adaptor.parameters()) + list(self.model.heads.parameters())
        return list(self.model.backbone.parameters()) + trained if self.params.train_backbone else trained

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        p = self.params
        groups = [{"params": list(self.model.adaptor.parameters()), "lr": p.lr, "weight_decay": p.weight_decay},
                  {"params": list(self.model.heads.parameters()), "lr": p.head_lr,
                   "weight_decay": p.head_weight_decay}]
        if p.train_backbone:
            groups.append({"params": list(self.model.backbone.parameters()), "lr": p.backbone_lr,
                           "weight_decay": p.weight_decay})
        if p.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum)
        optimiser = torch.optim.AdamW if p.optimizer == "adamw" else torch.optim.Adam
        return optimiser(groups, lr=p.lr, betas=tuple(p.betas))

    def training_sample(self, image: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        """The image and the Perlin masks of its two copies at the feature grid, (2, h, w) in {0, 1};
        supervised, also its pixel target, label and whether the target is known (`_supervised_sample`),
        and with probability `painted_share` an image-space defect (transplanted or painted) in it."""
        if self.params.supervised:
            image = self.augmented(image, rng)
            if rng.random() < float(self.params.painted_share):
                image, mask = self._synthetic_defect(image, rng)
                return self._supervised_sample(image, mask, bool((mask > 0).any()), rng)
            return self._supervised_sample(image, None, False, rng)
        masks = self._perlin_masks(rng)
        return {"image": unit_tensor(self.augmented(image, rng)), "masks": torch.from_numpy(masks)}

    def defect_sample(self, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator) -> dict[str, Any]:
        """A real defect: with its mask the seg head learns it; without one only the class head does."""
        image, mask = self.augmented_with_mask(image, mask, rng)
        return self._supervised_sample(image, mask, True, rng)

    def before_sampling(self, normals: np.ndarray, defects: np.ndarray, defect_masks: list[np.ndarray | None]) -> None:
        """Supervised: the transplant bank, the training defects that have a mask (never a validation one)."""
        if self.params.supervised:
            from competition.data.transplant import DefectBank

            self._bank = DefectBank.from_pairs((f"defect {i}", image, mask)
                                               for i, (image, mask) in enumerate(zip(defects, defect_masks)))

    def _perlin_masks(self, rng: np.random.Generator) -> np.ndarray:
        from competition.data.painters import _perlin_mask

        h, w = self._grid
        masks = np.zeros((2, h, w), np.float32)
        for copy in range(2):
            if rng.random() < float(self.params.anomaly_probability):
                masks[copy] = _perlin_mask(h, w, rng, threshold=float(self.params.perlin_threshold))
        return masks

    def _synthetic_defect(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        from competition.data.anomalies import random_anomaly
        from competition.data.transplant import transplant

        bank = getattr(self, "_bank", None)
        if bank is not None and len(bank) and rng.random() < float(self.params.transplant_share):
            image, mask = transplant(image, rng, bank)
        else:
            image, mask = random_anomaly(image, rng, kinds=list(self.params.painted_kinds) or None)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        return np.ascontiguousarray(image, dtype=np.uint8), mask

    def _supervised_sample(self, image: np.ndarray, mask: np.ndarray | None, defect: bool,
                           rng: np.random.Generator) -> dict[str, Any]:
        """`defect_mask` (1, S, S) the pixel target (empty for a normal), `has_mask` 0 for a defect whose
        pixels are unknown (no seg loss on it), `label` the image label."""
        size = image.shape[:2]
        target = np.zeros((1,) + size, np.float32) if mask is None else (np.asarray(mask) > 0)[None].astype(np.float32)
        return {"image": unit_tensor(image), "masks": torch.from_numpy(self._perlin_masks(rng)),
                "defect_mask": torch.from_numpy(target), "label": torch.tensor(float(defect)),
                "has_mask": torch.tensor(float(mask is not None or not defect))}

    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.params.supervised:
            return self._supervised_step(batch)
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

    def _supervised_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The supervised / mixed loss (the reference's supervised setting, "overlap" off): the batch
        duplicated, Perlin-masked feature noise only outside the ground-truth defect, the target the
        defect plus the noise; focal + truncated L1 on the seg map of the samples whose pixels are known,
        focal on the class logit of all."""
        net, p = self.model, self.params
        features = net.features(batch["image"])
        adapted = net.adaptor(features)
        h, w = features.shape[-2:]
        # the reference's (DestSeg's) downsampling of the ground truth: bilinear, then >= 0.5
        truth = F.interpolate(batch["defect_mask"].float(), size=(h, w), mode="bilinear", align_corners=False)
        truth = (truth >= 0.5).to(features.dtype)
        masks = batch["masks"].to(features.dtype)
        perlin = torch.cat([masks[:, 0:1], masks[:, 1:2]])
        truth = torch.cat([truth, truth])
        labels = torch.cat([batch["label"], batch["label"]]).to(features.dtype)
        located = torch.cat([batch["has_mask"], batch["has_mask"]]) > 0
        noise_mask = perlin * (1 - truth)
        target = torch.clamp(truth + noise_mask, max=1.0)
        labels = torch.maximum(labels, noise_mask.flatten(1).amax(1))
        noise = torch.randn((2 * len(features),) + tuple(features.shape[1:]), device=features.device) * p.noise_std
        noise = noise * noise_mask
        features, adapted = torch.cat([features, features]) + noise, torch.cat([adapted, adapted]) + noise
        seg, logits = net.segment_and_classify(features, adapted)
        if located.any():
            seg_focal = focal_loss_with_logits(seg[located], target[located], p.focal_gamma)
            seg_l1 = truncated_l1_loss(seg[located], target[located], p.truncation)
        else:
            seg_focal = seg_l1 = seg.sum() * 0.0
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
        p = self.params
        facts = {"backbone_weights": str(weights) if weights else f"random init (seed {self.settings.seed})",
                 "supervision": "supervised (real, transplanted and painted defects)" if p.supervised else
                 "unsupervised"}
        if p.train_backbone:
            facts["backbone_trained"] = "end to end"
        return facts


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
# The supervised / mixed mode (the reference's supervised config: Perlin threshold 0.6, flips, no stopped
# gradient, gradient clipping at 1): the training folds' real defects with their masks, transplanted and
# painted defects, feature noise outside the defects.
_SUPERVISED = {"supervised": True, "perlin_threshold": 0.6, "grad_clip": 1.0, "epochs": 10, "batch_size": 16,
               "augment": [{"name": "HorizontalFlip", "p": 0.5}, {"name": "VerticalFlip", "p": 0.5}]}
register("supersimplenet-supervised", SuperSimpleNet,
         "SuperSimpleNet supervised / mixed: resnet18, trained on the training folds' real defects (masks where "
         "known), transplanted and painted ones and feature noise (CPU budget: 10 of the paper's 300 epochs, batch 16)",
         **_SUPERVISED)
register("supersimplenet-supervised-ssl", SuperSimpleNet,
         "SuperSimpleNet supervised / mixed on the experiment's self-supervised resnet18 (make pretrain; CPU budget: "
         "10 of the paper's 300 epochs, batch 16)",
         backbone_weights="ssl", **_SUPERVISED)
register("supersimplenet-supervised-e2e", SuperSimpleNet,
         "SuperSimpleNet supervised / mixed with the resnet18 backbone trained end to end (lr 1e-3; from "
         "zoo.backbone_weights or a random init; CPU budget: 10 of the paper's 300 epochs, batch 16)",
         train_backbone=True, backbone_lr=1.0e-3, **_SUPERVISED)
