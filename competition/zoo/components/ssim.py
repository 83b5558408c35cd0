"""Structural similarity (Wang, Bovik, Sheikh, Simoncelli 2004, "Image Quality Assessment: From Error
Visibility to Structural Similarity") of image batches in [0, 1], per pixel or averaged: DRAEM's
reconstruction loss and the SSIM autoencoder's loss and anomaly map (Bergmann et al. 2019).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def ssim_map(a: Tensor, b: Tensor, window: int = 11, sigma: float | None = 1.5, padding: str = "zeros") -> Tensor:
    """(B, C, H, W) SSIM of every pixel's `window` x `window` neighbourhood, per channel.

    sigma: a Gaussian window of that width (Wang et al.'s 1.5); None: a uniform window (the
    patch statistics of Bergmann et al.). padding: "zeros" (the conv's own) or "reflect".
    Constants c1 = 0.01^2 and c2 = 0.03^2 are for the dynamic range 1.
    """
    coords = torch.arange(window, dtype=a.dtype, device=a.device) - (window - 1) / 2
    g = torch.ones_like(coords) if sigma is None else torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(a.shape[1], 1, window, window).contiguous()
    pad = window // 2

    def local_mean(x: Tensor) -> Tensor:
        if padding == "reflect":
            return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), kernel, groups=a.shape[1])
        return F.conv2d(x, kernel, padding=pad, groups=a.shape[1])

    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a = local_mean(a * a) - mu_a ** 2
    var_b = local_mean(b * b) - mu_b ** 2
    cov = local_mean(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float | None = 1.5, padding: str = "zeros") -> Tensor:
    """Mean SSIM over every pixel, channel and image (`ssim_map`'s mean)."""
    return ssim_map(a, b, window, sigma, padding).mean()
