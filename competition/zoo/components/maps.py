"""Filters on anomaly maps shaped (N, H, W): upsampling to the image and the smoothing the papers use."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def gaussian_blur_maps(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur (N, H, W) maps with a Gaussian of `sigma` pixels (PatchCore/PaDiM smooth their maps, sigma=4)."""
    if sigma <= 0:
        return maps
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = maps[:, None]
    pad = min(radius, maps.shape[-1] - 1, maps.shape[-2] - 1)
    if pad < radius:  # image smaller than the kernel: crop the kernel to what reflect-padding allows
        kernel = kernel[radius - pad: radius + pad + 1]
        kernel = kernel / kernel.sum()
    out = F.pad(out, (pad, pad, pad, pad), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1))
    return out[:, 0]


def upsample_maps(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(N, h, w) -> (N, size, size), bilinear."""
    if maps.shape[-1] == size and maps.shape[-2] == size:
        return maps
    return F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def mean_filter_maps(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(N, H, W) -> (N, H, W): the mean over `size` x `size` windows (odd size; zeros beyond the border count)."""
    return F.avg_pool2d(maps[:, None], size, stride=1, padding=size // 2)[:, 0]


class SmoothedMaps(nn.Module):
    """A fitted head's coarse maps -> (scores (B,), maps (B, size, size)): upsampled and blurred as the papers
    do. A head returning (scores, maps) keeps its scores; one returning maps alone scores by the smoothed
    map's maximum, less `background` times the map's mean when that is set (a peak over its own image's
    level: a surface anomalous all over, soiled say, scores lower than one with a single spot). The same
    module scores eagerly and inside an exported graph."""

    def __init__(self, head: nn.Module, size: int, sigma: float, background: float = 0.0):
        super().__init__()
        self.head = head
        self.size = int(size)
        self.sigma = float(sigma)
        self.background = float(background)

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(maps)
        scores, coarse = out if isinstance(out, tuple) else (None, out)
        smooth = gaussian_blur_maps(upsample_maps(coarse, self.size), self.sigma)
        if scores is None:
            flat = smooth.flatten(1)
            scores = flat.amax(1) - self.background * flat.mean(1) if self.background else flat.amax(1)
        return scores, smooth
