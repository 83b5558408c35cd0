"""Frozen submodules: pretrained parts (teachers, encoders, feature backbones) that are never trained.

A frozen part has no gradients and stays in eval mode whatever `train()` says, so its BatchNorm
keeps the pretrained statistics while the rest of the network trains.
"""
from __future__ import annotations

from torch import nn


def freeze(module: nn.Module) -> nn.Module:
    """No gradients for `module`'s parameters, and eval mode; returns `module`."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


class WithFrozenParts(nn.Module):
    """An nn.Module whose parts named in `frozen_parts` stay in eval mode through `train()`."""

    frozen_parts: tuple[str, ...] = ()

    def train(self, mode: bool = True) -> WithFrozenParts:
        super().train(mode)
        for name in self.frozen_parts:
            getattr(self, name).eval()
        return self
