"""Procedural textures: every family draws a fresh, valid, reproducible image."""
from __future__ import annotations

import numpy as np
import pytest

from competition.data.textures import DATASET_FAMILIES, OTHER_FAMILIES, make_texture

ALL_FAMILIES = DATASET_FAMILIES + OTHER_FAMILIES


def test_family_lists_cover_the_contract():
    assert {"fabric", "wood", "leather", "tiles", "carpet", "brushed_metal"} <= set(DATASET_FAMILIES)
    assert len(OTHER_FAMILIES) >= 3
    assert not set(OTHER_FAMILIES) & set(DATASET_FAMILIES)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_texture_shape_dtype_and_structure(family):
    rng = np.random.default_rng(0)
    # Non-square on purpose: height and width must not be swapped.
    with np.errstate(invalid="raise", divide="raise"):
        image = make_texture(family, (48, 80), rng)
    assert image.shape == (48, 80, 3)
    assert image.dtype == np.uint8
    assert image.std() > 2.0, "a texture should not be a flat colour"


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_texture_calls_differ_and_seeds_reproduce(family):
    rng = np.random.default_rng(1)
    first, second = make_texture(family, (64, 64), rng), make_texture(family, (64, 64), rng)
    assert not np.array_equal(first, second)
    again = make_texture(family, (64, 64), np.random.default_rng(1))
    assert np.array_equal(first, again)


@pytest.mark.parametrize("family", DATASET_FAMILIES)
def test_texture_has_no_invalid_values_over_many_draws(family):
    # NaNs turn into arbitrary uint8 values silently; make numpy raise instead.
    rng = np.random.default_rng(2)
    with np.errstate(invalid="raise", divide="raise"):
        for size in [(32, 32), (70, 45), (128, 128)]:
            make_texture(family, size, rng)


def test_unknown_family_names_the_allowed_ones():
    with pytest.raises(ValueError, match="fabric.*brushed_metal"):
        make_texture("plaid", (32, 32), np.random.default_rng(0))
