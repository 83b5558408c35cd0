"""Test-time augmentation views: the eight flips and quarter turns of the square (the dihedral group).

Surfaces and textures have no up: a defect seen turned or mirrored is the same defect, so averaging a
model's outputs over these views removes orientation noise. Used by the classifier (`train.tta`) and by
zoo models that average their own views.
"""
from __future__ import annotations

from typing import Literal

import torch

TtaMode = Literal["none", "flips", "dihedral"]
# view k: a horizontal flip when k >= 4, then k % 4 quarter turns. "flips" is the identity, the horizontal
# and the vertical flips and both (k = 6 is the vertical flip, k = 2 the half turn).
TTA_VIEWS: dict[str, tuple[int, ...]] = {"none": (0,), "flips": (0, 4, 6, 2), "dihedral": tuple(range(8))}


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the eight flips/rotations of (..., H, W) tensors (k = 0 is the identity)."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def undo_dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of `dihedral(., k)`: maps computed on a view, back on the original grid."""
    x = torch.rot90(x, -(k % 4), dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def tta_views(mode: TtaMode | bool) -> tuple[int, ...]:
    """The view indices of a TTA mode (a bool is the older switch: true = flips)."""
    if isinstance(mode, bool):
        mode = "flips" if mode else "none"
    if mode not in TTA_VIEWS:
        raise ValueError(f"tta must be one of {', '.join(TTA_VIEWS)}; got {mode!r}")
    return TTA_VIEWS[mode]
