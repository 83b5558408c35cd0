"""The supervised classifier: any timm backbone with a one-logit head, optionally with a mask head.

The mask head (mixed supervision, as in Bozic et al. 2021, "Mixed supervision for surface-defect
detection") is a light FPN-style decoder over the backbone's last three intermediate maps (timm's
`forward_intermediates`, the same maps `features_only` gives). The image logit then blends the
classification logit with the pooled segmentation map, so `oof.csv`/`test.csv` keep one score.
Weights are local only (`model.pretrained`, see competition.weights).
"""
from __future__ import annotations

from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn

from competition.config import MaskHeadConfig, ModelConfig
from competition.weights import head_parameter_names, load_local_weights


class ClassifierOutput(NamedTuple):
    logit: torch.Tensor  # (B,) the image score logit (blended when the mask head is on)
    class_logit: torch.Tensor  # (B,) the classification head alone
    mask_logits: torch.Tensor | None  # (B, 1, h, w) segmentation logits at the decoder's stride, or None


class MaskDecoder(nn.Module):
    """Lateral 1x1 convs on three maps, upsample to the finest, sum, 3x3 conv, 1x1 to one channel."""

    def __init__(self, in_channels: list[int], channels: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, 1, 1),
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        fused = 0
        for lateral, feature in zip(self.lateral, features):
            out = lateral(feature)
            if out.shape[-2:] != size:
                out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
            fused = fused + out
        return self.fuse(fused)


def pool_top_share(mask_logits: torch.Tensor, share: float) -> torch.Tensor:
    """Mean of the top `share` of each map's logits (a smooth max): (B, 1, h, w) -> (B,)."""
    flat = mask_logits.flatten(1)
    k = max(1, int(round(share * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(dim=1)


class DefectClassifier(nn.Module):
    """timm backbone + one logit; with `mask_head`, also a segmentation map blended into the logit."""

    def __init__(self, backbone: nn.Module, mask_head: MaskHeadConfig | None = None, image_size: int = 224):
        super().__init__()
        self.backbone = backbone
        self.mask_head = mask_head if mask_head is not None and mask_head.enabled else None
        self.decoder: MaskDecoder | None = None
        if self.mask_head is not None:
            if not hasattr(backbone, "forward_intermediates"):
                raise ValueError(f"mask_head.enabled needs a timm model with forward_intermediates; "
                                 f"{type(backbone).__name__} has none. Disable mask_head or pick another model.name")
            with torch.no_grad():
                was_training = backbone.training
                backbone.eval()
                _, maps = backbone.forward_intermediates(torch.zeros(1, 3, image_size, image_size), indices=3)
                backbone.train(was_training)
            self.decoder = MaskDecoder([m.shape[1] for m in maps], self.mask_head.channels)

    def forward_all(self, images: torch.Tensor) -> ClassifierOutput:
        if self.decoder is None:
            class_logit = self.backbone(images).squeeze(1)
            return ClassifierOutput(class_logit, class_logit, None)
        final, maps = self.backbone.forward_intermediates(images, indices=3)
        class_logit = self.backbone.forward_head(final).squeeze(1)
        mask_logits = self.decoder(maps)
        pooled = pool_top_share(mask_logits.float(), self.mask_head.pool_top)
        weight = self.mask_head.score_weight
        logit = (1.0 - weight) * class_logit.float() + weight * pooled
        return ClassifierOutput(logit, class_logit, mask_logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B,) image logit; sigmoid of it is the per-image defect score."""
        return self.forward_all(images).logit


def _reset_head(backbone: nn.Module) -> None:
    """Start the one-logit head near zero: timm's init for a 1-wide Linear draws weights from
    U(-1, 1), which makes the first logits huge and the first epoch's BCE meaningless."""
    for name in head_parameter_names(backbone):
        parameter = backbone.get_parameter(name)
        with torch.no_grad():
            if parameter.ndim > 1:
                nn.init.normal_(parameter, std=0.01)
            else:
                nn.init.zeros_(parameter)


def build_classifier(model: ModelConfig, mask_head: MaskHeadConfig | None = None) -> DefectClassifier:
    """`model.name` from timm with one output, local weights from `model.pretrained` (or random init)."""
    try:
        backbone = timm.create_model(model.name, pretrained=False, num_classes=1,
                                     drop_rate=model.drop_rate, drop_path_rate=model.drop_path_rate)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ValueError(f"model.name {model.name!r} is not a timm model ({exc}); "
                         f"e.g. efficientnet_b0, tf_efficientnet_b3, resnet18, convnext_atto") from None
    except TypeError:  # architectures without stochastic depth
        backbone = timm.create_model(model.name, pretrained=False, num_classes=1, drop_rate=model.drop_rate)
    _reset_head(backbone)
    # a fitting one-logit head in the weights overrides the reset
    load_local_weights(backbone, model.pretrained, model.name, "model.pretrained")
    return DefectClassifier(backbone, mask_head, model.image_size)


class WeightAveraged(nn.Module):
    """A model and the exponential moving average of its weights (timm `ModelEmaV3`, decay warmed up
    from 0 so the first steps are not averaged with the random init).

    In training mode it runs the trained model; in eval mode, the average: validation, best.pt and
    the predictions all see the average, and its state dict holds both, so last.pt resumes exactly.
    `update(step)` after each optimizer step (global step count, which drives the warmup).
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.model = model
        self.average = ModelEmaV3(model, decay=decay, use_warmup=True)

    def update(self, step: int) -> None:
        self.average.update(self.model, step=step)

    def forward_all(self, images: torch.Tensor) -> ClassifierOutput:
        return (self.model if self.training else self.average.module).forward_all(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_all(images).logit
