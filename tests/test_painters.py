"""Defect painters, CutPaste and DRAEM anomalies: new image, exact 0/255 mask of what changed."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from competition.data import painters
from competition.data.anomalies import random_anomaly
from competition.data.painters import (
    DEFECT_KINDS,
    cutpaste,
    paint_defect,
    perlin_anomaly,
    perlin_noise,
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


# ------------------------------------------------------------------------------------ awkward images
# Binary circuit boards, blank surfaces and tiny crops give some painters nothing to change
# (a smeared or warped pattern on a constant patch is the same patch); they must still paint.

ALL_KINDS = DEFECT_KINDS + ("cutpaste", "cutpaste_scar", "perlin", "perlin_flat_source", "random")


def _binary_board(size: int = 96, seed: int = 0) -> np.ndarray:
    """A circuit-board scan as it reaches the painters: 0/255 traces and pads on a black board,
    large flat regions, area-resized so only the edges are grey."""
    rng = np.random.default_rng(seed)
    board = np.zeros((640, 640), np.uint8)
    for _ in range(6):  # traces: long thick lines, mostly axis-aligned
        x0, y0 = (int(v) for v in rng.integers(40, 600, size=2))
        horizontal = rng.random() < 0.5
        x1, y1 = (int(rng.integers(40, 600)), y0) if horizontal else (x0, int(rng.integers(40, 600)))
        cv2.line(board, (x0, y0), (x1, y1), 255, int(rng.integers(8, 20)))
    for _ in range(8):  # pads
        x, y = (int(v) for v in rng.integers(20, 600, size=2))
        cv2.rectangle(board, (x, y), (x + 24, y + 24), 255, -1)
    return cv2.resize(board, (size, size), interpolation=cv2.INTER_AREA)


def _paint_any(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if kind in DEFECT_KINDS:
        return paint_defect(image, kind, rng, severity=float(rng.uniform(0.0, 1.0)))
    if kind.startswith("cutpaste"):
        return cutpaste(image, rng, scar=kind == "cutpaste_scar")
    if kind == "perlin":
        return perlin_anomaly(image, rng)
    if kind == "perlin_flat_source":  # another normal of the same blank kind as the anomaly texture
        return perlin_anomaly(image, rng, texture_source=np.zeros_like(image), beta=float(rng.uniform(0.1, 1.0)))
    return random_anomaly(image, rng)


AWKWARD_IMAGES = {
    "black": lambda: np.zeros((96, 96), np.uint8),
    "white_rgb": lambda: np.full((96, 96, 3), 255, np.uint8),
    "grey_rgb": lambda: np.full((64, 80, 3), 128, np.uint8),
    "binary_board": lambda: _binary_board(96),
    "binary_board_full_res": lambda: (_binary_board(640) > 127).astype(np.uint8) * 255,
    "tiny_16": lambda: _binary_board(16),
    "tiny_24_flat": lambda: np.full((24, 24), 40, np.uint8),
    "tiny_24_texture": lambda: _texture(5, size=(24, 24)),
}


@pytest.mark.parametrize("image_name", list(AWKWARD_IMAGES))
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_every_kind_paints_visibly_on_flat_binary_and_tiny_images(image_name, kind):
    image = AWKWARD_IMAGES[image_name]()
    before = image.copy()
    seeds = range(3) if image_name == "binary_board_full_res" else range(6)
    for seed in seeds:
        out, mask = _paint_any(image, kind, np.random.default_rng(seed))
        _check_result(image, before, out, mask)


def test_missing_pattern_on_a_binary_board_is_placed_on_its_edges():
    """Random centres on a binary board mostly land on flat black; the painter moves to structure
    rather than swapping the kind, so the defect stays a missing pattern."""
    board = _binary_board(96, seed=1)
    before = _substitutions_of("missing_pattern")
    for seed in range(40):
        out, mask = paint_defect(board, "missing_pattern", np.random.default_rng(seed))
        _check_result(board, board.copy(), out, mask)
    assert _substitutions_of("missing_pattern") == before


def _substitutions_of(kind: str) -> int:
    return sum(count for (asked, _), count in painters.substitution_counts().items() if asked == kind)


def test_a_kind_that_cannot_change_an_image_is_replaced_and_logged(caplog):
    flat = np.full((48, 48), 90, np.uint8)  # blurring or warping a constant image changes nothing
    before = _substitutions_of("missing_pattern")
    with caplog.at_level("WARNING", logger="competition.data.painters"):
        out, mask = paint_defect(flat, "missing_pattern", np.random.default_rng(0))
    _check_result(flat, flat.copy(), out, mask)
    assert _substitutions_of("missing_pattern") == before + 1
    replaced = [k for (asked, k) in painters.substitution_counts() if asked == "missing_pattern"]
    assert set(replaced) <= set(DEFECT_KINDS) - {"missing_pattern"}
    assert before > 0 or "missing_pattern" in caplog.text  # logged the first time in this process


def test_the_last_resort_changes_any_image():
    """When no kind can change an image, an inverted spot does: 255 - v differs from every uint8 v."""
    for value in (0, 127, 128, 255):
        image = np.full((16, 16, 3), value, np.uint8)
        target, coverage, strength = painters._inverted_spot(image.astype(np.float32), np.random.default_rng(0), 1.0)
        assert (coverage >= 0.15).any() and strength == 1.0
        assert np.all(target[coverage >= 0.15] != image[coverage >= 0.15])
