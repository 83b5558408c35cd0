"""The zoo tests' generated data: brushed-metal normals to fit on, and test normals beside the same
surface with painted defects (hole, stain, missing pattern, cut in turn, at the lowest severity).

Drawn in one order from one generator, so tests asking for the same sizes and seed get the same images:
the AUROC bars in the model tests were measured on them.
"""
from __future__ import annotations

import numpy as np

from competition.data.painters import paint_defect
from competition.data.textures import make_texture
from competition.zoo.api import ImageSet

PAINTED_KINDS = ("hole", "stain", "missing_pattern", "cut")


def painted_kind(i: int) -> str:
    """The kind of the i-th painted test image (the kinds in turn)."""
    return PAINTED_KINDS[i % len(PAINTED_KINDS)]


def brushed_metal(size: int, rng: np.random.Generator) -> np.ndarray:
    return make_texture("brushed_metal", (size, size), rng)


def painted_test_sets(size: int, n_fit: int = 40, n_test: int = 12,
                      rng: np.random.Generator | None = None) -> tuple[ImageSet, ImageSet, np.ndarray]:
    """(fit normals, test images: n_test normals then n_test painted, their labels); `rng` defaults to seed 0
    and is left where the draws end, for a test that draws more from it."""
    rng = np.random.default_rng(0) if rng is None else rng
    fit = ImageSet([brushed_metal(size, rng) for _ in range(n_fit)])
    normal = [brushed_metal(size, rng) for _ in range(n_test)]
    painted = [paint_defect(brushed_metal(size, rng), painted_kind(i), rng, severity=0.0)[0]
               for i in range(n_test)]
    return fit, ImageSet(normal + painted), np.array([0] * n_test + [1] * n_test)


def darkened_and_cut_sets(size: int, n: int, rng: np.random.Generator) -> ImageSet:
    """n normals darkened to half (anomalous all over), then n with a painted cut (one spot): the test of PaDiM's
    `score_background`."""
    darkened = [brushed_metal(size, rng) // 2 for _ in range(n)]
    cuts = [paint_defect(brushed_metal(size, rng), "cut", rng, severity=0.0)[0] for _ in range(n)]
    return ImageSet(darkened + cuts)
