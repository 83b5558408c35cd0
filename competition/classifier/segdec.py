"""SegDecNet: a segmentation-decision network trained from scratch with mixed supervision.

Božič, Tabernik and Skočaj, "Mixed supervision for surface-defect detection: from weakly to fully
supervised learning", Computers in Industry 129 (2021); reference code vicoslab/mixed-segdec-net-comind2021.

- **Segmentation sub-network** (`SegDecNet.volume`): conv blocks with max-pooling to stride 8 and a last
  large-kernel conv block (the paper: 32 channels, 3x 64, 4x 64 channels of 5x5 convs, then 1024 channels
  of 15x15), a 1x1 conv to the one-channel segmentation logits at stride 8.
- **Decision sub-network** (`SegDecNet.decision`): on the volume concatenated with the segmentation map,
  three max-pool + 5x5 conv blocks (8, 16, 32 channels), global max and average pooling of those features
  and of the segmentation map (66 values), a linear layer to the image logit. The image score is this
  decision output.
- **Gradient-flow adjustment**: the decision loss does not reach the segmentation sub-network (the
  volume and the map are detached where the decision head reads them), so the segmentation is learnt
  from the masks alone and cannot be degraded by the decision's shortcut.
- **Dynamic balancing of the losses** (`loss_weights`): epoch n of N weighs the segmentation loss by
  1 - n/N and the decision loss by delta * n/N: segmentation first, the decision once the map means
  something.
- **Distance-transform weighting** (`distance_weights`): inside a defect's mask a pixel's BCE weight is
  (d / d_max)^p * w_max with d its distance to the mask's edge, so the uncertain rim of a mask weighs
  little and the core much; background pixels weigh 1.
- **Mixed supervision**: a defect without a mask (`has_mask` false) trains the decision head only.
- **Frequency-of-use sampling of negatives** is `oversample.normal_sampling: frequency`
  (competition.classifier.data): every normal tile is shown before any is shown again.

Deviations, and why:
- Widths and kernels are config keys (`segdec.*`) whose defaults are far below the paper's (the 1024
  channel 15x15 conv alone costs ~90 GMAC on a 640x640 image): the default stack is sized for 2 CPU cores.
  `configs/segdec.yaml`'s comments give the paper's values.
- BatchNorm instead of the reference code's per-image "FeatureNorm" (an instance normalisation): our
  inputs are often tiles, and normalising each tile on its own rescales a flat normal tile's noise to
  unit variance; the segmentation map also keeps a bias and no normalisation, so its logits are absolute.
- AdamW with the project's warmup-cosine schedule instead of plain SGD: with Adam the decision loss's
  constant delta only scales a gradient that Adam normalises, so delta defaults to 1.
- Max-pooling rounds up (ceil mode), so any input size works, down to a 32-pixel tile.
- Masks are pooled to the map's stride by area averaging (soft targets) instead of the reference's
  17x17 average window; `segdec.mask_dilate` dilates them first, as the paper does per dataset.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt
from torch import nn

from competition.classifier.model import ClassifierOutput
from competition.config import SegDecConfig

STRIDE = 8  # the segmentation map's stride


def _conv_block(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class SegDecNet(nn.Module):
    """Segmentation sub-network at stride 8 + decision sub-network; `forward_all` gives both outputs."""

    def __init__(self, params: SegDecConfig, in_channels: int = 3):
        super().__init__()
        width, kernel = params.width, params.kernel
        self.gradient_adjustment = params.gradient_adjustment
        self.volume = nn.Sequential(
            _conv_block(in_channels, width, kernel), nn.MaxPool2d(2, ceil_mode=True),
            _conv_block(width, 2 * width, kernel), _conv_block(2 * width, 2 * width, kernel),
            _conv_block(2 * width, 2 * width, kernel), nn.MaxPool2d(2, ceil_mode=True),
            *[_conv_block(2 * width, 2 * width, kernel) for _ in range(4)], nn.MaxPool2d(2, ceil_mode=True),
            _conv_block(2 * width, params.volume_channels, params.volume_kernel))
        self.segmentation = nn.Conv2d(params.volume_channels, 1, 1)
        self.decision = nn.Sequential(
            nn.MaxPool2d(2, ceil_mode=True), _conv_block(params.volume_channels + 1, 8, 5),
            nn.MaxPool2d(2, ceil_mode=True), _conv_block(8, 16, 5),
            nn.MaxPool2d(2, ceil_mode=True), _conv_block(16, 32, 5))
        self.fc = nn.Linear(2 * 32 + 2, 1)
        for module in self.modules():  # the reference's init: Xavier-normal convs
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight)
        nn.init.normal_(self.fc.weight, std=0.01)  # start the decision near 0 (as the classifier's head)
        nn.init.zeros_(self.fc.bias)

    def forward_all(self, images: torch.Tensor) -> ClassifierOutput:
        volume = self.volume(images)
        seg = self.segmentation(volume)
        seen_volume, seen_seg = (volume.detach(), seg.detach()) if self.gradient_adjustment else (volume, seg)
        features = self.decision(torch.cat([seen_volume, seen_seg], dim=1))
        pooled = torch.cat([features.amax(dim=(2, 3)), features.mean(dim=(2, 3)),
                            seen_seg.amax(dim=(2, 3)), seen_seg.mean(dim=(2, 3))], dim=1)
        logit = self.fc(pooled.float()).squeeze(1)
        return ClassifierOutput(logit, logit, seg)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B,) decision logit; its sigmoid is the per-image defect score."""
        return self.forward_all(images).logit


# ---------------------------------------------------------------- the training loss

def loss_weights(epoch: int, epochs: int, params: SegDecConfig) -> tuple[float, float]:
    """(segmentation weight, decision weight) in epoch `epoch` (from 0) of `epochs`: 1 - n/N and
    delta * n/N with dynamic balancing, else 1 and delta."""
    if not params.dynamic_balance:
        return 1.0, params.delta
    progress = epoch / float(epochs)
    return 1.0 - progress, params.delta * progress


def distance_weights(masks: np.ndarray, max_weight: float, power: float) -> np.ndarray:
    """(B, H, W) binary masks -> per-pixel BCE weights: inside a mask (d / d_max)^power * max_weight with
    d the Euclidean distance to the nearest background pixel (d_max per image), 1 on the background."""
    out = np.ones(masks.shape, np.float32)
    for i, mask in enumerate(masks):
        inside = mask > 0.5
        if not inside.any():
            continue
        distance = distance_transform_edt(inside)
        out[i][inside] = ((distance[inside] / distance.max()) ** power * max_weight).astype(np.float32)
    return out


def dilate_masks(masks: torch.Tensor, pixels: int) -> torch.Tensor:
    """(B, 1, H, W) masks grown by `pixels` in every direction (a max filter); 0 leaves them."""
    if pixels <= 0:
        return masks
    return F.max_pool2d(masks, 2 * pixels + 1, stride=1, padding=pixels)


def segmentation_loss(seg_logits: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor,
                      valid: torch.Tensor | None, params: SegDecConfig) -> torch.Tensor:
    """Distance-weighted pixel BCE of the images that have a mask (padding weighs 0), at the map's size.

    `masks`, `valid`: (B, 1, H, W) on the CPU at the input's size; `has_mask` (B,) bool."""
    if not bool(has_mask.any()):
        return seg_logits.sum() * 0.0
    masks = dilate_masks(masks[has_mask.cpu()].float(), params.mask_dilate)
    weights = torch.from_numpy(distance_weights((masks[:, 0] > 0.5).numpy(), params.weight_max,
                                                params.weight_power)).unsqueeze(1)
    if valid is not None:
        weights = weights * valid[has_mask.cpu()].float()
    size = seg_logits.shape[-2:]
    targets = F.adaptive_avg_pool2d(masks, size).to(seg_logits.device)
    weights = F.adaptive_avg_pool2d(weights, size).to(seg_logits.device)
    bce = F.binary_cross_entropy_with_logits(seg_logits.float()[has_mask], targets, reduction="none")
    return (bce * weights).sum() / weights.sum().clamp_min(1.0)


def decision_loss(logits: torch.Tensor, labels: torch.Tensor, pos_weight: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float(),
                                              pos_weight=torch.tensor(pos_weight, device=logits.device))


def segdec_losses(output: ClassifierOutput, batch: dict[str, torch.Tensor], device: torch.device, epoch: int,
                  epochs: int, params: SegDecConfig, pos_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """The paper's total loss for one batch: w_seg * L_seg + w_dec * L_dec (`loss_weights`)."""
    labels = batch["label"].to(device, non_blocking=True)
    seg = segmentation_loss(output.mask_logits, batch["mask"], batch["has_mask"], batch.get("valid"), params)
    dec = decision_loss(output.logit, labels, pos_weight)
    w_seg, w_dec = loss_weights(epoch, epochs, params)
    return {"loss": w_seg * seg + w_dec * dec, "class_loss": dec, "mask_loss": seg}
