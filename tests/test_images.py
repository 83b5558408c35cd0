"""The image loader on every stored mode, EXIF orientation, masks, and unreadable files."""

import pickle

import numpy as np
import pytest
from PIL import Image, ImageFile

from competition.data.images import (
    ImageReadError,
    find_unreadable,
    image_mode,
    image_size,
    read_image,
    read_mask,
)


def _assert_rgb_uint8(array: np.ndarray, height: int, width: int) -> None:
    assert array.shape == (height, width, 3)
    assert array.dtype == np.uint8
    assert array.flags["C_CONTIGUOUS"]


def _truncated_copy(source, target, keep_fraction=0.5):
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep_fraction)])
    return target


def _noise(height=64, width=64, seed=0):
    # Noise does not compress, so cutting the file in half really cuts pixel data.
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_grey_l_becomes_three_equal_channels(tmp_path):
    grey = np.array([[0, 100, 255]], dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    image = read_image(tmp_path / "grey.png")
    _assert_rgb_uint8(image, 1, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], grey)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_grey_is_scaled_not_clipped(tmp_path, suffix):
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(np.array([[65535, 32768, 257, 0]], dtype=np.uint16)).save(path)
    assert image_mode(path).startswith("I;16")
    image = read_image(path)
    _assert_rgb_uint8(image, 1, 4)
    np.testing.assert_array_equal(image[0, :, 0], [255, 128, 1, 0])


def test_32bit_integer_and_float_grey(tmp_path):
    Image.fromarray(np.array([[0, 30000, 65535]], dtype=np.int32)).save(tmp_path / "int.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "int.tif")[0, :, 1], [0, 117, 255])
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "float.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "float.tif")[0, :, 2], [0, 128, 255])


def test_rgb_png_is_exact(tmp_path):
    pixels = _noise(5, 7)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    image = read_image(tmp_path / "rgb.png")
    _assert_rgb_uint8(image, 5, 7)
    np.testing.assert_array_equal(image, pixels)


def test_rgba_drops_alpha_and_keeps_stored_colour(tmp_path):
    pixels = np.array([[[10, 20, 30, 0], [40, 50, 60, 255]]], dtype=np.uint8)
    Image.fromarray(pixels, mode="RGBA").save(tmp_path / "rgba.png")
    image = read_image(tmp_path / "rgba.png")
    _assert_rgb_uint8(image, 1, 2)
    np.testing.assert_array_equal(image[0], [[10, 20, 30], [40, 50, 60]])


def test_la_uses_grey_channel(tmp_path):
    pixels = np.array([[[90, 0], [200, 255]]], dtype=np.uint8)
    Image.fromarray(pixels, mode="LA").save(tmp_path / "la.png")
    image = read_image(tmp_path / "la.png")
    _assert_rgb_uint8(image, 1, 2)
    np.testing.assert_array_equal(image[0], [[90, 90, 90], [200, 200, 200]])


def test_palette_with_and_without_transparency(tmp_path):
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    palette_image.putpixel((0, 0), 0)
    palette_image.putpixel((1, 0), 1)
    palette_image.save(tmp_path / "palette.png")
    palette_image.save(tmp_path / "palette_transparent.png", transparency=0)
    for name in ("palette.png", "palette_transparent.png"):
        assert image_mode(tmp_path / name) == "P"
        image = read_image(tmp_path / name)
        _assert_rgb_uint8(image, 1, 2)
        np.testing.assert_array_equal(image[0], [[255, 0, 0], [0, 0, 255]])


def test_cmyk_jpeg(tmp_path):
    # C=0, M=255, Y=255, K=0 is pure red.
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert image_mode(tmp_path / "cmyk.jpg") == "CMYK"
    image = read_image(tmp_path / "cmyk.jpg")
    _assert_rgb_uint8(image, 8, 8)
    np.testing.assert_allclose(image[4, 4].astype(int), [255, 0, 0], atol=6)


def test_one_bit(tmp_path):
    bits = Image.new("1", (3, 1), 0)
    bits.putpixel((1, 0), 1)
    bits.save(tmp_path / "bits.png")
    image = read_image(tmp_path / "bits.png")
    _assert_rgb_uint8(image, 1, 3)
    np.testing.assert_array_equal(image[0, :, 0], [0, 255, 0])


@pytest.mark.parametrize("suffix", [".bmp", ".tif", ".tiff", ".BMP"])
def test_lossless_formats(tmp_path, suffix):
    pixels = _noise(6, 4)
    Image.fromarray(pixels).save(tmp_path / f"image{suffix}", format="BMP" if "bmp" in suffix.lower() else "TIFF")
    np.testing.assert_array_equal(read_image(tmp_path / f"image{suffix}"), pixels)


def test_jpeg_rgb_and_grey(tmp_path):
    Image.new("RGB", (10, 6), (200, 100, 50)).save(tmp_path / "colour.jpg", quality=95)
    colour = read_image(tmp_path / "colour.jpg")
    _assert_rgb_uint8(colour, 6, 10)
    np.testing.assert_allclose(colour[3, 5].astype(int), [200, 100, 50], atol=4)
    Image.new("L", (10, 6), 77).save(tmp_path / "grey.jpeg")
    grey = read_image(tmp_path / "grey.jpeg")
    _assert_rgb_uint8(grey, 6, 10)
    assert abs(int(grey[3, 5, 0]) - 77) <= 2


def test_exif_orientation_is_applied(tmp_path):
    # Stored 20 wide x 10 high with a red block top-left; orientation 6 means "rotate 90° clockwise
    # to display", so the displayed image is 10 wide x 20 high with the block top-right.
    stored = np.zeros((10, 20, 3), dtype=np.uint8)
    stored[:4, :4] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    image = read_image(path)
    _assert_rgb_uint8(image, 20, 10)
    assert image[1, 8, 0] > 200 and image[1, 8, 1] < 60
    assert image[1, 1, 0] < 60
    assert image_size(path) == (20, 10)


def test_image_size_and_mode_from_header(tmp_path):
    Image.new("RGB", (30, 12)).save(tmp_path / "plain.png")
    assert image_size(tmp_path / "plain.png") == (12, 30)
    assert image_mode(tmp_path / "plain.png") == "RGB"


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file_raises_naming_it(tmp_path, suffix):
    whole = tmp_path / f"whole{suffix}"
    Image.fromarray(_noise(128, 128)).save(whole)
    truncated = _truncated_copy(whole, tmp_path / f"cut{suffix}")
    # The header survives, so a header-only read still works: only the full decode catches it.
    assert image_size(truncated) == (128, 128)
    with pytest.raises(ImageReadError) as caught:
        read_image(truncated)
    assert caught.value.path == str(truncated)
    assert str(truncated) in str(caught.value)
    assert "truncated" in str(caught.value)


def test_truncation_detected_even_if_someone_enabled_padding(tmp_path, monkeypatch):
    whole = tmp_path / "whole.png"
    Image.fromarray(_noise(128, 128)).save(whole)
    truncated = _truncated_copy(whole, tmp_path / "cut.png")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageReadError):
        read_image(truncated)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_non_image_and_missing_files_raise(tmp_path):
    (tmp_path / "notes.png").write_text("this is not a picture")
    with pytest.raises(ImageReadError, match="notes.png: not a recognised image"):
        read_image(tmp_path / "notes.png")
    with pytest.raises(ImageReadError, match="absent.png: file does not exist"):
        read_image(tmp_path / "absent.png")
    with pytest.raises(ImageReadError, match="absent.png"):
        image_size(tmp_path / "absent.png")
    with pytest.raises(ImageReadError, match="notes.png"):
        image_mode(tmp_path / "notes.png")
    # A ValueError, so callers catching bad-input errors catch it too.
    assert issubclass(ImageReadError, ValueError)


def test_image_read_error_survives_pickling():
    error = pickle.loads(pickle.dumps(ImageReadError("a/b.png", "image file is truncated")))
    assert error.path == "a/b.png" and error.reason == "image file is truncated"
    assert str(error) == "cannot read image a/b.png: image file is truncated"


def test_find_unreadable_reports_only_bad_files(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(_noise(128, 128)).save(good)
    cut = _truncated_copy(good, tmp_path / "cut.png")
    (tmp_path / "text.jpg").write_text("nope")
    failures = find_unreadable([good, cut, tmp_path / "text.jpg"], progress=False)
    assert [path for path, _ in failures] == [str(cut), str(tmp_path / "text.jpg")]
    assert "truncated" in failures[0][1]


def test_mask_any_nonzero_channel_is_defect(tmp_path):
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0, 2] = 1
    rgb[1, 2] = (0, 7, 0)
    Image.fromarray(rgb).save(tmp_path / "colour_mask.png")
    mask = read_mask(tmp_path / "colour_mask.png")
    assert mask.shape == (2, 3) and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, [[255, 0, 0], [0, 0, 255]])


def test_mask_grey_16bit_and_alpha(tmp_path):
    Image.fromarray(np.array([[0, 1, 128]], dtype=np.uint8)).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "grey.png"), [[0, 255, 255]])
    Image.fromarray(np.array([[0, 1]], dtype=np.uint16)).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "deep.png"), [[0, 255]])
    # An opaque alpha must not turn the background into defect.
    rgba = np.array([[[0, 0, 0, 255], [255, 255, 255, 255]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "alpha.png"), [[0, 255]])


def test_mask_resize_is_nearest_and_stays_binary(tmp_path):
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[:2, :2] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    resized = read_mask(tmp_path / "mask.png", size=(8, 6))
    assert resized.shape == (8, 6)
    assert set(np.unique(resized)) == {0, 255}
    assert resized[0, 0] == 255 and resized[7, 5] == 0


def test_truncated_mask_raises(tmp_path):
    Image.fromarray(_noise(128, 128)[:, :, 0]).save(tmp_path / "mask.png")
    cut = _truncated_copy(tmp_path / "mask.png", tmp_path / "cut_mask.png")
    with pytest.raises(ImageReadError, match="cut_mask.png"):
        read_mask(cut)


def test_png_exif_orientation_agrees_between_size_and_decode(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    path = tmp_path / "rotated.png"
    Image.fromarray(np.zeros((10, 20, 3), dtype=np.uint8)).save(path, exif=exif.tobytes())
    assert image_size(path) == (20, 10)
    assert read_image(path).shape == (20, 10, 3)
