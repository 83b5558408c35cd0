"""The one image loader of the project: every image and mask on disk is read through here.

Convention: images come back as (H, W, 3) uint8 RGB, C-contiguous, with the EXIF orientation
applied (PIL ``ImageOps.exif_transpose``); masks as (H, W) uint8 in {0, 255}. A file that cannot
be fully decoded (missing, truncated, not an image) raises ``ImageReadError`` naming it; PIL's
``LOAD_TRUNCATED_IMAGES`` is kept False so a truncated file never passes as half-grey pixels.

Mode conversions, all to 8-bit RGB:
- L, 1 (0/255), LA (alpha dropped): the grey channel repeated three times.
- I;16 (16-bit PNG/TIFF): v -> round(v / 257), so 65535 -> 255 and 32768 -> 128.
- I (32-bit integer): values in [0, 255] kept, values in [0, 65535] scaled as 16-bit, any other
  range min-max stretched to [0, 255].
- F (float): values in [0, 1] times 255, values in [0, 255] kept, other ranges min-max
  stretched; NaN becomes 0.
- RGB and 16-bit RGB (PIL keeps the high byte); RGBA, PA, P with transparency: alpha DROPPED,
  the stored colour kept. Inspection images with alpha are practically always fully opaque, and
  compositing onto a background would invent pixel values the camera never recorded.
- P, CMYK (Adobe-inverted JPEGs included), YCbCr and other modes: PIL's conversion to RGB.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from tqdm import tqdm

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

# EXIF orientations 5..8 are transposes/rotations by 90 degrees: height and width swap.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageReadError(ValueError):
    """A file that cannot be read as an image; ``path`` names it, ``reason`` says why."""

    def __init__(self, path: PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")

    def __reduce__(self):
        # Keep the two-argument constructor picklable (DataLoader workers send errors back).
        return (type(self), (self.path, self.reason))


def _ensure_truncated_images_rejected() -> None:
    # Something (a third-party import, a notebook) may have switched PIL to silently pad
    # truncated files; this project treats truncation as an error, so switch it back.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was True; resetting it to False so "
                    "truncated image files raise ImageReadError")
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def _reason(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "file does not exist"
    if isinstance(error, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(error, UnidentifiedImageError):
        return "not a recognised image file (expected PNG, JPEG, BMP or TIFF)"
    message = str(error).strip()
    return message if message else type(error).__name__


def _open_decoded(path: PathLike) -> Image.Image:
    """Open ``path`` and force the full decode, raising ImageReadError on any failure."""
    _ensure_truncated_images_rejected()
    if not os.path.exists(path):
        raise ImageReadError(path, "file does not exist")
    try:
        with Image.open(path) as opened:
            # .load() decodes every pixel: this is where truncation and corrupt data surface.
            opened.load()
            ImageOps.exif_transpose(opened, in_place=True)
            # The pixels are in memory now, so the image outlives the closed file.
            return opened
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - corrupt files raise arbitrary errors in PIL plugins
        raise ImageReadError(path, _reason(error)) from error


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    # round(v / 257) maps [0, 65535] onto [0, 255] exactly: 65535 -> 255, 32768 -> 128.
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _integer_grey_to_uint8(values: np.ndarray) -> np.ndarray:
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high <= 255:
        return values.astype(np.uint8)
    if low >= 0 and high <= 65535:
        return _scale_16bit(values)
    return _stretch(values.astype(np.float64))


def _float_grey_to_uint8(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
        return np.round(values * 255.0).astype(np.uint8)
    if low >= 0.0 and high <= 255.0:
        return np.round(values).astype(np.uint8)
    return _stretch(values)


def _grey_uint8(image: Image.Image) -> np.ndarray | None:
    """The (H, W) uint8 grey plane of a single-channel image, or None for colour modes."""
    mode = image.mode
    if mode == "L":
        return np.asarray(image)
    if mode == "1":
        return np.asarray(image.convert("L"))
    if mode in ("LA", "La"):
        return np.asarray(image.getchannel(0))
    if mode in _SIXTEEN_BIT_MODES:
        return _scale_16bit(np.asarray(image))
    if mode == "I":
        return _integer_grey_to_uint8(np.asarray(image))
    if mode == "F":
        return _float_grey_to_uint8(np.asarray(image))
    return None


def _rgb_uint8(image: Image.Image, path: PathLike) -> np.ndarray:
    grey = _grey_uint8(image)
    if grey is not None:
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        # Converting P with transparency straight to RGB makes PIL warn; go through RGBA.
        image = image.convert("RGBA")
    if image.mode != "RGB":
        try:
            image = image.convert("RGB")  # drops alpha for RGBA/RGBa/PA/RGBX
        except ValueError as error:
            raise ImageReadError(path, f"unsupported image mode {image.mode} ({error})") from error
    return np.asarray(image)


def read_image(path: PathLike) -> np.ndarray:
    """Decode ``path`` fully into an (H, W, 3) uint8 RGB array (see the module docstring)."""
    image = _open_decoded(path)
    return np.ascontiguousarray(_rgb_uint8(image, path), dtype=np.uint8)


def read_mask(path: PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a defect mask as (H, W) uint8 in {0, 255}: any nonzero colour channel is defect.

    Alpha is ignored, as in read_image. ``size=(height, width)`` resizes with nearest neighbour.
    """
    image = _open_decoded(path)
    if image.mode in ("L", "1", "I", "F") or image.mode in _SIXTEEN_BIT_MODES:
        defect = np.asarray(image) != 0
    elif image.mode in ("LA", "La"):
        defect = np.asarray(image.getchannel(0)) != 0
    else:
        defect = (_rgb_uint8(image, path) != 0).any(axis=2)
    mask = np.where(defect, 255, 0).astype(np.uint8)
    if size is not None:
        height, width = size
        if mask.shape != (height, width):
            mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
    return np.ascontiguousarray(mask)


def _header_orientation(image: Image.Image) -> int:
    # PNG's getexif() decodes the whole file to look for an eXIf chunk after the pixel data;
    # the base implementation reads only what the header parsing already found.
    exif = Image.Image.getexif(image) if image.format == "PNG" else image.getexif()
    return int(exif.get(_EXIF_ORIENTATION_TAG, 1) or 1)


def image_size(path: PathLike) -> tuple[int, int]:
    """(height, width) as read_image will return it, from the header (EXIF rotation applied)."""
    if not os.path.exists(path):
        raise ImageReadError(path, "file does not exist")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if _header_orientation(image) in _SWAPPING_ORIENTATIONS:
                width, height = height, width
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - see _open_decoded
        raise ImageReadError(path, _reason(error)) from error
    return height, width


def image_mode(path: PathLike) -> str:
    """PIL mode of the stored file ("L", "I;16", "RGB", "RGBA", "P", "CMYK", ...), from the header."""
    if not os.path.exists(path):
        raise ImageReadError(path, "file does not exist")
    try:
        with Image.open(path) as image:
            return image.mode
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - see _open_decoded
        raise ImageReadError(path, _reason(error)) from error


def find_unreadable(paths: Iterable[PathLike], progress: bool = True) -> list[tuple[str, str]]:
    """Fully decode every path with read_image; return (path, reason) for each one that fails."""
    paths = list(paths)
    failures: list[tuple[str, str]] = []
    for path in tqdm(paths, desc="decoding images", unit="img", disable=not progress):
        try:
            read_image(path)
        except ImageReadError as error:
            failures.append((str(path), error.reason))
    return failures


__all__ = [
    "ImageReadError",
    "read_image",
    "read_mask",
    "image_size",
    "image_mode",
    "find_unreadable",
]
