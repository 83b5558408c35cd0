"""Image preprocessing shared by every stage: normalisation constants, the square resize, rotation,
albumentations pipelines built from config entries (`[{name: HorizontalFlip, p: 0.5}, ...]`), and the
input geometry (`Geometry`: square or aspect-preserving letterbox canvases, overlapping tiles, and the
way maps and masks follow them back).

The constants are torchvision's ImageNet statistics, on the 0..1 scale, which timm backbones expect.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """To size x size: area averaging when shrinking (no aliasing), bilinear when enlarging."""
    if image.shape[:2] == (size, size):
        return image
    shrinking = image.shape[0] * image.shape[1] > size * size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def rotate(image: np.ndarray, angle: float, interpolation: int = cv2.INTER_LINEAR,
           border: int = cv2.BORDER_REFLECT_101, centre: tuple[float, float] | None = None) -> np.ndarray:
    """Rotate by `angle` degrees (counter-clockwise) about `centre`, keeping the size and the shape.

    The default centre is the middle of the pixel grid ((w - 1) / 2, (h - 1) / 2), so a quarter turn
    moves pixels onto pixels. Reflected borders: the corners a rotation uncovers show (mirrored)
    surface, never black.
    """
    if angle % 360 == 0:
        return image
    height, width = image.shape[:2]
    if centre is None:
        centre = (width / 2 - 0.5, height / 2 - 0.5)
    matrix = cv2.getRotationMatrix2D(centre, angle, 1.0)
    rotated = cv2.warpAffine(image, matrix, (width, height), flags=interpolation, borderMode=border)
    return rotated.reshape(image.shape)  # warpAffine drops a trailing channel axis of length 1


def build_albumentations(specs: list[dict[str, Any]], key: str) -> list[A.BasicTransform]:
    """`[{name: HorizontalFlip, p: 0.5}, ...]` -> albumentations transforms, in order.

    Every entry is checked before anything runs: the name must be an albumentations transform and
    every argument one that transform takes (albumentations itself only warns about unknown ones),
    with a value it accepts. Errors name `key[i]` and the offending value. YAML lists become tuples,
    the form albumentations documents for ranges.
    """
    if not isinstance(specs, (list, tuple)):
        raise ValueError(f"{key} must be a list of {{name: <transform>, ...}} entries, got {specs!r}")
    transforms = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ValueError(f"{key}[{i}] must be a mapping like {{name: HorizontalFlip, p: 0.5}}, got {spec!r}")
        spec = dict(spec)
        name = spec.pop("name", None)
        cls = getattr(A, str(name), None)
        if not isinstance(cls, type) or not issubclass(cls, A.BasicTransform):
            raise ValueError(f"{key}[{i}]: albumentations has no transform named {name!r} "
                             "(give the class name, e.g. HorizontalFlip, RandomBrightnessContrast, GaussianBlur)")
        parameters = inspect.signature(cls.__init__).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            accepted = [p for p in parameters if p != "self"]
            unknown = sorted(set(spec) - set(accepted))
            if unknown:
                raise ValueError(f"{key}[{i}] ({name}): unknown argument(s) {', '.join(unknown)}; "
                                 f"{name} takes {', '.join(accepted) or 'no arguments'}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
        try:
            transforms.append(cls(**kwargs))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{key}[{i}] ({name}): bad arguments {spec}: {exc}") from None
    return transforms


# ---------------------------------------------------------------- input geometry

@dataclass(frozen=True)
class Geometry:
    """How an image of any size becomes a model's square input, and how maps come back.

    `resize`: "square" stretches the image to image_size x image_size (aspect lost); "letterbox"
    scales the longer side to image_size, keeps the aspect, and fills the rest of the square canvas
    by mirroring the image (no artificial edge; `valid` marks the real pixels). With `tiles`, the
    image is first scaled by `tile_scale` (1.0 = native pixels), cut into overlapping
    tile_size x tile_size tiles, and every tile is fitted to the canvas as above; an image's score
    is the max (or the mean of the `tile_topk` highest) of its tile scores, its map the tiles'
    maps stitched back.
    """

    image_size: int = 128
    resize: Literal["square", "letterbox"] = "square"
    tiles: bool = False
    tile_size: int = 160  # in pixels of the image scaled by tile_scale
    tile_overlap: float = 0.25  # least fraction of a tile shared with its neighbour
    tile_scale: float = 1.0
    tile_reduce: Literal["max", "topk_mean"] = "max"
    tile_topk: int = 3

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"geometry: image_size must be >= 1, got {self.image_size}")
        if self.resize not in ("square", "letterbox"):
            raise ValueError(f"geometry: resize must be 'square' or 'letterbox', got {self.resize!r}")
        if self.tile_size < 1:
            raise ValueError(f"geometry: tile size must be >= 1, got {self.tile_size}")
        if not 0.0 <= self.tile_overlap < 1.0:
            raise ValueError(f"geometry: tile overlap is a fraction in [0, 1), got {self.tile_overlap}")
        if self.tile_scale <= 0:
            raise ValueError(f"geometry: tile scale must be > 0, got {self.tile_scale}")
        if self.tile_reduce not in ("max", "topk_mean"):
            raise ValueError(f"geometry: tile reduce must be 'max' or 'topk_mean', got {self.tile_reduce!r}")
        if self.tile_topk < 1:
            raise ValueError(f"geometry: tile topk must be >= 1, got {self.tile_topk}")

    @property
    def is_square(self) -> bool:
        """The plain square resize of whole images (the historical input, no padding, no tiles)."""
        return self.resize == "square" and not self.tiles

    def describe(self) -> dict[str, Any]:
        """The settings that change what a model sees (cache keys); tile keys only when tiling."""
        out: dict[str, Any] = {"image_size": self.image_size, "resize": self.resize}
        if self.tiles:
            out.update(tile_size=self.tile_size, tile_overlap=self.tile_overlap, tile_scale=self.tile_scale)
        return out


def _resize(image: np.ndarray, height: int, width: int, nearest: bool = False) -> np.ndarray:
    """To (height, width): area averaging when shrinking, bilinear when enlarging, or nearest-neighbour."""
    if image.shape[:2] == (height, width):
        return image
    if nearest:
        interpolation = cv2.INTER_NEAREST
    else:
        shrinking = image.shape[0] * image.shape[1] > height * width
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    resized = cv2.resize(image, (width, height), interpolation=interpolation)
    return resized.reshape((height, width) + image.shape[2:])  # cv2 drops a trailing channel axis of length 1


def canvas_box(height: int, width: int, geometry: Geometry) -> tuple[int, int, int, int]:
    """(top, left, content height, content width) of an image of `height` x `width` on its canvas."""
    size = geometry.image_size
    if geometry.resize == "square":
        return 0, 0, size, size
    longer = max(height, width)
    content_h = max(1, round(height * size / longer))
    content_w = max(1, round(width * size / longer))
    return (size - content_h) // 2, (size - content_w) // 2, content_h, content_w


def _fit(image: np.ndarray, geometry: Geometry, nearest: bool) -> tuple[np.ndarray, np.ndarray]:
    size = geometry.image_size
    if geometry.resize == "square":
        canvas = _resize(image, size, size, nearest) if nearest else resize_square(image, size)
        return canvas, np.ones((size, size), bool)
    top, left, content_h, content_w = canvas_box(image.shape[0], image.shape[1], geometry)
    content = _resize(image, content_h, content_w, nearest)
    # Mirrored padding: the canvas shows surface-like texture, never a hard edge to a flat colour.
    canvas = cv2.copyMakeBorder(content, top, size - content_h - top, left, size - content_w - left,
                                cv2.BORDER_REFLECT_101).reshape((size, size) + image.shape[2:])
    valid = np.zeros((size, size), bool)
    valid[top:top + content_h, left:left + content_w] = True
    return canvas, valid


def fit_to_canvas(image: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """(H, W[, C]) image -> (its image_size x image_size canvas, (S, S) bool map of the real pixels).

    "square" is `resize_square` (identical bytes, all pixels valid); "letterbox" keeps the aspect,
    centres the image and mirrors it into the padding.
    """
    return _fit(image, geometry, nearest=False)


def fit_mask_to_canvas(mask: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """A mask through exactly the image's geometry (nearest-neighbour, so labels stay labels)."""
    return _fit(mask, geometry, nearest=True)


def canvas_to_image(canvas_map: np.ndarray, height: int, width: int, geometry: Geometry) -> np.ndarray:
    """A map on the canvas (any square size: it is rescaled to image_size first) -> the image's own
    `height` x `width` (the padding cropped away), bilinear."""
    size = geometry.image_size
    canvas_map = np.asarray(canvas_map, np.float32)
    if canvas_map.shape[:2] != (size, size):
        canvas_map = cv2.resize(canvas_map, (size, size), interpolation=cv2.INTER_LINEAR)
    top, left, content_h, content_w = canvas_box(height, width, geometry)
    content = canvas_map[top:top + content_h, left:left + content_w]
    return cv2.resize(content, (width, height), interpolation=cv2.INTER_LINEAR)


def scaled_shape(height: int, width: int, geometry: Geometry) -> tuple[int, int]:
    """The image's size once scaled by `tile_scale`: the plane its tiles are cut from."""
    return max(1, round(height * geometry.tile_scale)), max(1, round(width * geometry.tile_scale))


def scale_for_tiles(image: np.ndarray, geometry: Geometry, nearest: bool = False) -> np.ndarray:
    """The image (or, with `nearest`, its mask) scaled by `tile_scale`."""
    return _resize(image, *scaled_shape(image.shape[0], image.shape[1], geometry), nearest=nearest)


def _tile_starts(length: int, tile: int, overlap: float) -> np.ndarray:
    if length <= tile:
        return np.zeros(1, int)
    step = max(1.0, tile * (1.0 - overlap))
    count = int(np.ceil((length - tile) / step - 1e-9)) + 1
    # Evenly spread starts: the first tile at 0, the last flush with the border, overlap >= the asked one.
    return np.round(np.linspace(0, length - tile, count)).astype(int)


def tile_boxes(height: int, width: int, geometry: Geometry) -> np.ndarray:
    """(n, 4) int boxes (top, left, bottom, right) covering an image of `height` x `width` once it is
    scaled by `tile_scale` (`scaled_shape`); row-major. A side shorter than a tile gives tiles of
    that side's length."""
    scaled_h, scaled_w = scaled_shape(height, width, geometry)
    size = geometry.tile_size
    rows = _tile_starts(scaled_h, size, geometry.tile_overlap)
    cols = _tile_starts(scaled_w, size, geometry.tile_overlap)
    return np.array([(top, left, min(top + size, scaled_h), min(left + size, scaled_w))
                     for top in rows for left in cols], dtype=int).reshape(-1, 4)


def cut_tiles(image: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """The tiles of an image (already scaled by `scale_for_tiles`), in the order of `boxes`."""
    return [image[top:bottom, left:right] for top, left, bottom, right in np.asarray(boxes)]


def image_tiles(image: np.ndarray, geometry: Geometry, nearest: bool = False) -> tuple[list[np.ndarray], np.ndarray]:
    """An image's (or, with `nearest`, a mask's) tiles and their boxes: `scale_for_tiles`, `tile_boxes`, `cut_tiles`."""
    boxes = tile_boxes(image.shape[0], image.shape[1], geometry)
    return cut_tiles(scale_for_tiles(image, geometry, nearest), boxes), boxes


def scaled_to_image(scaled_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """A map of the tile plane (`stitch_maps`' output) back to the image's own `height` x `width`, bilinear."""
    scaled_map = np.asarray(scaled_map, np.float32)
    if scaled_map.shape[:2] == (height, width):
        return scaled_map
    return cv2.resize(scaled_map, (width, height), interpolation=cv2.INTER_LINEAR)


def stitch_maps(tile_maps: Sequence[np.ndarray], boxes: np.ndarray, shape: tuple[int, int],
                reduce: Literal["max", "mean"] = "max") -> np.ndarray:
    """Per-tile maps (each at its box's size, or rescaled to it) -> one (H, W) float32 map of the scaled
    image, where tiles overlap the max (or the mean) of their values."""
    height, width = shape
    if reduce not in ("max", "mean"):
        raise ValueError(f"stitch_maps: reduce must be 'max' or 'mean', got {reduce!r}")
    out = np.full((height, width), -np.inf if reduce == "max" else 0.0, np.float32)
    counts = np.zeros((height, width), np.float32)
    for tile_map, (top, left, bottom, right) in zip(tile_maps, np.asarray(boxes)):
        tile_map = np.asarray(tile_map, np.float32)
        if tile_map.shape[:2] != (bottom - top, right - left):
            tile_map = cv2.resize(tile_map, (right - left, bottom - top), interpolation=cv2.INTER_LINEAR)
        region = out[top:bottom, left:right]
        if reduce == "max":
            np.maximum(region, tile_map, out=region)
        else:
            region += tile_map
        counts[top:bottom, left:right] += 1
    if reduce == "mean":
        out /= np.maximum(counts, 1)
    out[counts == 0] = 0.0
    return out


def reduce_tile_scores(scores: Sequence[float], geometry: Geometry) -> float:
    """One image score from its tiles' scores: the max, or the mean of the `tile_topk` highest."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    if scores.size == 0:
        raise ValueError("reduce_tile_scores: an image without tiles")
    if geometry.tile_reduce == "max":
        return float(scores.max())
    k = min(geometry.tile_topk, scores.size)
    return float(np.sort(scores)[-k:].mean())
