"""Procedural texture families: the "normal" surfaces of the synthetic competition.

Six families imitate the MVTec AD / DAGM textures (fabric, wood, leather, tiles, carpet, brushed
metal) and make up the dataset; a few more (`OTHER_FAMILIES`) never appear in it and serve as
out-of-distribution images (EfficientAD's penalty set) and anomaly sources (DRAEM). Every call
draws its own scale, orientation, colour and lighting, so no two images are alike. Everything is
vectorised numpy plus cv2 resizing/filtering: a few milliseconds per 256x256 image.
"""
from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

DATASET_FAMILIES: tuple[str, ...] = ("fabric", "wood", "leather", "tiles", "carpet", "brushed_metal")
OTHER_FAMILIES: tuple[str, ...] = ("marble", "cells", "clouds", "stripes")

# (dark, light) RGB pairs a family's pattern is mapped between; each call jitters them further.
_PALETTES: dict[str, list[tuple[tuple[int, int, int], tuple[int, int, int]]]] = {
    "fabric": [((25, 40, 85), (120, 140, 190)), ((120, 105, 80), (225, 210, 180)),
               ((60, 60, 60), (175, 175, 170)), ((90, 20, 25), (200, 70, 70)),
               ((30, 60, 35), (120, 170, 110))],
    "wood": [((120, 70, 35), (215, 170, 115)), ((70, 40, 20), (160, 105, 60)),
             ((150, 110, 70), (235, 205, 160)), ((95, 45, 30), (185, 110, 75))],
    "leather": [((15, 12, 10), (80, 70, 62)), ((60, 30, 15), (150, 95, 55)),
                ((120, 85, 55), (210, 170, 120)), ((70, 15, 15), (160, 60, 50))],
    "tiles": [((170, 170, 165), (245, 245, 240)), ((130, 55, 35), (210, 120, 80)),
              ((60, 65, 70), (150, 155, 160)), ((40, 70, 120), (120, 160, 210))],
    "carpet": [((90, 15, 20), (200, 60, 60)), ((20, 30, 80), (90, 110, 190)),
               ((40, 65, 30), (130, 160, 90)), ((80, 75, 70), (175, 165, 150)),
               ((110, 90, 60), (210, 190, 150))],
    "brushed_metal": [((110, 112, 118), (215, 218, 222)), ((95, 100, 110), (190, 200, 215)),
                      ((120, 105, 80), (225, 205, 165))],
    "marble": [((70, 80, 75), (240, 238, 232)), ((30, 30, 35), (200, 195, 190)),
               ((110, 60, 60), (245, 225, 215))],
    "cells": [((20, 20, 20), (255, 255, 255))],
    "clouds": [((70, 120, 200), (250, 250, 255)), ((40, 40, 60), (230, 210, 200))],
    "stripes": [((20, 20, 20), (255, 255, 255))],
}


def make_texture(family: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A (height, width, 3) uint8 texture of `family`, with fresh random scale, colour, lighting."""
    try:
        painter = _FAMILY_PAINTERS[family]
    except KeyError:
        raise ValueError(
            f"unknown texture family {family!r}; allowed: {', '.join(DATASET_FAMILIES + OTHER_FAMILIES)}"
        ) from None
    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise ValueError(f"texture size must be positive (height, width), got {size!r}")
    rgb = painter(height, width, rng)
    rgb = _apply_lighting(rgb, rng)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def rotate_and_crop(canvas: np.ndarray, angle_deg: float, height: int, width: int) -> np.ndarray:
    """Rotate a square canvas about its centre and cut the central (height, width) window.

    Anisotropic patterns are drawn axis-aligned on a canvas at least `hypot(height, width)` wide,
    so the rotated crop has no empty corners.
    """
    side = canvas.shape[0]
    centre = (side / 2.0, side / 2.0)
    matrix = cv2.getRotationMatrix2D(centre, angle_deg, 1.0)
    # Move the rotated centre onto the crop's centre so warpAffine only computes the crop.
    matrix[0, 2] -= (side - width) / 2.0
    matrix[1, 2] -= (side - height) / 2.0
    return cv2.warpAffine(canvas, matrix, (width, height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


# ----------------------------------------------------------------------------------------------
# Noise building blocks
# ----------------------------------------------------------------------------------------------

def _canvas_side(height: int, width: int) -> int:
    return int(np.ceil(np.hypot(height, width))) + 2


def _scale_factor(height: int, width: int) -> float:
    # Pattern sizes are tuned for 256 px; smaller images get smaller (but not proportionally
    # smaller) patterns so a 64 px test image still shows structure.
    return float(np.sqrt(max(min(height, width), 32) / 256.0))


def _value_noise(height: int, width: int, cell_y: float, cell_x: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Smooth noise: a random lattice with `cell` px spacing, bicubically upsampled; ~N(0, 1)."""
    cell_y, cell_x = max(cell_y, 1.0), max(cell_x, 1.0)
    grid_h = int(np.ceil(height / cell_y)) + 3
    grid_w = int(np.ceil(width / cell_x)) + 3
    lattice = rng.standard_normal((grid_h, grid_w), dtype=np.float32)
    big = cv2.resize(lattice, (int(round(grid_w * cell_x)), int(round(grid_h * cell_y))),
                     interpolation=cv2.INTER_CUBIC)
    off_y = int(rng.integers(0, max(1, big.shape[0] - height + 1)))
    off_x = int(rng.integers(0, max(1, big.shape[1] - width + 1)))
    return big[off_y:off_y + height, off_x:off_x + width]


def _fractal_noise(height: int, width: int, cell: float, octaves: int,
                   rng: np.random.Generator, persistence: float = 0.5) -> np.ndarray:
    """Sum of value-noise octaves (cell halves, amplitude x `persistence`), standardised."""
    total = np.zeros((height, width), np.float32)
    amplitude = 1.0
    for _ in range(octaves):
        total += amplitude * _value_noise(height, width, cell, cell, rng)
        cell /= 2.0
        amplitude *= persistence
    return _standardise(total)


def _standardise(values: np.ndarray) -> np.ndarray:
    return (values - values.mean()) / (values.std() + 1e-6)


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _palette(family: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    options = _PALETTES[family]
    dark, light = options[int(rng.integers(len(options)))]
    # Mostly a shared brightness shift, a little hue drift, so wood stays wood-coloured.
    jitter = rng.normal(0.0, 14.0) + rng.normal(0.0, 6.0, size=3)
    dark = np.clip(np.asarray(dark, np.float32) + jitter + rng.normal(0.0, 4.0, size=3), 0, 255)
    light = np.clip(np.asarray(light, np.float32) + jitter + rng.normal(0.0, 4.0, size=3), 0, 255)
    return dark.astype(np.float32), light.astype(np.float32)


def _colourise(pattern: np.ndarray, dark: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Map a [0, 1] pattern onto the dark->light colour ramp; returns float32 (H, W, 3)."""
    pattern = np.clip(pattern, 0.0, 1.0)[..., None]
    return dark + (light - dark) * pattern


def _apply_lighting(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Global gain plus a gentle linear illumination gradient, as from an off-axis lamp."""
    height, width = rgb.shape[:2]
    gain = rng.uniform(0.85, 1.12)
    slope = rng.uniform(0.0, 0.18)
    angle = rng.uniform(0.0, 2 * np.pi)
    ys = (np.arange(height, dtype=np.float32) - height / 2) / max(height, width)
    xs = (np.arange(width, dtype=np.float32) - width / 2) / max(height, width)
    plane = 1.0 + slope * (np.sin(angle) * ys[:, None] + np.cos(angle) * xs[None, :])
    return rgb * (gain * plane)[..., None]


# ----------------------------------------------------------------------------------------------
# Dataset families
# ----------------------------------------------------------------------------------------------

def _fabric(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Woven cloth: warp and weft threads crossing over/under in a plain, twill or basket weave."""
    side = _canvas_side(height, width)
    period = rng.uniform(4.0, 10.0) * _scale_factor(height, width) * 1.4
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32)
    # Slightly uneven thread spacing, as in real cloth.
    wobble_x = 0.12 * period * _value_noise(side, side, 50, 50, rng)
    wobble_y = 0.12 * period * _value_noise(side, side, 50, 50, rng)
    cx, cy = (xs + wobble_x) / period, (ys + wobble_y) / period
    ix, iy = np.floor(cx), np.floor(cy)
    fx, fy = cx - ix, cy - iy
    weave = rng.choice(["plain", "twill", "basket"])
    if weave == "plain":
        warp_on_top = (ix + iy) % 2 == 0
    elif weave == "twill":
        repeat = int(rng.integers(3, 5))
        warp_on_top = (ix + iy) % repeat < repeat // 2 + 1
    else:
        warp_on_top = (np.floor(ix / 2) + np.floor(iy / 2)) % 2 == 0
    # Thread cross-section: bright in the middle, dark gap between threads.
    # sin(pi * f) can round to a hair below zero at f = 0; clamp before the square root.
    across_warp = np.sqrt(np.maximum(np.sin(np.pi * fx), 0.0))
    across_weft = np.sqrt(np.maximum(np.sin(np.pi * fy), 0.0))
    along_warp = 0.75 + 0.25 * np.sin(np.pi * fy)
    along_weft = 0.75 + 0.25 * np.sin(np.pi * fx)
    warp = across_warp * along_warp
    weft = across_weft * along_weft
    height_map = np.where(warp_on_top, warp, 0.8 * weft)
    fibres = 0.08 * _value_noise(side, side, 1.0, 3.0, rng)
    pattern = 0.15 + 0.75 * height_map + fibres + 0.05 * _value_noise(side, side, 60, 60, rng)
    angle = rng.uniform(-90, 90)
    pattern = rotate_and_crop(pattern.astype(np.float32), angle, height, width)
    dark, light = _palette("fabric", rng)
    rgb = _colourise(pattern, dark, light)
    if rng.random() < 0.3:
        # Two-colour cloth (denim-like): weft threads in a lighter, desaturated colour.
        mask = rotate_and_crop((~warp_on_top).astype(np.float32), angle, height, width)
        rgb = rgb * (1 - 0.4 * mask[..., None]) + 0.4 * mask[..., None] * rgb.mean(-1, keepdims=True) * 1.2
    return rgb


def _wood(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Sawn wood: wavy growth rings (sharp dark latewood) and fine fibre streaks along the grain."""
    side = _canvas_side(height, width)
    scale = _scale_factor(height, width)
    ring_period = rng.uniform(8.0, 28.0) * scale
    ys = np.arange(side, dtype=np.float32)[:, None]
    # Rings bend slowly along the grain (x) and a little across it.
    warp = (_value_noise(side, side, 24.0 * scale, 140.0 * scale, rng) * rng.uniform(1.0, 3.0)
            + _value_noise(side, side, 80.0, 80.0, rng) * rng.uniform(0.5, 1.5))
    phase = ys / ring_period + warp
    ring = np.mod(phase, 1.0) ** rng.uniform(2.0, 5.0)
    fibres = _value_noise(side, side, 1.0, rng.uniform(20.0, 60.0) * scale, rng)
    pattern = 0.85 - 0.55 * ring - 0.08 * fibres + 0.05 * _value_noise(side, side, 50, 50, rng)
    pattern = rotate_and_crop(pattern.astype(np.float32), rng.uniform(0, 180), height, width)
    dark, light = _palette("wood", rng)
    return _colourise(pattern, dark, light)


def _leather(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Grained leather: pebbled surface cut by a network of creases, lit from one side."""
    scale = _scale_factor(height, width)
    crease_noise = _fractal_noise(height, width, rng.uniform(10.0, 20.0) * scale, 2, rng, 0.4)
    # Zero crossings of band-limited noise form a closed network of thin lines: the creases.
    creases = np.exp(-(crease_noise / rng.uniform(0.08, 0.16)) ** 2)
    pebbles = _value_noise(height, width, rng.uniform(2.0, 4.0) * scale, rng.uniform(2.0, 4.0) * scale, rng)
    surface = 0.6 * pebbles - 2.0 * creases
    surface = cv2.GaussianBlur(surface, (0, 0), 0.8)
    # Emboss: shade by the slope facing the light, so the grain reads as relief.
    light_angle = rng.uniform(0, 2 * np.pi)
    grad_x = cv2.Sobel(surface, cv2.CV_32F, 1, 0, ksize=3)
    grad_y = cv2.Sobel(surface, cv2.CV_32F, 0, 1, ksize=3)
    shading = np.cos(light_angle) * grad_x + np.sin(light_angle) * grad_y
    mottle = 0.08 * _value_noise(height, width, 70, 70, rng)
    pattern = 0.55 + 0.12 * shading + 0.08 * surface + mottle
    dark, light = _palette("leather", rng)
    return _colourise(pattern, dark, light)


def _tiles(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Ceramic tiles: a grid (or running bond) of slightly different tiles separated by grout."""
    side = _canvas_side(height, width)
    scale = _scale_factor(height, width)
    tile_w = rng.uniform(22.0, 70.0) * scale
    tile_h = tile_w * (rng.uniform(0.5, 1.0) if rng.random() < 0.4 else 1.0)
    grout = rng.uniform(1.2, 3.5) * scale
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32)
    row = np.floor(ys / tile_h)
    offset = 0.5 * tile_w * (row % 2) if rng.random() < 0.4 else 0.0
    col = np.floor((xs + offset) / tile_w)
    dist_x = np.abs((xs + offset) - (col + 0.5) * tile_w)
    dist_y = np.abs(ys - (row + 0.5) * tile_h)
    # Distance to the tile border, smoothed into a grout groove and a bevel.
    edge = np.minimum(tile_w / 2 - dist_x, tile_h / 2 - dist_y)
    tile_shade = rng.normal(0.0, 0.05, size=(64, 64)).astype(np.float32)
    per_tile = tile_shade[row.astype(np.int64) % 64, col.astype(np.int64) % 64]
    surface = 0.8 + per_tile + 0.03 * _value_noise(side, side, 6.0, 6.0, rng)
    bevel = _smoothstep(grout, grout + 3.0 * scale, edge)
    pattern = np.where(edge < grout, rng.uniform(0.15, 0.5), surface * (0.85 + 0.15 * bevel))
    pattern = pattern + 0.03 * _value_noise(side, side, 1.0, 1.0, rng)
    angle = rng.choice([0.0, 90.0, 45.0], p=[0.45, 0.45, 0.1]) + rng.normal(0.0, 3.0)
    pattern = rotate_and_crop(pattern.astype(np.float32), angle, height, width)
    dark, light = _palette("tiles", rng)
    return _colourise(pattern, dark, light)


def _carpet(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Cut-pile carpet: dense short fibres, tuft rows and a mottled colour."""
    side = _canvas_side(height, width)
    scale = _scale_factor(height, width)
    white = rng.standard_normal((side, side), dtype=np.float32)
    fibre_len = rng.uniform(1.5, 3.5) * scale * 1.4
    fibres = _standardise(cv2.GaussianBlur(white, (0, 0), sigmaX=fibre_len, sigmaY=0.7))
    tuft_period = rng.uniform(3.0, 7.0) * scale * 1.4
    rows = np.sin(2 * np.pi * np.arange(side, dtype=np.float32) / tuft_period)[:, None]
    mottle = _value_noise(side, side, 30 * scale, 30 * scale, rng)
    pattern = 0.55 + 0.14 * fibres + 0.05 * rows + 0.08 * mottle
    pattern = rotate_and_crop(pattern.astype(np.float32), rng.uniform(0, 180), height, width)
    dark, light = _palette("carpet", rng)
    rgb = _colourise(pattern, dark, light)
    # Fibres differ in dye uptake: a little per-channel noise gives the flecked look.
    fleck = rng.normal(0.0, 4.0, size=(height, width, 1)).astype(np.float32)
    return rgb + fleck


def _brushed_metal(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Brushed metal: long fine streaks along the brushing direction and a broad sheen band."""
    side = _canvas_side(height, width)
    streak_len = rng.uniform(30.0, 120.0)
    coarse = _value_noise(side, side, 1.0, streak_len, rng)
    fine = _value_noise(side, side, 1.0, streak_len / 4.0, rng)
    ys = np.arange(side, dtype=np.float32)[:, None]
    sheen_centre = rng.uniform(0.2, 0.8) * side
    sheen_width = rng.uniform(0.15, 0.5) * side
    sheen = np.exp(-((ys - sheen_centre) / sheen_width) ** 2)
    pattern = 0.5 + 0.06 * coarse + 0.04 * fine + rng.uniform(0.1, 0.3) * sheen
    pattern = rotate_and_crop(pattern.astype(np.float32), rng.uniform(0, 180), height, width)
    dark, light = _palette("brushed_metal", rng)
    return _colourise(pattern, dark, light)


# ----------------------------------------------------------------------------------------------
# Out-of-distribution families (never in the dataset)
# ----------------------------------------------------------------------------------------------

def _marble(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Marble: turbulent veins, the classic sin(x + turbulence) construction."""
    side = _canvas_side(height, width)
    scale = _scale_factor(height, width)
    xs = np.arange(side, dtype=np.float32)[None, :]
    turbulence = np.abs(_fractal_noise(side, side, 60 * scale, 4, rng, 0.55))
    veins = np.abs(np.sin(xs / rng.uniform(15, 40) / scale + rng.uniform(2, 5) * turbulence))
    pattern = veins ** rng.uniform(0.2, 0.5)
    pattern = rotate_and_crop(pattern.astype(np.float32), rng.uniform(0, 180), height, width)
    dark, light = _palette("marble", rng)
    return _colourise(pattern, dark, light)


def _cells(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Voronoi cells with random flat colours and dark borders."""
    n_seeds = max(4, int(height * width / (rng.uniform(12, 40) ** 2)))
    seeds = np.full((height, width), 255, np.uint8)
    seeds[rng.integers(0, height, n_seeds), rng.integers(0, width, n_seeds)] = 0
    distance, labels = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5,
                                                       labelType=cv2.DIST_LABEL_PIXEL)
    colours = rng.uniform(20, 255, size=(labels.max() + 1, 3)).astype(np.float32)
    rgb = colours[labels]
    border = np.zeros((height, width), bool)
    border[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    border[1:, :] |= labels[1:, :] != labels[:-1, :]
    shade = 1.0 - 0.3 * np.clip(distance / (distance.max() + 1e-6), 0, 1)
    rgb = rgb * shade[..., None]
    rgb[border] *= 0.25
    return rgb


def _clouds(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Cumulus-like fractal noise between a sky colour and white."""
    noise = _fractal_noise(height, width, rng.uniform(40, 100), 5, rng, 0.55)
    pattern = _smoothstep(-0.5, 1.5, noise)
    dark, light = _palette("clouds", rng)
    return _colourise(pattern, dark, light)


def _stripes(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Bold multicoloured stripes: the opposite of every dataset texture's statistics."""
    side = _canvas_side(height, width)
    period = rng.uniform(6, 30)
    band = (np.arange(side) / period).astype(np.int64)
    colours = rng.uniform(0, 255, size=(band.max() + 1, 3)).astype(np.float32)
    rgb = np.broadcast_to(colours[band][None, :, :], (side, side, 3)).astype(np.float32)
    return rotate_and_crop(np.ascontiguousarray(rgb), rng.uniform(0, 180), height, width)


_FAMILY_PAINTERS: dict[str, Callable[[int, int, np.random.Generator], np.ndarray]] = {
    "fabric": _fabric,
    "wood": _wood,
    "leather": _leather,
    "tiles": _tiles,
    "carpet": _carpet,
    "brushed_metal": _brushed_metal,
    "marble": _marble,
    "cells": _cells,
    "clouds": _clouds,
    "stripes": _stripes,
}
