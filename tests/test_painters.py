"""Defect painters, CutPaste and DRAEM anomalies: new image, exact 0/255 mask of what changed."""
from __future__ import annotations

import numpy as np
import pytest

from competition.data.painters import (
    DEFECT_KINDS,
    cutpaste,
    paint_defect,
    perlin_anomaly,
    perlin_noise,
    random_anomaly,
)
from competition.data.textures import DATASET_FAMILIES, make_texture


def _texture(seed: int, size=(96, 112), family: str | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    family = family or DATASET_FAMILIES[seed % len(DATASET_FAMILIES)]
    return make_texture(family, size, rng)


def _check_result(original: np.ndarray, before: np.ndarray, out: np.ndarray, mask: np.ndarray) -> None:
    """Shared contract: input untouched, same layout, binary non-empty mask, changes inside it."""
    assert np.array_equal(original, before), "the input image was modified in place"
    assert out.shape == original.shape and out.dtype == np.uint8
    assert mask.shape == original.shape[:2] and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    assert mask.any(), "mask is empty"
    diff = out != original
    changed = diff if diff.ndim == 2 else diff.any(axis=2)
    inside = mask > 0
    assert changed[inside].any(), "nothing changed inside the mask"
    assert not changed[~inside].any(), "pixels outside the mask changed"


def test_defect_kinds_cover_the_contract():
    assert {"scratch", "crack", "hole", "stain", "cut", "missing_pattern"} <= set(DEFECT_KINDS)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
@pytest.mark.parametrize("seed", range(4))
def test_paint_defect_contract(kind, seed):
    image = _texture(seed)
    before = image.copy()
    out, mask = paint_defect(image, kind, np.random.default_rng(seed))
    _check_result(image, before, out, mask)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_paint_defect_on_grayscale_and_small_images(kind):
    grey = _texture(7, size=(40, 32)).mean(axis=2).astype(np.uint8)
    before = grey.copy()
    out, mask = paint_defect(grey, kind, np.random.default_rng(3), severity=0.5)
    assert out.ndim == 2
    _check_result(grey, before, out, mask)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_severity_zero_is_more_visible_than_one(kind):
    def total_change(severity: float) -> float:
        change = 0.0
        for seed in range(6):
            image = _texture(seed)
            out, _ = paint_defect(image, kind, np.random.default_rng(100 + seed), severity=severity)
            change += np.abs(out.astype(np.int32) - image).sum()
        return change

    assert total_change(0.0) > 2 * total_change(1.0)


def test_paint_defect_is_reproducible():
    image = _texture(0)
    first = paint_defect(image, "stain", np.random.default_rng(5))
    second = paint_defect(image, "stain", np.random.default_rng(5))
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_paint_defect_rejects_bad_arguments():
    image = _texture(0, size=(32, 32))
    with pytest.raises(ValueError, match="scratch"):
        paint_defect(image, "dent", np.random.default_rng(0))
    with pytest.raises(ValueError, match="severity"):
        paint_defect(image, "scratch", np.random.default_rng(0), severity=1.5)


@pytest.mark.parametrize("scar", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_cutpaste(scar, seed):
    image = _texture(seed)
    before = image.copy()
    out, mask = cutpaste(image, np.random.default_rng(seed), scar=scar)
    _check_result(image, before, out, mask)


def test_cutpaste_scar_is_thinner_than_normal():
    image = _texture(0, size=(128, 128))
    rng = np.random.default_rng(0)
    normal_area = np.mean([(cutpaste(image, rng)[1] > 0).sum() for _ in range(10)])
    scar_area = np.mean([(cutpaste(image, rng, scar=True)[1] > 0).sum() for _ in range(10)])
    assert scar_area < normal_area


def test_perlin_noise_range_and_shape():
    noise = perlin_noise((50, 70), np.random.default_rng(0), scale=(4, 8))
    assert noise.shape == (50, 70)
    assert np.abs(noise).max() <= 1.0 + 1e-4
    assert noise.std() > 0.1


@pytest.mark.parametrize("seed", range(4))
def test_perlin_anomaly_default_source(seed):
    image = _texture(seed)
    before = image.copy()
    out, mask = perlin_anomaly(image, np.random.default_rng(seed))
    _check_result(image, before, out, mask)


def test_perlin_anomaly_with_source_texture_and_grayscale():
    grey = _texture(1, size=(64, 48)).mean(axis=2).astype(np.uint8)
    source = _texture(2, size=(100, 100))
    before = grey.copy()
    out, mask = perlin_anomaly(grey, np.random.default_rng(0), texture_source=source, beta=1.0)
    _check_result(grey, before, out, mask)
    with pytest.raises(ValueError, match="beta"):
        perlin_anomaly(grey, np.random.default_rng(0), beta=0.05)


@pytest.mark.parametrize("seed", range(8))
def test_random_anomaly(seed):
    image = _texture(seed, size=(64, 64))
    before = image.copy()
    out, mask = random_anomaly(image, np.random.default_rng(seed))
    _check_result(image, before, out, mask)
