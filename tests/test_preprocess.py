"""Shared preprocessing: the square resize, rotation and the albumentations builder's errors."""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest

from competition.preprocess import IMAGENET_MEAN, IMAGENET_STD, build_albumentations, resize_square, rotate


def test_resize_square_shrinks_by_area_and_enlarges_bilinearly():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    assert np.array_equal(resize_square(image, 16), cv2.resize(image, (16, 16), interpolation=cv2.INTER_AREA))
    assert np.array_equal(resize_square(image, 64), cv2.resize(image, (64, 64), interpolation=cv2.INTER_LINEAR))
    square = image[:32, :32]
    assert resize_square(square, 32) is square


def test_rotate_quarter_turn_matches_numpy_and_keeps_shape():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)
    # About the pixel-grid centre a quarter turn moves pixels exactly onto pixels.
    assert np.array_equal(rotate(image, 90, cv2.INTER_NEAREST), np.rot90(image))
    assert rotate(image, 360) is image
    single = image[..., :1]
    assert rotate(single, 30).shape == single.shape


def test_rotate_border_and_centre_options():
    image = np.zeros((8, 8), np.uint8)
    image[:, :4] = 255
    reflect = rotate(image, 45, border=cv2.BORDER_REFLECT, centre=(4.0, 4.0))
    matrix = cv2.getRotationMatrix2D((4.0, 4.0), 45, 1.0)
    assert np.array_equal(reflect, cv2.warpAffine(image, matrix, (8, 8), borderMode=cv2.BORDER_REFLECT))


def test_imagenet_constants():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


def test_build_albumentations_builds_in_order():
    transforms = build_albumentations([{"name": "HorizontalFlip", "p": 0.5},
                                       {"name": "GaussianBlur", "blur_limit": [3, 3], "p": 0.1}], "augment.train")
    assert [type(t) for t in transforms] == [A.HorizontalFlip, A.GaussianBlur]
    assert transforms[1].blur_limit == (3, 3)
    assert build_albumentations([], "augment.train") == []


@pytest.mark.parametrize("specs, message", [
    ([{"name": "HorizontalFlip"}, {"name": "Flipz"}],
     r"augment\.train\[1\]: albumentations has no transform named 'Flipz'"),
    ([{"p": 0.5}], r"augment\.train\[0\]: albumentations has no transform named None"),
    ([{"name": "Compose"}], r"augment\.train\[0\]: albumentations has no transform named 'Compose'"),
    ([{"name": "HorizontalFlip", "prob": 0.5}],
     r"augment\.train\[0\] \(HorizontalFlip\): unknown argument\(s\) prob; HorizontalFlip takes p"),
    ([{"name": "GaussianBlur", "blur_limit": "wide"}], r"augment\.train\[0\] \(GaussianBlur\): bad arguments .*'wide'"),
    (["HorizontalFlip"], r"augment\.train\[0\] must be a mapping .*'HorizontalFlip'"),
    ({"name": "HorizontalFlip"}, r"augment\.train must be a list"),
])
def test_build_albumentations_errors_name_the_key_and_value(specs, message):
    with pytest.raises(ValueError, match=message):
        build_albumentations(specs, "augment.train")
