"""ImageNet normalisation as a module, so networks take plain [0, 1] RGB from both the training and
the evaluation pipeline and normalise inside."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from competition.preprocess import IMAGENET_MEAN, IMAGENET_STD


class ImageNormalise(nn.Module):
    """(x - mean) / std; the statistics are not saved (they come from the settings or the defaults)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(tuple(mean)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(tuple(std)).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std
